"""The no-setup paths on the embedded server: the test session's own server, and the demo's."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from derive.io.embedded import running_port, stop_server
from tests.cli import derive

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def derive_home() -> Iterator[Path]:
    """A DERIVE_HOME outside pytest's temporary root (which pytest narrows to mode 0700)."""
    home = Path(tempfile.mkdtemp(prefix="derive-home-"))
    try:
        yield home
    finally:
        stop_server(home / "test-server")
        stop_server(home)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_a_session_on_the_embedded_server_uses_derive_home_and_stops_what_it_started(
    derive_home: Path,
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            "2",
            "-p",
            "no:cacheprovider",
            "tests/db/test_migrations.py::test_check_passes_on_a_migrated_database",
        ],
        cwd=ROOT,
        env={
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "DERIVE_HOME": str(derive_home),
        },
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (derive_home / "test-server" / "pgdata" / "PG_VERSION").exists()
    assert running_port(derive_home / "test-server") is None


@pytest.mark.slow
def test_after_the_demo_its_printed_commands_show_the_demos_data(derive_home: Path) -> None:
    env = {"DERIVE_HOME": str(derive_home)}
    demo = derive("demo", "--users", "300", env=env)
    lines = [line.strip() for line in demo.stdout.splitlines()]
    export = next(line for line in lines if line.startswith("export DERIVE_DSN="))
    shell = subprocess.run(  # the line as a user pastes it into a shell
        ["sh", "-c", f'{export} && printf %s "$DERIVE_DSN"'],
        capture_output=True,
        text=True,
        check=True,
    )
    demo_dsn = shell.stdout

    status = derive("status", env={**env, "DERIVE_DSN": demo_dsn})

    assert demo.returncode == 0, demo.stderr
    assert "The embedded server keeps running (`derive db stop` stops it)" in demo.stdout
    assert demo_dsn.endswith("/derive_demo")
    assert (derive_home / "password").read_text().strip() not in demo.stdout
    assert running_port(derive_home) is not None
    assert status.returncode == 0, status.stdout + status.stderr
    assert "derive_demo" in status.stdout
    assert "succeeded" in status.stdout
