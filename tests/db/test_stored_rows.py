"""One bad stored row is that row's problem, never the run's (SPEC §2.3 Robustness).

Any service_role writer can add system rows and edit audience_state metadata; the derivation,
``derive db adopt``, ``derive status`` and ``derive report`` must read past whatever they find:
a malformed system row is ignored where it is read (and counted), a malformed audit pointer is a
``state_jump`` for that user alone.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from derive.config import load_rules
from derive.io import read
from derive.io.connect import connect
from derive.jobs.adopt import adopt
from derive.jobs.prune import run_prune
from derive.jobs.report import collect_report, render_html
from derive.jobs.status import collect_status, openmetrics
from derive.transforms.validate import classify_events
from tests.db.helpers import (
    AS_OF,
    engaged_user,
    event,
    insert_events,
    run,
    states,
    system_rows,
    uid,
)
from tests.db.test_attribution import AS_OF as ATTRIBUTION_AS_OF
from tests.db.test_attribution import DAY, add_touch, attribute, setup_people
from tests.db.test_rollup import AS_OF as ROLLUP_AS_OF
from tests.db.test_rollup import load, rollup, row

BAD_TIMES: list[Any] = [
    "not a time",
    "2026-02-30T00:00:00+00:00",  # no such day
    "2026-06-01T12:00:00+16:00",  # offset out of range
    "12:00:00",  # a time of day, not a point in time
    "infinity",
    "",
    5,
    None,
    {"at": "2026-06-01T12:00:00+00:00"},
    ["2026-06-01T12:00:00+00:00"],
]

BAD_POINTERS: list[Any] = [
    "-" * 36,  # passed the old '[0-9a-f-]{36}' test, then failed the uuid cast (22P02)
    "gggggggg-gggg-gggg-gggg-gggggggggggg",
    "0123456789abcdef0123456789abcdef0123",
    "not-a-uuid",
    12345,
    ["00000000-0000-0000-0000-000000000001"],
]


def insert_as_service_role(pg: psycopg.Connection, rows: list[dict[str, Any]]) -> None:
    """System rows written as any service_role client could (no derive run involved)."""
    with pg.transaction():
        pg.execute("SET LOCAL ROLE service_role")
        for row in rows:
            pg.execute(
                "INSERT INTO audience_events (created_at, user_id, event_type, event_category,"
                " metadata) VALUES (%s, %s, %s, 'system', %s::jsonb)",
                (row["created_at"], row["user_id"], row["event_type"], json.dumps(row["metadata"])),
            )


def forged_rejection(
    user: int, derived_at: Any, *, reasons_key: str = "volume_spike"
) -> dict[str, Any]:
    return {
        "created_at": AS_OF - timedelta(minutes=5),
        "user_id": uid(user),
        "event_type": "validation_fail",
        "metadata": {
            "reasons": ["volume_spike"],
            "reasons_key": reasons_key,
            "derived_at": derived_at,
        },
    }


def forge_pointer(pg: psycopg.Connection, user: int, pointer: Any) -> None:
    """Overwrite a stored audit pointer, bypassing the guard as an operator with psql might."""
    with pg.transaction():
        pg.execute("SET LOCAL session_replication_role = replica")
        pg.execute(
            "UPDATE audience_state SET metadata = jsonb_set(metadata, '{last_audit_id}', %s::jsonb)"
            " WHERE user_id = %s",
            (json.dumps(pointer), uid(user)),
        )


def forged_run(pg: psycopg.Connection, *, counts: str = "{}", args: str = "{}") -> None:
    """A run row with any counts and args, as service_role can make through derive's functions."""
    with pg.transaction():
        pg.execute("SET LOCAL ROLE service_role")
        run_id, token, _, _ = pg.execute(
            "SELECT * FROM derive_start_run('derive', 'derive', now(), interval '120 days', 'x',"
            " %s::jsonb, 60)",
            (args,),
        ).fetchone()
        pg.execute(
            "SELECT derive_finish_run(%s, %s, 'succeeded', %s::jsonb, '{}', NULL, '{}')",
            (run_id, token, counts),
        )


# -- validation_fail rows with a malformed derived_at ------------------------------------------------


