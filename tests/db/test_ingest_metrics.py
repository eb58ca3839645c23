"""``derive ingest metrics`` against a real PostgreSQL: validation, sessions, insert-only, RLS."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from derive.cli import app
from derive.errors import ContractError, UsageError
from derive.io.connect import connect
from derive.jobs.ingest_metrics import IngestResult, ingest_metrics
from derive.metrics_rules import load_metrics_rules

RULES = load_metrics_rules()
USER_A = "aaaaaaaa-0000-4000-8000-000000000001"
USER_B = "bbbbbbbb-0000-4000-8000-000000000002"
FETCHED = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
TIER_NOTE = "tryst: Basic tier - analytics require Standard+"


def row(kind: str = "profile_view", value: Any = 120, **extra: Any) -> dict[str, Any]:
    return {
        "metric_kind": kind,
        "window_start": "2026-11-21T00:00:00Z",
        "window_end": "2026-11-22T00:00:00Z",
        "value_numeric": value,
        **extra,
    }


def output(
    *rows: Any,
    surface: str = "tryst",
    note: str = "Tryst returned metrics",
    poll_ms: int = 900_000,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "surface": surface,
        "rows": list(rows),
        "next_poll_after_ms": poll_ms,
        "health_note": note,
        **extra,
    }


def write(tmp_path: Path, *objects: dict[str, Any], name: str = "metrics.json") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(o) for o in objects) + "\n")
    return path


def ingest(dsn: str, path: Path, **kwargs: Any) -> IngestResult:
    kwargs.setdefault("user_id", USER_A)
    kwargs.setdefault("fetched_at", FETCHED)
    with connect(dsn) as db:
        return ingest_metrics(db, str(path), rules=RULES, **kwargs)


def test_valid_rows_are_inserted_and_rejected_rows_reported(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        output(
            row(),
            row("tip_amount", 12.5, currency="USD"),
            row("pageviews"),
            row("tip_amount", 3),
            row(window_end="2026-11-20T00:00:00Z"),
        ),
    )

    result = ingest(dsn, path)

    stored = pg.execute(
        "SELECT user_id::text, surface, metric_kind::text, value_numeric, currency, source,"
        " fetched_at FROM surface_metrics ORDER BY metric_kind"
    ).fetchall()
    assert stored == [
        (USER_A, "tryst", "profile_view", Decimal("120.0000"), None, "native_scrape", FETCHED),
        (USER_A, "tryst", "tip_amount", Decimal("12.5000"), "USD", "native_scrape", FETCHED),
    ]
    assert result.inserted == 2
    assert [(r["row"], r["reasons"]) for r in result.rejected.to_dicts()] == [
        (3, ["unknown_metric_kind"]),
        (4, ["missing_currency"]),
        (5, ["window_not_increasing"]),
    ]
    session = pg.execute(
        "SELECT status, rows_received, rows_inserted, rows_rejected, rejected_by_reason,"
        " jsonb_array_length(rejections) FROM ingestion_sessions"
    ).fetchone()
    assert session == (
        "partial",
        5,
        2,
        3,
        {"missing_currency": 1, "unknown_metric_kind": 1, "window_not_increasing": 1},
        3,
    )


def test_a_session_records_its_five_steps_in_order(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    ingest(dsn, write(tmp_path, output(row(), row("nope"))))

    steps = pg.execute(
        "SELECT step, status FROM ingestion_session_steps ORDER BY ordinal"
    ).fetchall()
    ordered = pg.execute(
        "SELECT bool_and(started_at <= finished_at) FROM ingestion_session_steps"
    ).fetchone()
    assert steps == [
        ("tier_check", "ok"),
        ("fetch", "ok"),
        ("parse", "partial"),
        ("persist", "ok"),
        ("audit", "ok"),
    ]
    assert ordered == (True,)


def test_empty_rows_with_a_tier_note_is_a_valid_recorded_session(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    path = write(tmp_path, output(note=TIER_NOTE, poll_ms=3_600_000))

    result = ingest(dsn, path)

    session = pg.execute(
        "SELECT status, health_note, next_poll_after_ms, next_poll_after, started_at"
        " FROM ingestion_sessions"
    ).fetchone()
    steps = dict(pg.execute("SELECT step, status FROM ingestion_session_steps").fetchall())
    assert result.inserted == 0
    assert result.rows_rejected == 0
    assert session == ("succeeded", TIER_NOTE, 3_600_000, FETCHED + timedelta(hours=1), FETCHED)
    assert steps["tier_check"] == "empty"
    assert steps["persist"] == "skipped"


def test_strict_rejects_the_whole_file_on_one_bad_row(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    path = write(tmp_path, output(row(), row(value=None)))

    result = ingest(dsn, path, strict=True)

    assert result.strict_rejected
    assert pg.execute("SELECT count(*) FROM surface_metrics").fetchone() == (0,)
    assert pg.execute("SELECT status, rows_inserted FROM ingestion_sessions").fetchone() == (
        "rejected",
        0,
    )


def test_reingesting_the_same_file_is_insert_only(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    path = write(tmp_path, output(row(value=100)))

    ingest(dsn, path)
    ingest(dsn, path, fetched_at=FETCHED + timedelta(hours=1))

    rows = pg.execute(
        "SELECT value_numeric, fetched_at FROM surface_metrics ORDER BY fetched_at"
    ).fetchall()
    assert rows == [
        (Decimal("100.0000"), FETCHED),
        (Decimal("100.0000"), FETCHED + timedelta(hours=1)),
    ]
    assert pg.execute("SELECT count(*) FROM ingestion_sessions").fetchone() == (2,)


def test_json_lines_and_pretty_objects_are_read_and_owner_rows_created(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    org = "cccccccc-0000-4000-8000-000000000003"
    path = tmp_path / "mixed.json"
    path.write_text(
        json.dumps(output(row(), user_id=USER_B), indent=2)
        + "\n"
        + json.dumps(output(row(), surface="onlyfans", user_id=USER_A))
        + "\n"
    )

    result = ingest(dsn, path, user_id=None, org_id=org)

    owners = pg.execute(
        "SELECT user_id::text, org_id::text, surface FROM surface_metrics ORDER BY surface"
    ).fetchall()
    assert result.sessions["surface"].to_list() == ["tryst", "onlyfans"]
    assert owners == [(USER_A, org, "onlyfans"), (USER_B, org, "tryst")]
    assert pg.execute("SELECT count(*) FROM users").fetchone() == (2,)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON at line 1"),
        ('{"rows": []}', "field 'surface'"),
        (
            '{"surface": "x", "rows": {}, "next_poll_after_ms": 1, "health_note": ""}',
            "field 'rows'",
        ),
        (
            '{"surface": "x", "rows": [], "next_poll_after_ms": -1, "health_note": ""}',
            "next_poll_after_ms",
        ),
        ('{"surface": "x", "rows": [], "next_poll_after_ms": 1}', "health_note"),
        ("[1, 2]", "not a FetchMetricsOutput object"),
        ("", "is empty"),
    ],
)
def test_object_level_breaches_fail_the_file_and_write_nothing(
    dsn: str, pg: psycopg.Connection, tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)

    with pytest.raises(ContractError, match=message):
        ingest(dsn, path)

    assert pg.execute("SELECT count(*) FROM ingestion_sessions").fetchone() == (0,)


def test_a_user_named_twice_differently_is_refused(dsn: str, tmp_path: Path) -> None:
    path = write(tmp_path, output(row(), user_id=USER_B))

    with pytest.raises(ContractError, match="--user"):
        ingest(dsn, path, user_id=USER_A)


def test_no_user_anywhere_is_a_usage_error(dsn: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--user"):
        ingest(dsn, write(tmp_path, output(row())), user_id=None)


def test_cli_exits_1_on_rejected_rows_unless_allow_partial(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    path = write(tmp_path, output(row(), row("nope")))
    args = ["ingest", "metrics", str(path), "--user", USER_A, "--dsn", dsn]

    failed = CliRunner().invoke(app, args)
    allowed = CliRunner().invoke(app, [*args, "--allow-partial", "--json"])

    assert failed.exit_code == 1
    assert 'object 1 row 2: metric_kind "nope" is not a known kind' in failed.output
    assert allowed.exit_code == 0
    assert json.loads(allowed.output)["rejected"] == 1
    assert pg.execute("SELECT count(*) FROM surface_metrics").fetchone() == (2,)


def test_cli_reads_stdin_and_refuses_strict_with_allow_partial(dsn: str) -> None:
    text = json.dumps(output(row(), note=TIER_NOTE))
    base = ["ingest", "metrics", "-", "--user", USER_A, "--dsn", dsn]

    ok = CliRunner().invoke(app, base, input=text)
    both = CliRunner().invoke(app, [*base, "--strict", "--allow-partial"], input=text)

    assert ok.exit_code == 0
    assert "Standard+" in ok.output
    assert isinstance(both.exception, UsageError)


def test_tenant_sees_only_its_own_metrics_and_sessions(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    ingest(dsn, write(tmp_path, output(row())), user_id=USER_A)
    ingest(dsn, write(tmp_path, output(row(), row("dm_inbound", 4))), user_id=USER_B)

    with pg.transaction():
        pg.execute("SET LOCAL ROLE authenticated")
        pg.execute("SELECT set_config('app.user_id', %s, true)", (USER_A,))
        metrics = pg.execute("SELECT DISTINCT user_id::text FROM surface_metrics").fetchall()
        sessions = pg.execute("SELECT DISTINCT user_id::text FROM ingestion_sessions").fetchall()
        steps = pg.execute("SELECT count(*) FROM ingestion_session_steps").fetchone()

    assert metrics == [(USER_A,)]
    assert sessions == [(USER_A,)]
    assert steps == (5,)


def test_without_a_tenant_setting_nothing_is_visible(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    ingest(dsn, write(tmp_path, output(row())))

    with pg.transaction():
        pg.execute("SET LOCAL ROLE authenticated")
        visible = pg.execute("SELECT count(*) FROM ingestion_sessions").fetchone()
        pg.execute("SELECT set_config('app.user_id', '', true)")
        empty = pg.execute("SELECT count(*) FROM surface_metrics").fetchone()

    assert visible == (0,)
    assert empty == (0,)


def test_authenticated_cannot_write_sessions(dsn: str, pg: psycopg.Connection) -> None:
    with pg.transaction():
        pg.execute("SET LOCAL ROLE authenticated")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            pg.execute("DELETE FROM ingestion_sessions")


@pytest.mark.parametrize(
    ("bad_object", "field"),
    [
        (output(row(value_text="Boost\u0000ed"), surface="x"), "value_text"),
        (output(row(payload_jsonb={"raw": "a\u0000b"}), surface="x"), "payload_jsonb"),
        (output(row(), surface="x\u0000"), "surface"),
        (output(row(), surface="x", note="rate\u0000limited"), "health_note"),
    ],
)
def test_a_nul_character_rejects_its_row_and_the_valid_objects_still_land(
    dsn: str, pg: psycopg.Connection, tmp_path: Path, bad_object: dict[str, Any], field: str
) -> None:
    path = write(tmp_path, output(row()), bad_object)

    result = ingest(dsn, path)

    assert result.inserted == 1
    assert [(r["object"], r["reasons"]) for r in result.rejected.to_dicts()] == [
        (2, ["nul_character"])
    ]
    assert field in result.rejected["detail"][0]
    assert "NUL" in result.rejected["detail"][0]
    assert pg.execute("SELECT surface FROM surface_metrics").fetchall() == [("tryst",)]
    sessions = pg.execute(
        "SELECT status, rows_rejected FROM ingestion_sessions ORDER BY surface"
    ).fetchall()
    assert sorted(sessions) == [("rejected", 1), ("succeeded", 0)]


def test_an_escaped_backslash_before_u0000_is_not_a_nul(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    path = write(tmp_path, output(row(payload_jsonb={"raw": "C:\\u0000"})))

    result = ingest(dsn, path)

    assert (result.inserted, result.rows_rejected) == (1, 0)
