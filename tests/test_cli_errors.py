"""The console script's failures: one clear line, the right exit code, never a traceback or password."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
import pytest

from derive.config import DURATION_FORMS, DURATION_RANGE, SIZE_FORMS, TIMESTAMP_RANGE
from derive.rules import canonical_rules_path
from tests.cli import derive

BAD_DSN = "postgresql://u:secret@127.0.0.1:1/x"


def plain(text: str) -> str:
    """Output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize(
    "args",
    [
        ("db", "check", "--dsn", BAD_DSN),
        ("db", "migrate", "--dsn", BAD_DSN),
        ("demo-data", "--users", "5", "--dsn", BAD_DSN),
        ("run", "--dsn", BAD_DSN),
    ],
)
def test_a_bad_dsn_is_one_line_naming_the_host_not_the_password(args: tuple[str, ...]) -> None:
    result = derive(*args)

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1
    assert len(lines) == 1
    assert "127.0.0.1" in lines[0]
    assert "secret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["1w", "12", "0d", "-3d", "yesterday", ""])
def test_a_bad_duration_exits_2_showing_the_accepted_forms(value: str) -> None:
    result = derive("run", f"--lookback={value}", "--dsn", BAD_DSN)

    assert result.returncode == 2
    assert DURATION_FORMS in plain(result.stderr)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["0", "-1GiB", "10XB", "0.0001B", "GiB", "1e3M"])
def test_a_bad_memory_limit_exits_2_naming_the_value_and_the_accepted_forms(value: str) -> None:
    for args in (("--memory-limit", value), ("--verify", "--memory-limit", value)):
        result = derive("run", *args, "--dsn", BAD_DSN)

        assert result.returncode == 2
        assert repr(value) in plain(result.stderr)
        assert SIZE_FORMS in plain(result.stderr)
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["demo-data", "run"])
def test_a_bad_timestamp_exits_2_showing_the_accepted_form(command: str) -> None:
    result = derive(command, "--as-of", "yesterday", "--dsn", BAD_DSN)

    assert result.returncode == 2
    assert "'yesterday'" in plain(result.stderr)
    assert "ISO-8601" in plain(result.stderr)
    assert "Traceback" not in result.stderr


# Every command that takes a duration or a time: out of range is a usage error, never a traceback
# (these used to overflow Python's datetime while computing the window and exit 1).
OUT_OF_RANGE = [
    ("run", "--lookback", "1000000d"),
    ("run", "--lookback", "100000000000000000000d"),
    ("run", "--as-of", "0001-01-01"),
    ("run", "--as-of", "0001-01-01T00:00:00+05:00"),
    ("watch", "--lookback", "1000000d"),
    ("watch", "--debounce", "1000000d"),
    ("attribution", "--window", "1000000d"),
    ("attribution", "--half-life", "1000000d"),
    ("attribution", "--since", "0001-01-01"),
    ("attribution", "--as-of", "0001-01-01"),
    ("rollup", "--as-of", "0001-01-01"),
    ("report", "--as-of", "0001-01-01"),
    ("status", "--max-lag", "1000000d"),
    ("demo-data", "--as-of", "0001-01-01"),
    ("prune", "--lookback", "1000000d"),
    ("schedule", "--lookback", "1000000d"),
]


@pytest.mark.parametrize(("command", "option", "value"), OUT_OF_RANGE)
def test_an_out_of_range_duration_or_time_exits_2_naming_the_allowed_range(
    command: str, option: str, value: str
) -> None:
    dsn = () if command == "schedule" else ("--dsn", BAD_DSN)
    result = derive(command, option, value, *dsn)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    text = plain(result.stderr)
    assert f"'{value}'" in text
    assert (DURATION_RANGE if value.endswith("d") else TIMESTAMP_RANGE) in text


@pytest.mark.parametrize(
    "args",
    [
        ("backfill", "--from", "0001-01-01", "--to", "2026-01-01", "--step", "1d", "--out", "x"),
        (
            "backfill",
            "--from",
            "2026-01-01",
            "--to",
            "2026-02-01",
            "--step",
            "1000000d",
            "--out",
            "x",
        ),
        ("report", "--days", "999999999"),
        ("demo-data", "--days", "999999999"),
    ],
)
def test_out_of_range_backfill_and_report_options_exit_2(args: tuple[str, ...]) -> None:
    result = derive(*args, "--dsn", BAD_DSN)

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_rules_file_exits_2_naming_the_key_and_value(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    text = canonical_rules_path().read_text(encoding="utf-8")
    rules.write_text(text.replace("window_seconds = 3", 'window_seconds = "x"'), encoding="utf-8")

    result = derive("demo-data", "--users", "5", "--rules", str(rules), "--dsn", BAD_DSN)

    assert result.returncode == 2
    assert "'dedupe.window_seconds'" in result.stderr
    assert "'x'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_a_missing_rules_file_exits_2(tmp_path: Path) -> None:
    result = derive("demo-data", "--rules", str(tmp_path / "none.toml"), "--dsn", BAD_DSN)

    assert result.returncode == 2
    assert "none.toml" in result.stderr


def test_db_check_exits_1_when_rls_is_disabled(dsn: str, pg: psycopg.Connection) -> None:
    pg.execute("ALTER TABLE audience_state DISABLE ROW LEVEL SECURITY")

    result = derive("db", "check", "--dsn", dsn)

    assert result.returncode == 1
    assert "FAIL  RLS enabled and forced on audience_state" in result.stdout


def test_demo_data_loads_and_reports_counts(dsn: str, pg: psycopg.Connection) -> None:
    result = derive(
        "demo-data",
        "--users",
        "50",
        "--seed",
        "3",
        "--as-of",
        "2026-11-22T08:00:00Z",
        "--dsn",
        dsn,
        "--json",
    )

    stored = pg.execute(
        "SELECT count(*), count(*) FILTER (WHERE user_id IS NULL),"
        " count(DISTINCT user_id), max(created_at) <= '2026-11-22T08:00:00Z' FROM audience_events"
    ).fetchone()
    users = pg.execute("SELECT count(*) FROM users").fetchone()
    assert result.returncode == 0, result.stderr
    assert '"users": 50' in result.stdout
    assert stored is not None
    assert f'"events": {stored[0]}' in result.stdout
    assert f'"anonymous": {stored[1]}' in result.stdout
    assert stored[2] == 50
    assert stored[3] is True
    assert users == (50,)