@pytest.mark.parametrize("derived_at", BAD_TIMES, ids=repr)
def test_a_validation_fail_row_with_a_malformed_derived_at_is_ignored_and_counted(
    dsn: str, pg: psycopg.Connection, derived_at: Any
) -> None:
    insert_events(pg, [*engaged_user(1), event(2, "ping", "telemetry")])
    insert_as_service_role(pg, [forged_rejection(1, derived_at)])

    report = run(dsn)

    assert report.counts["system_rows_malformed"] == 1
    assert states(pg) == {uid(1): "S2"}
    logged = [(u, m["reasons"]) for u, m in system_rows(pg, "validation_fail")]
    assert (uid(2), ["unknown_event_category"]) in logged


def test_a_malformed_row_does_not_hide_a_well_formed_one(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, [event(2, "ping", "telemetry")])
    run(dsn)
    insert_as_service_role(pg, [forged_rejection(2, "not a time", reasons_key="x")])

    again = run(dsn, as_of=AS_OF + timedelta(minutes=15))

    assert again.counts["system_rows_malformed"] == 1
    assert again.counts["rejections_logged"] == 0  # the real row of the first run still counts


def test_well_formed_system_rows_are_not_counted_as_malformed(
    dsn: str, pg: psycopg.Connection
) -> None:
    insert_events(pg, [*engaged_user(1), event(2, "ping", "telemetry")])
    run(dsn)

    again = run(dsn, as_of=AS_OF + timedelta(minutes=15))

    assert again.counts["system_rows_malformed"] == 0


@pytest.mark.parametrize("derived_at", BAD_TIMES, ids=repr)
def test_report_ignores_and_counts_system_rows_with_a_malformed_derived_at(
    dsn: str, pg: psycopg.Connection, derived_at: Any
) -> None:
    insert_events(pg, [*engaged_user(1), event(2, "ping", "telemetry")])
    run(dsn)
    transition = {
        "created_at": AS_OF,
        "user_id": uid(1),
        "event_type": "state_change_logged",
        "metadata": {"prior_state": "S2", "new_state": "S3", "derived_at": derived_at},
    }
    insert_as_service_role(pg, [forged_rejection(3, derived_at), transition])

    with connect(dsn) as db:
        data = collect_report(db, as_of=AS_OF + timedelta(hours=1), days=7)

    assert data.malformed_rows == 2
    assert data.top_rejected.get_column("user_id").to_list() == [str(uid(2))]
    assert int(data.transition_totals.get_column("n").sum()) == 3  # S0, S0->S1, S1->S2 of user 1


# -- audit pointers that are not uuids ------------------------------------------------------------------


@pytest.mark.parametrize("pointer", BAD_POINTERS, ids=repr)
def test_a_malformed_audit_pointer_is_a_state_jump_for_that_user_alone(
    dsn: str, pg: psycopg.Connection, pointer: Any
) -> None:
    insert_events(pg, engaged_user(1) + engaged_user(2))
    run(dsn)
    forge_pointer(pg, 1, pointer)
    insert_events(pg, [event(2, "content_share", "advocacy", ago=timedelta(minutes=1))])

    report = run(dsn, as_of=AS_OF + timedelta(minutes=15), full=True)  # silent edits: full runs

    assert report.counts["rejected_by_reason"] == {"state_jump": 1}
    ((user, meta),) = system_rows(pg, "validation_fail")
    assert user == uid(1)
    assert meta["reasons"] == ["state_jump"]
    assert report.counts["users_changed"] == 1  # user 2 is derived as usual (a new score)
    last = pg.execute("SELECT last_event_type FROM audience_state WHERE user_id = %s", (uid(2),))
    assert last.fetchone() == ("content_share",)


@pytest.mark.parametrize("pointer", BAD_POINTERS, ids=repr)
def test_adopt_gives_a_state_with_a_malformed_pointer_a_trail(
    dsn: str, pg: psycopg.Connection, pointer: Any
) -> None:
    insert_events(pg, engaged_user(1) + engaged_user(2))
    run(dsn)
    forge_pointer(pg, 1, pointer)

    with connect(dsn) as db:
        adopted = adopt(db, as_of=AS_OF)
    report = run(dsn, as_of=AS_OF + timedelta(minutes=15))

    assert adopted == 1
    ((user, _),) = system_rows(pg, "state_adopted")
    assert user == uid(1)
    assert report.counts["users_rejected"] == 0


# -- run rows written by someone else -----------------------------------------------------------------


