"""``derive prune`` on data spanning 400 days: only rows past retention go, runs agree, idempotent."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pytest
from psycopg.types.json import Jsonb

from derive.config import Rules, load_rules
from derive.io.connect import connect
from derive.jobs.demo import load_demo_data
from derive.jobs.prune import run_prune
from derive.rules import canonical_rules_path
from tests.cli import derive
from tests.db.helpers import run

NOW = datetime.now(UTC).replace(microsecond=0)
DAY = timedelta(days=1)
RETENTION = """[retention]
events_margin_days = 30
system_events_days = 200
payload_days = 90
state_history_days = 100
batch_rows = 500
"""


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    text = canonical_rules_path().read_text()
    path = tmp_path / "rules.toml"
    path.write_text(re.sub(r"\[retention\][^\[]*", RETENTION, text))
    return path


@pytest.fixture
def rules(rules_file: Path) -> Rules:
    return load_rules(rules_file)


def arrange(dsn: str, pg: psycopg.Connection) -> None:
    """400 days of events for 150 users, a derive run at NOW, old audit rows, payloads, history."""
    with connect(dsn) as db:
        load_demo_data(db, users=150, as_of=NOW, rules=load_rules(), days=400, seed=7)
    run(dsn, as_of=NOW)
    # Audit and validation_fail rows as if written long ago (the run wrote them just now).
    pg.execute(
        "UPDATE audience_events SET created_at = created_at - interval '300 days'"
        " WHERE event_category = 'system'"
    )
    user = pg.execute("SELECT id FROM users ORDER BY id LIMIT 1").fetchone()
    assert user is not None
    for day in range(0, 400, 20):
        at = NOW - day * DAY
        pg.execute(
            "INSERT INTO prospect_touchpoints (user_id, surface, touchpoint, external_id,"
            " occurred_at, payload_jsonb, ingestion_source, created_at)"
            " VALUES (%s, 'tryst', 'tip', %s, %s, %s, 'manual', %s)",
            (user[0], f"tip-{day}", at, Jsonb({"amount": 5, "currency": "USD", "note": "hi"}), at),
        )
        pg.execute(
            "INSERT INTO surface_metrics (user_id, surface, metric_kind, window_start, window_end,"
            " value_numeric, source, payload_jsonb, created_at)"
            " VALUES (%s, 'tryst', 'profile_view', %s, %s, 1, 'adapter', %s, %s)",
            (user[0], at - DAY, at, Jsonb({"raw": day}), at),
        )
    for step in range(0, 400, 40):
        as_of = NOW - step * DAY
        pg.execute(
            "INSERT INTO audience_state_history (as_of, user_id, current_state, state_updated_at,"
            " engagement_score) SELECT %s, id, 'S0', %s, 0 FROM users",
            (as_of, as_of),
        )
        pg.execute(
            "INSERT INTO audience_state_history_steps (as_of, origin, step, lookback,"
            " rules_version, users) VALUES (%s, %s, '40 days', '120 days', 'x', 150)",
            (as_of, NOW - 400 * DAY),
        )


def prune(dsn: str, rules: Rules, **options: Any) -> Any:
    with connect(dsn) as db:
        return run_prune(db, rules=rules, **options)


STATE = (
    "SELECT user_id, current_state, engagement_score, last_event_type, last_activity_at,"
    " state_updated_at FROM audience_state ORDER BY user_id"
)


def older_than(pg: psycopg.Connection, cutoffs: dict[str, datetime | None]) -> dict[str, int]:
    """Rows still past each cutoff (payloads: not yet reduced)."""
    queries = {
        "events": "SELECT count(*) FROM audience_events WHERE created_at < %s"
        " AND event_category <> 'system'",
        "system_events": "SELECT count(*) FROM audience_events e WHERE created_at < %s"
        " AND event_category = 'system' AND NOT EXISTS (SELECT 1 FROM audience_state s"
        " WHERE s.metadata ->> 'last_audit_id' = e.id::text)",
        "surface_metric_payloads": "SELECT count(*) FROM surface_metrics WHERE created_at < %s"
        " AND payload_jsonb IS NOT NULL",
        "touchpoint_payloads": "SELECT count(*) FROM prospect_touchpoints WHERE created_at < %s"
        " AND payload_jsonb ? 'note'",
        "state_history": "SELECT count(*) FROM audience_state_history WHERE as_of < %s",
    }
    out = {}
    for name, query in queries.items():
        row = pg.execute(query, (cutoffs[name],)).fetchone()
        assert row is not None
        out[name] = int(row[0])
    return out


def test_prune_removes_only_what_is_past_retention_and_later_runs_agree(
    dsn: str, pg: psycopg.Connection, second_dsn: str, rules: Rules
) -> None:
    arrange(dsn, pg)
    with psycopg.connect(second_dsn, autocommit=True) as control:
        arrange(second_dsn, control)
        planned = prune(dsn, rules, dry_run=True)

        result = prune(dsn, rules)

        cutoffs = result.cutoffs
        assert cutoffs["events"] == NOW - (120 + 30) * DAY
        expected = older_than(control, cutoffs)
        assert result.rows == planned.rows == expected
        assert all(n > 0 for n in expected.values())
        assert older_than(pg, cutoffs) == dict.fromkeys(expected, 0)
        # Nothing younger than its cutoff went.
        younger = (
            "SELECT count(*) FROM audience_events WHERE created_at >= %s",
            (cutoffs["events"],),
        )
        assert pg.execute(*younger).fetchone() == control.execute(*younger).fetchone()
        # A derive run afterwards gives the same states as without retention.
        later = NOW + timedelta(hours=1)
        pruned_run = run(dsn, as_of=later)
        control_run = run(second_dsn, as_of=later)
        assert pg.execute(STATE).fetchall() == control.execute(STATE).fetchall()
        assert pruned_run.counts["users_rejected"] == control_run.counts["users_rejected"]
        assert pruned_run.counts["rejected_by_reason"].get("state_jump", 0) == 0

    again = prune(dsn, rules)

    assert again.rows == dict.fromkeys(expected, 0)
    assert pg.execute(
        "SELECT count(*) FROM audience_state_history_steps WHERE as_of < %s",
        (cutoffs["state_history"],),
    ).fetchone() == (0,)


def test_payloads_keep_what_attribution_reads(
    dsn: str, pg: psycopg.Connection, rules: Rules
) -> None:
    arrange(dsn, pg)

    prune(dsn, rules)

    old = pg.execute(
        "SELECT DISTINCT payload_jsonb FROM prospect_touchpoints WHERE created_at < %s",
        (NOW - 90 * DAY,),
    ).fetchall()
    young = pg.execute(
        "SELECT DISTINCT payload_jsonb FROM prospect_touchpoints WHERE created_at >= %s",
        (NOW - 89 * DAY,),
    ).fetchall()
    assert old == [({"amount": 5, "currency": "USD"},)]
    assert young == [({"amount": 5, "currency": "USD", "note": "hi"},)]


def test_the_archive_holds_exactly_what_was_removed(
    dsn: str, pg: psycopg.Connection, rules: Rules, tmp_path: Path
) -> None:
    arrange(dsn, pg)

    result = prune(dsn, rules, archive=tmp_path / "archive")

    for name, n in result.rows.items():
        files = sorted((tmp_path / "archive" / name).glob("*.parquet"))
        assert sum(pl.read_parquet(f).height for f in files) == n
    events = pl.read_parquet(sorted((tmp_path / "archive" / "events").glob("*.parquet")))
    assert events.height > 500  # several batches of batch_rows
    assert set(events["event_category"]) != {"system"}
    left = pg.execute(
        "SELECT count(*) FROM audience_events WHERE id = ANY(%s::uuid[])",
        (events["id"].to_list(),),
    ).fetchone()
    assert left == (0,)
    payloads = pl.read_parquet(
        sorted((tmp_path / "archive" / "touchpoint_payloads").glob("*.parquet"))
    )
    assert {json.loads(p)["note"] for p in payloads["payload_jsonb"]} == {"hi"}


def test_prune_is_logged_as_a_run(dsn: str, pg: psycopg.Connection, rules: Rules) -> None:
    arrange(dsn, pg)

    result = prune(dsn, rules)

    status, counts, lookback = pg.execute(
        "SELECT status, counts, lookback FROM derivation_runs WHERE run_id = %s", (result.run_id,)
    ).fetchone() or (None, None, None)
    assert status == "succeeded"
    assert counts["rows"] == result.rows
    assert lookback == timedelta(days=120)


def test_a_longer_lookback_in_the_run_log_protects_its_window(
    dsn: str, pg: psycopg.Connection, rules: Rules
) -> None:
    arrange(dsn, pg)
    run(dsn, as_of=NOW, lookback=timedelta(days=300))

    result = prune(dsn, rules)

    assert result.cutoffs["events"] == NOW - (300 + 30) * DAY
    oldest = pg.execute(
        "SELECT min(created_at) FROM audience_events WHERE event_category <> 'system'"
    ).fetchone()
    assert oldest is not None
    assert oldest[0] >= NOW - 330 * DAY


def test_prune_command_dry_run_and_schedule(dsn: str, rules_file: Path) -> None:
    dry = derive("prune", "--dsn", dsn, "--rules", str(rules_file), "--dry-run", "--json")
    schedule = derive("schedule")

    assert dry.returncode == 0, dry.stderr
    payload = json.loads(dry.stdout)
    assert payload["dry_run"] is True
    assert payload["rows"]["events"] == 0
    assert schedule.returncode == 0
    assert "# ---- derive-prune.timer ----" in schedule.stdout
    assert "OnCalendar=*-*-* 03:30:00" in schedule.stdout
    assert re.search(r"^30 3 \* \* \* .* prune >> /var/log/derive/prune.log", schedule.stdout, re.M)
