"""What the console script says to a newcomer: each message's exit code and key words."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psycopg
import pytest

from derive.io.connect import redact, without_password
from tests.cli import derive


def plain(text: str) -> str:
    """Output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize(
    "args",
    [
        ("run",),
        ("rollup",),
        ("attribution",),
        ("status",),
        ("db", "adopt"),
        (
            "backfill",
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-02",
            "--table",
            "audience_state_history",
        ),
    ],
)
def test_a_never_migrated_database_says_to_run_db_migrate(
    empty_dsn: str, args: tuple[str, ...]
) -> None:
    result = derive(*args, "--dsn", empty_dsn)

    assert result.returncode == 1
    assert "never migrated" in result.stderr
    # The command to run, with the password (if the DSN has one) never shown.
    assert f"run `derive db migrate --dsn {shlex.quote(redact(empty_dsn))}`" in result.stderr
    password = urlsplit(empty_dsn).password
    assert not password or password not in result.stderr
    assert "relation" not in result.stderr
    assert "Traceback" not in result.stderr


def test_report_on_a_never_migrated_database_says_to_run_db_migrate(
    empty_dsn: str, tmp_path: Path
) -> None:
    result = derive("report", "--out", str(tmp_path / "r.html"), "--dsn", empty_dsn)

    assert result.returncode == 1
    assert "derive db migrate --dsn" in result.stderr
    assert not (tmp_path / "r.html").exists()


def test_ingest_on_a_never_migrated_database_says_to_run_db_migrate(
    empty_dsn: str, tmp_path: Path
) -> None:
    (tmp_path / "t.jsonl").write_text("{}\n")

    result = derive("ingest", "touchpoints", str(tmp_path / "t.jsonl"), "--dsn", empty_dsn)

    assert result.returncode == 1
    assert "derive db migrate --dsn" in result.stderr


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("not-a-url", "is not a PostgreSQL DSN"),
        ("mysql://me:pw@db:3306/app", "is a mysql URL, derive needs PostgreSQL"),
    ],
)
def test_a_dsn_that_is_not_postgresql_names_the_expected_forms(value: str, words: str) -> None:
    result = derive("status", "--dsn", value)

    text = plain(result.stderr)
    assert result.returncode == 2
    assert "--dsn" in text
    assert words in text
    assert "postgresql://user[:password]@host[:port]/database" in text
    assert "key=value" in text
    assert "pw" not in text.replace("password", "")


def test_a_bad_dsn_in_derive_dsn_is_refused_the_same_way() -> None:
    result = derive("run", env={"DERIVE_DSN": "localhost:5432"})

    assert result.returncode == 2
    assert "is not a PostgreSQL DSN" in plain(result.stderr)


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("run", "--lookback", "0d"), "--lookback"),
        (("status", "--max-lag", "soon"), "--max-lag"),
        (("attribution", "--half-life", "0h"), "--half-life"),
        (
            (
                "backfill",
                "--from",
                "2026-11-01",
                "--to",
                "2026-11-02",
                "--table",
                "audience_state_history",
                "--step",
                "1w",
            ),
            "--step",
        ),
    ],
)
def test_a_bad_duration_names_the_option(args: tuple[str, ...], option: str) -> None:
    result = derive(*args, "--dsn", "postgresql://u@127.0.0.1:1/x")

    text = plain(result.stderr)
    assert result.returncode == 2
    assert option in text
    assert repr(args[-1]) in text
    assert "duration" in text


def test_schedule_names_the_option_of_a_bad_cadence() -> None:
    result = derive("schedule", "--every", "fast")

    assert result.returncode == 2
    assert "--every" in plain(result.stderr)
    assert "'fast' is not a duration" in plain(result.stderr)


def test_as_of_without_a_zone_is_documented_as_utc() -> None:
    for command in ("run", "rollup", "attribution", "report", "demo-data"):
        result = derive(command, "--help")

        assert "without a zone it is UTC" in plain(result.stdout), command


def test_an_unknown_user_is_named_and_nothing_is_derived(dsn: str, pg: psycopg.Connection) -> None:
    stranger = str(uuid.UUID(int=0xBEEF))

    result = derive("run", "--user", stranger, "--dsn", dsn)

    assert result.returncode == 2
    assert stranger in result.stderr
    assert "no such user" in result.stderr
    assert pg.execute("SELECT count(*) FROM derivation_runs").fetchone() == (0,)