FORGED_RUNS: list[dict[str, Any]] = [
    {"counts": {"users_changed": "many", "users_rejected": [1]}},
    {"counts": {"users_changed": 1e30, "users_rejected": 1.5}},
    {"counts": {"users_changed": True}},
    {"args": {"users": "all of them"}},
    {"args": {"users": {"a": 1}}},
    {"args": ["users"]},
    {"counts": ["users_changed"]},
]


@pytest.mark.parametrize("forged", FORGED_RUNS, ids=repr)
def test_status_and_report_read_past_a_run_row_with_malformed_counts_or_args(
    dsn: str, pg: psycopg.Connection, forged: dict[str, Any]
) -> None:
    insert_events(pg, engaged_user(1))
    run(dsn)
    forged_run(
        pg, counts=json.dumps(forged.get("counts", {})), args=json.dumps(forged.get("args", {}))
    )

    with connect(dsn) as db:
        status = collect_status(db, max_lag=timedelta(days=1000))
        data = collect_report(db, as_of=None, days=7)

    newest = status.runs.row(0, named=True)
    assert newest["users_changed"] is None or isinstance(newest["users_changed"], int)
    assert status.runs.height == 2
    assert data.runs.height >= 1
    assert "derive_healthy" in openmetrics(status)
    with connect(dsn) as db:
        pruned = run_prune(db, rules=load_rules(), dry_run=True)
    assert pruned.dry_run


def test_a_forged_run_row_with_a_huge_lookback_does_not_stop_the_prune(
    dsn: str, pg: psycopg.Connection
) -> None:
    # derive_start_run refuses such a lookback now (migration 0008); a row written before that, or
    # by the table's owner, is still read safely.
    pg.execute(
        "INSERT INTO derivation_runs (job, as_of, lookback, rules_version, status, finished_at)"
        " VALUES ('derive', now(), interval '100000 years', 'x', 'succeeded', now())"
    )

    with connect(dsn) as db:
        pruned = run_prune(db, rules=load_rules(), dry_run=True)

    assert pruned.lookback == timedelta(days=120)  # the default window, not 100000 years


@pytest.mark.parametrize(
    "counts",
    ["[1, 2]", '"text"', "5", "[" * 5000 + "]" * 5000],  # Python's json stops at ~1000 levels
    ids=["array", "string", "number", "nested-5000"],
)
def test_openmetrics_reads_past_last_counts_that_are_not_an_object(
    dsn: str, pg: psycopg.Connection, counts: str
) -> None:
    forged_run(pg, counts=counts)

    with connect(dsn) as db:
        text = openmetrics(collect_status(db, max_lag=timedelta(days=1)))

    assert "derive_healthy 1" in text


# -- metadata numbers and booleans, as read from real rows (SPEC §2.2) --------------------------------


def classified(dsn: str) -> dict[str, tuple[str | None, float, float]]:
    """session_id -> (invalid_reason, duration, scroll_depth) of every event, as a run reads them."""
    with connect(dsn) as db:
        read.begin_snapshot(db)
        read.set_window(db, as_of=AS_OF, lookback=timedelta(days=120), relog_after=timedelta(1))
        events = read.read_events(db)
        db.rollback()
    result = classify_events(events.lazy(), rules=load_rules()).collect()
    return {
        r["session_id"]: (r["invalid_reason"], r["duration"], r["scroll_depth"])
        for r in result.iter_rows(named=True)
    }


NOT_NUMBERS: list[Any] = ["20", "abc", "", True, False, None, [20], {"value": 20}]


@pytest.mark.parametrize("key", ["duration_seconds", "scroll_depth_percent"])
def test_only_a_json_number_is_a_number_in_stored_metadata(
    dsn: str, pg: psycopg.Connection, key: str
) -> None:
    values: list[Any] = [*NOT_NUMBERS, 20, 20.5, -5, 0, 0.0]
    rows = [
        event(1, "content_view", "engagement", session=f"s{i}", metadata={key: v})
        for i, v in enumerate(values)
    ]
    rows.append(event(1, "content_view", "engagement", session="huge", metadata={}))
    rows.append(event(1, "content_view", "engagement", session="missing", metadata={}))
    insert_events(pg, rows)
    # A JSON number beyond float64 (Python's encoder cannot write it): not a finite number.
    pg.execute(
        "UPDATE audience_events SET metadata = jsonb_build_object(%s::text, 1e400::numeric)"
        " WHERE session_id = 'huge'",
        (key,),
    )

    result = classified(dsn)

    malformed = {f"s{i}" for i in range(len(NOT_NUMBERS))} | {"huge"}
    assert {s for s, (reason, _, _) in result.items() if reason} == malformed
    column = 1 if key == "duration_seconds" else 2
    numbers = {s: v[column] for s, v in result.items() if s not in malformed}
    start = len(NOT_NUMBERS)
    assert numbers == {
        f"s{start}": 20.0,
        f"s{start + 1}": 20.5,
        f"s{start + 2}": -5.0,
        f"s{start + 3}": 0.0,
        f"s{start + 4}": 0.0,
        "missing": 0.0,
    }


