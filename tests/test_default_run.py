"""The default `pytest` needs only Python: tests that need a system component are deselected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("browser", "pgbouncer", "ray")


def collected(*args: str) -> list[str]:
    """Node ids `pytest ARGS --collect-only` selects, run as a user would from the repository."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode in (0, 5), result.stdout[-3000:] + result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


@pytest.fixture(scope="module")
def default_run() -> list[str]:
    return collected()


def test_the_default_run_leaves_out_the_browser_test(default_run: list[str]) -> None:
    chromium_test = "test_report_renders_in_headless_chromium_without_console_errors"

    with_browser = collected("-m", "browser", "tests/db/test_report.py")

    assert not any(chromium_test in node for node in default_run)
    assert any(chromium_test in node for node in with_browser)
    assert any("test_report_parses_as_html_with_every_section" in node for node in default_run)


def test_the_default_run_selects_no_test_marked_with_a_system_component(
    default_run: list[str],
) -> None:
    marked = collected("-m", " or ".join(COMPONENTS))

    assert default_run
    assert set(default_run).isdisjoint(marked)
