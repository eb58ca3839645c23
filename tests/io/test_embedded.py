"""The embedded server: only the owner of DERIVE_HOME can connect (a password kept there)."""

from __future__ import annotations

import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from derive.io import embedded


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh DERIVE_HOME outside pytest's 0700 temp root (the server may run as another user)."""
    for name in ("PGPASSWORD", "PGPASSFILE", "PGSERVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")  # no ~/.pgpass may supply a password
    path = Path(tempfile.mkdtemp(prefix="derive-embedded-test-"))
    try:
        yield path
    finally:
        embedded.stop_server(path)
        shutil.rmtree(path, ignore_errors=True)


def without_password(dsn: str) -> str:
    parts = urlsplit(dsn)
    return f"postgresql://postgres@127.0.0.1:{parts.port}/postgres"


def with_password(dsn: str, password: str) -> str:
    parts = urlsplit(dsn)
    return f"postgresql://postgres:{password}@127.0.0.1:{parts.port}/postgres"


def test_the_password_file_is_readable_by_its_owner_only(home: Path) -> None:
    embedded.ensure_server(home)

    mode = stat.S_IMODE((home / embedded.PASSWORD_FILE).stat().st_mode)

    assert mode == 0o600
    assert not (home / ".initdb-password").exists()


def test_a_connection_without_the_password_is_refused(home: Path) -> None:
    dsn = embedded.ensure_server(home)

    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(without_password(dsn)).close()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(with_password(dsn, "guessed")).close()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("derive",)


def test_the_same_password_serves_the_next_command(home: Path) -> None:
    first = embedded.ensure_server(home)
    embedded.stop_server(home)

    second = embedded.ensure_server(home, "other")

    assert urlsplit(first).password == urlsplit(second).password
    with psycopg.connect(second) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("other",)


def test_a_trust_server_of_an_older_derive_is_converted_in_place(home: Path) -> None:
    pgdata = home / "pgdata"
    embedded.ensure_server(home)
    embedded.stop_server(home)
    # What an older derive left behind: initdb --auth=trust and no password file.
    (pgdata / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    (home / embedded.PASSWORD_FILE).unlink()

    dsn = embedded.ensure_server(home)

    assert stat.S_IMODE((home / embedded.PASSWORD_FILE).stat().st_mode) == 0o600
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(without_password(dsn)).close()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_widened_password_file_is_narrowed_again(home: Path) -> None:
    embedded.ensure_server(home)
    (home / embedded.PASSWORD_FILE).chmod(0o644)

    embedded.ensure_server(home)

    assert stat.S_IMODE((home / embedded.PASSWORD_FILE).stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "content",
    [
        "",
        "garbage",
        "1\n/x\n0\nport\n\n\n\nready\n",
        "99999999999999999999\n/x\n0\n5432\n\n\n\nready\n",
    ],
    ids=["empty", "one-line", "bad-port", "bad-pid"],
)
def test_a_damaged_postmaster_pid_means_no_running_server(tmp_path: Path, content: str) -> None:
    (tmp_path / "postmaster.pid").write_text(content)

    assert embedded._running_port(tmp_path) is None