@pytest.mark.parametrize("consent", ["true", "yes", 1, None, [True], {"value": True}])
def test_consent_recorded_must_be_a_json_boolean_in_stored_metadata(
    dsn: str, pg: psycopg.Connection, consent: Any
) -> None:
    rows = [*engaged_user(1), *engaged_user(2)]
    rows.append(event(1, "email_subscribe", "subscription", metadata={"consent_recorded": consent}))
    rows.append(event(2, "email_subscribe", "subscription", metadata={"consent_recorded": True}))
    insert_events(pg, rows)

    report = run(dsn)

    assert report.counts["rejected_by_reason"] == {"consent_missing": 1}
    ((user, _),) = system_rows(pg, "validation_fail")
    assert user == uid(1)
    assert states(pg) == {uid(2): "S3"}  # the rejected new user gets no state this run


# -- other stored JSON read by the jobs -------------------------------------------------------------


@pytest.mark.parametrize("amount", ["1e200000", "9" * 200_000, "1e-20000"])
def test_a_stored_amount_beyond_numeric_is_a_bad_amount_not_a_failed_attribution(
    dsn: str, pg: psycopg.Connection, amount: str
) -> None:
    user, prospect = setup_people(pg)
    add_touch(pg, user, prospect, surface="x", kind="dm_inbound", at=ATTRIBUTION_AS_OF - 2 * DAY)
    add_touch(
        pg,
        user,
        prospect,
        surface="x",
        kind="tip",
        at=ATTRIBUTION_AS_OF - DAY,
        payload={"amount": amount, "currency": "USD"},
    )

    report = attribute(dsn, models=("linear",))

    assert report.counts["conversions_bad_amount"] == 1
    assert report.counts["conversions"] == 1


@pytest.mark.parametrize("value", ["1e20", "-1e15", "123456789012345.5"])
def test_a_stored_breakdown_value_beyond_numeric_18_4_is_repaired_by_the_next_rollup(
    dsn: str, pg: psycopg.Connection, tmp_path: Path, value: str
) -> None:
    load(dsn, tmp_path, "tryst", row("profile_view", 120))
    load(dsn, tmp_path, "onlyfans", row("profile_view", 30))
    rollup(dsn)
    pg.execute(
        "UPDATE metric_aggregate_rows SET computed_stale_after = %s,"
        f' surface_breakdown = \'{{"tryst": {value}, "onlyfans": 30}}\'::jsonb',
        (ROLLUP_AS_OF,),
    )
    later = ROLLUP_AS_OF + timedelta(hours=1)
    load(dsn, tmp_path, "onlyfans", row("profile_view", 31), fetched_at=later)  # sources advance

    rollup(dsn, as_of=later + timedelta(minutes=1))

    ((breakdown,),) = pg.execute("SELECT surface_breakdown FROM metric_aggregates").fetchall()
    assert breakdown == {"onlyfans": 31, "tryst": 120}


def test_report_shows_evidence_nested_past_pythons_recursion_limit_as_text(
    dsn: str, pg: psycopg.Connection
) -> None:
    insert_events(pg, [event(2, "ping", "telemetry")])
    run(dsn)
    deep = "[" * 5000 + "]" * 5000
    pg.execute(
        "UPDATE audience_events SET metadata = jsonb_set(metadata, '{evidence}', %s::jsonb)"
        " WHERE event_type = 'validation_fail'",
        (deep,),
    )

    with connect(dsn) as db:
        data = collect_report(db, as_of=AS_OF + timedelta(hours=1), days=7)
    page = render_html(data)

    assert "[[[[" in page
