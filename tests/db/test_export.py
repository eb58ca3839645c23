"""``derive export``: every row of the person, nobody else's, one snapshot, RLS respected."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import polars as pl
import psycopg
import pytest

from derive.errors import UsageError
from derive.io.connect import connect
from derive.io.privacy import USER
from derive.jobs.privacy import MANIFEST, export_subject
from tests.db.people import People, rows_mentioning, two_people


@pytest.fixture
def people(dsn: str, pg: psycopg.Connection) -> People:
    return two_people(dsn, pg)


def export(dsn: str, out: Path, subject: uuid.UUID, **options: object) -> dict[str, object]:
    with connect(dsn) as db:
        export_subject(db, kind=options.pop("kind", "user"), subject=subject, out=out, **options)  # type: ignore[arg-type]
    return dict(json.loads((out / MANIFEST).read_text()))


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_export_holds_every_row_of_the_person_and_no_one_elses(
    dsn: str, pg: psycopg.Connection, people: People, tmp_path: Path
) -> None:
    out = tmp_path / "a"

    manifest = export(dsn, out, people.a)

    tables = manifest["tables"]
    assert isinstance(tables, dict)
    exported = {t: v["rows"] for t, v in tables.items() if v["rows"]}
    # Every row anywhere in the database that names A is in the export, table by table (the
    # steps of A's ingestion sessions name only the session).
    assert exported.pop("ingestion_session_steps") == 1
    assert exported == rows_mentioning(pg, people.a)
    # 5 events, audit rows first_seen, S0->S1, S1->S2, one validation_fail
    assert exported["audience_events"] == 5 + 3 + 1
    text = "".join(p.read_text() for p in out.iterdir())
    assert str(people.b) not in text
    assert people.b.hex not in text
    events = lines(out / "audience_events.jsonl")
    assert {e["user_id"] for e in events} == {str(people.a)}
    assert {e["event_type"] for e in events} >= {"state_change_logged", "validation_fail"}
    # The shared session's other rows (B's, anonymous) are not A's.
    assert all(e["session_id"] != "shared" or e["user_id"] == str(people.a) for e in events)
    (user_row,) = lines(out / "users.jsonl")
    assert "attribution_salt" not in user_row
    (run_row,) = lines(out / "derivation_runs.jsonl")
    assert run_row["args"]["users"] == [str(people.a)]  # type: ignore[index]
    assert manifest["subject"] == {"kind": "user", "id": str(people.a)}
    assert manifest["role"] == "service_role"
    assert manifest["not_readable"] == []


def test_export_rows_equal_the_stored_rows(
    dsn: str, pg: psycopg.Connection, people: People, tmp_path: Path
) -> None:
    export(dsn, tmp_path / "a", people.a)

    (state,) = lines(tmp_path / "a" / "audience_state.jsonl")
    stored = pg.execute(
        "SELECT row_to_json(s)::text FROM audience_state s WHERE user_id = %s", (people.a,)
    ).fetchone()
    assert stored is not None
    assert state == json.loads(stored[0])
    ids = {e["id"] for e in lines(tmp_path / "a" / "audience_events.jsonl")}
    expected = {
        str(r[0])
        for r in pg.execute(
            "SELECT id FROM audience_events WHERE user_id = %s", (people.a,)
        ).fetchall()
    }
    assert ids == expected


def test_export_writes_one_file_per_table_and_a_manifest(
    dsn: str, people: People, tmp_path: Path
) -> None:
    manifest = export(dsn, tmp_path / "a", people.a)

    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted([MANIFEST, *(f"{s.table}.jsonl" for s in USER)])
    assert isinstance(manifest["exported_at"], str)
    assert manifest["rows"] == sum(v["rows"] for v in manifest["tables"].values())  # type: ignore[union-attr]


def test_parquet_export_has_the_same_rows_with_types(
    dsn: str, people: People, tmp_path: Path
) -> None:
    as_json = export(dsn, tmp_path / "j", people.a)
    as_parquet = export(dsn, tmp_path / "p", people.a, fmt="parquet")

    assert {t: v["rows"] for t, v in as_parquet["tables"].items()} == {  # type: ignore[union-attr]
        t: v["rows"]
        for t, v in as_json["tables"].items()  # type: ignore[union-attr]
    }
    events = pl.read_parquet(tmp_path / "p" / "audience_events.parquet")
    assert events.schema["user_id"] == pl.String
    assert events.schema["created_at"] == pl.Datetime("us", "UTC")
    assert set(events["user_id"]) == {str(people.a)}
    aggregates = pl.read_parquet(tmp_path / "p" / "metric_aggregate_rows.parquet")
    assert aggregates["surfaces_included"].to_list() == [["tryst"]]
    assert aggregates["value_numeric"].to_list() == ["12.0000"]


def test_prospect_export_holds_its_touchpoints_and_credits_only(
    dsn: str, pg: psycopg.Connection, people: People, tmp_path: Path
) -> None:
    manifest = export(dsn, tmp_path / "p", people.prospect_a, kind="prospect")

    tables = {t: v["rows"] for t, v in manifest["tables"].items()}  # type: ignore[union-attr]
    # dm_inbound and tip naming the prospect, plus the anonymous view with the same identifier hash.
    assert tables["prospect_touchpoints"] == 3
    assert tables["prospects"] == 1
    credits = lines(tmp_path / "p" / "attribution_credits.jsonl")
    expected = pg.execute(
        "SELECT count(*) FROM attribution_credits WHERE prospect_id = %s", (people.prospect_a,)
    ).fetchone()
    assert expected is not None
    assert len(credits) == expected[0] > 0
    text = (tmp_path / "p" / "prospect_touchpoints.jsonl").read_text()
    assert str(people.prospect_b) not in text


def test_unknown_subject_writes_nothing(dsn: str, people: People, tmp_path: Path) -> None:
    with connect(dsn) as db:
        result = export_subject(db, kind="user", subject=uuid.uuid4(), out=tmp_path / "x")

    assert result.rows == 0
    assert result.directory is None
    assert not (tmp_path / "x").exists()


def test_a_non_empty_directory_is_refused_unless_forced(
    dsn: str, people: People, tmp_path: Path
) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with connect(dsn) as db, pytest.raises(UsageError, match=r"not empty.*--force"):
        export_subject(db, kind="user", subject=people.a, out=tmp_path)

    export(dsn, tmp_path, people.a, force=True)

    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert (tmp_path / "audience_events.jsonl").exists()


@pytest.fixture
def tenant_dsn(dsn: str, pg: psycopg.Connection, people: People) -> Iterator[str]:
    """A login role in ``authenticated`` whose session says it is tenant A (app.user_id)."""
    role = f"tenant_{uuid.uuid4().hex[:12]}"
    secret = uuid.uuid4().hex
    pg.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{secret}' IN ROLE authenticated")
    parts = urlsplit(dsn)
    options = quote(f"-c app.user_id={people.a}")
    netloc = f"{role}:{secret}@{parts.hostname}:{parts.port or 5432}"
    try:
        yield urlunsplit(parts._replace(netloc=netloc, query=f"options={options}"))
    finally:
        pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        pg.execute(f'DROP ROLE "{role}"')


def test_a_tenant_role_exports_what_its_row_level_security_shows(
    dsn: str, tenant_dsn: str, people: People, tmp_path: Path
) -> None:
    full = export(dsn, tmp_path / "service", people.a)

    mine = export(tenant_dsn, tmp_path / "tenant", people.a)

    assert mine["role"] != "service_role"
    assert set(mine["not_readable"]) == {  # type: ignore[arg-type]
        "audience_state_history",
        "rollup_pending",
        "users",
        "derivation_runs",
        "derive_rejected_users",
        "derive_requests",
        "audience_event_changes",
    }
    visible = {t: v["rows"] for t, v in mine["tables"].items()}  # type: ignore[union-attr]
    assert visible == {t: full["tables"][t]["rows"] for t in visible}  # type: ignore[index]
    with connect(tenant_dsn) as db:
        other = export_subject(db, kind="user", subject=people.b, out=tmp_path / "b")
    assert other.rows == 0