def test_a_known_user_without_a_state_yet_is_derived(dsn: str, pg: psycopg.Connection) -> None:
    known = uuid.UUID(int=0xCAFE)
    pg.execute("INSERT INTO users (id) VALUES (%s)", (known,))

    result = derive("run", "--user", str(known), "--dsn", dsn)

    assert result.returncode == 0, result.stderr


def test_backfill_refuses_a_reversed_range_before_any_progress_bar(
    dsn: str, tmp_path: Path
) -> None:
    result = derive(
        "backfill",
        "--from",
        "2026-11-02",
        "--to",
        "2026-11-01",
        "--out",
        str(tmp_path / "h"),
        "--dsn",
        dsn,
    )

    assert result.returncode == 2
    assert "--to" in plain(result.stderr)
    assert "0/?" not in result.stderr


def test_a_resumed_backfill_prints_no_empty_timings_line(dsn: str, tmp_path: Path) -> None:
    args = ("backfill", "--from", "2026-11-01", "--to", "2026-11-02", "--out", str(tmp_path / "h"))
    first = derive(*args, "--dsn", dsn)

    again = derive(*args, "--dsn", dsn)

    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    assert "2 done before" in again.stdout
    assert "timings:" not in [line.strip() for line in again.stdout.splitlines()]


def test_json_output_uses_one_iso_8601_form(dsn: str) -> None:
    run = derive("run", "--as-of", "2026-11-22T08:00:00Z", "--json", "--dsn", dsn)
    attribution = derive(
        "attribution", "--as-of", "2026-11-22T08:00:00Z", "--format", "json", "--dsn", dsn
    )

    assert run.returncode == 0, run.stderr
    assert attribution.returncode == 0, attribution.stderr
    assert json.loads(run.stdout)["as_of"] == "2026-11-22T08:00:00+00:00"
    assert json.loads(attribution.stdout)["as_of"] == "2026-11-22T08:00:00+00:00"


def test_report_refuses_an_out_file_in_a_missing_folder(dsn: str, tmp_path: Path) -> None:
    target = tmp_path / "nonexistent" / "dir" / "x.html"

    result = derive("report", "--out", str(target), "--dsn", dsn)

    assert result.returncode == 2
    assert "does not exist" in plain(result.stderr)
    assert not target.parent.exists()


def test_the_demo_prints_the_next_commands_with_its_dsn(empty_dsn: str) -> None:
    demo = derive("demo", "--users", "50", "--dsn", empty_dsn)
    lines = [line.strip() for line in demo.stdout.splitlines()]
    status_line = next(line for line in lines if line.startswith("derive status"))
    # A password is never printed; the commands run as printed once PGPASSWORD holds it.
    password = urlsplit(empty_dsn).password
    shown = shlex.quote(without_password(empty_dsn))

    status = derive(
        *shlex.split(status_line)[1:], env={"PGPASSWORD": unquote(password)} if password else None
    )

    assert demo.returncode == 0, demo.stderr
    assert f"derive report --out report.html --dsn {shown}" in lines
    assert f"derive run --dsn {shown}" in lines
    assert not password or password not in demo.stdout
    assert ("PGPASSWORD" in demo.stdout) == bool(password)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "healthy" in status.stdout
    assert "succeeded" in status.stdout


def test_ctrl_c_during_the_demo_says_interrupted_and_exits_130(
    empty_dsn: str, pg: psycopg.Connection
) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "derive.cli", "demo", "--users", "50000", "--dsn", empty_dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "NO_COLOR": "1"},
    )
    database = empty_dsn.rsplit("/", 1)[1]
    copying = False
    while demo.poll() is None and not copying:
        copying = bool(
            pg.execute(
                # the load's own statements (a COPY into a staging table, the insert), not the
                # run's COPY (SELECT ...) reads at its end, after which a signal may land too late
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state = 'active'"
                " AND ((query ILIKE 'COPY%%' AND query NOT ILIKE 'COPY (%%')"
                " OR query ILIKE 'INSERT INTO audience_events%%')",
                (database,),
            ).fetchone()[0]  # type: ignore[index]
        )
        time.sleep(0.02)
    assert copying, "the demo finished before its load could be interrupted"

    demo.send_signal(signal.SIGINT)
    _, stderr = demo.communicate(timeout=120)

    assert demo.returncode == 130
    assert "interrupted, nothing written" in stderr
    assert "Traceback" not in stderr
    assert "canceling statement" not in stderr
    with psycopg.connect(empty_dsn) as demo_db:
        assert demo_db.execute("SELECT count(*) FROM audience_state").fetchone() == (0,)
