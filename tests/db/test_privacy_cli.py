"""``derive export`` / ``derive erase`` as a user runs them: messages and exit codes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.cli import derive
from tests.db.people import People, two_people


@pytest.fixture
def people(dsn: str, pg: psycopg.Connection) -> People:
    return two_people(dsn, pg)


@pytest.mark.parametrize("command", ["export", "erase"])
def test_an_unknown_id_is_an_answer_not_an_error(dsn: str, command: str, tmp_path: Path) -> None:
    nobody = uuid.uuid4()

    result = (
        derive(command, "--dsn", dsn, "--user", str(nobody), "--out", str(tmp_path / "x"))
        if command == "export"
        else derive(command, "--dsn", dsn, "--user", str(nobody))
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"nothing stored about user {nobody}"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["export", "erase"])
@pytest.mark.parametrize("option", ["--user", "--prospect"])
def test_a_malformed_id_is_a_usage_error(dsn: str, command: str, option: str) -> None:
    result = derive(command, "--dsn", dsn, option, "not-a-uuid")

    assert result.returncode == 2
    assert "'not-a-uuid' is not a UUID" in result.stderr


@pytest.mark.parametrize("command", ["export", "erase"])
def test_exactly_one_subject_is_required(dsn: str, command: str) -> None:
    result = derive(
        command, "--dsn", dsn, "--user", str(uuid.uuid4()), "--prospect", str(uuid.uuid4())
    )

    assert result.returncode == 2
    assert "exactly one of --user UUID or --prospect UUID" in result.stderr


def test_export_refuses_a_non_empty_directory_unless_forced(
    dsn: str, people: People, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("keep")

    refused = derive("export", "--dsn", dsn, "--user", str(people.a), "--out", str(tmp_path))
    forced = derive(
        "export", "--dsn", dsn, "--user", str(people.a), "--out", str(tmp_path), "--force"
    )

    assert refused.returncode == 2
    assert f"export directory {tmp_path} exists and is not empty" in refused.stderr
    assert forced.returncode == 0, forced.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["subject"] == {"kind": "user", "id": str(people.a)}
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_export_prints_the_tables_and_the_snapshot_time(
    dsn: str, people: People, tmp_path: Path
) -> None:
    result = derive(
        "export",
        "--dsn",
        dsn,
        "--prospect",
        str(people.prospect_a),
        "--out",
        str(tmp_path / "p"),
        "--format",
        "parquet",
    )

    assert result.returncode == 0, result.stderr
    assert "prospect_touchpoints" in result.stdout
    assert "prospect_touchpoints.parquet" in result.stdout
    assert "manifest.json lists them" in result.stdout


def test_erase_dry_run_then_erase(dsn: str, pg: psycopg.Connection, people: People) -> None:
    dry = derive("erase", "--dsn", dsn, "--user", str(people.a), "--dry-run", "--json")
    done = derive("erase", "--dsn", dsn, "--user", str(people.a))
    again = derive("erase", "--dsn", dsn, "--user", str(people.a))

    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["dry_run"] is True
    assert planned["tables"]["audience_state"] == 1
    assert done.returncode == 0, done.stderr
    assert f"deleted {planned['rows']} rows" in done.stdout
    assert again.stdout.strip() == f"nothing stored about user {people.a}"
    erased = pg.execute(
        "SELECT count(*) FROM audience_events WHERE event_type = 'subject_erased'"
    ).fetchone()
    assert erased == (1,)
