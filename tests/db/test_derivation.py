"""``derive run`` end to end against a real PostgreSQL: writes, audit, idempotence, fail-safes."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

from derive.errors import LockBusy
from derive.io.connect import connect
from derive.jobs.adopt import adopt
from tests.db.helpers import (
    AS_OF,
    engaged_user,
    event,
    hold_lease,
    insert_events,
    run,
    snapshot,
    states,
    system_rows,
    uid,
)


def test_first_run_writes_states_with_one_audit_row_per_step(
    dsn: str, pg: psycopg.Connection
) -> None:
    insert_events(pg, engaged_user(1))

    report = run(dsn)

    assert states(pg) == {uid(1): "S2"}
    steps = [
        (m["prior_state"], m["new_state"], m["rule_trigger"]["rule"])
        for _, m in system_rows(pg, "state_change_logged")
    ]
    assert steps == [(None, "S0", "first_seen"), ("S0", "S1", "G1"), ("S1", "S2", "G2")]
    assert report.counts["audit_rows"] == 3
    assert report.counts["users_changed"] == 1


def test_audit_rows_carry_run_rules_and_metric_evidence(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, engaged_user(1))

    report = run(dsn)

    _, g2 = system_rows(pg, "state_change_logged")[-1]
    assert g2["run_id"] == report.run_id
    assert g2["rules_version"] == report.rules_version
    assert g2["derived_at"].startswith("2026-06-01T12:00:00")
    assert g2["rule_trigger"]["metrics"]["score"] == 13.0
    stored = pg.execute("SELECT metadata FROM audience_state").fetchone()[0]
    last_audit = pg.execute(
        "SELECT id::text FROM audience_events WHERE event_type = 'state_change_logged'"
        " ORDER BY created_at DESC LIMIT 1"
    ).fetchone()[0]
    assert stored["last_audit_id"] == last_audit
    assert stored["rule_trigger"]["rule"] == "G2"


def test_second_run_with_same_as_of_writes_nothing(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, engaged_user(1) + engaged_user(2) + [event(3, "content_view", "engagement")])
    run(dsn)
    before = snapshot(pg)

    report = run(dsn)

    assert snapshot(pg) == before
    assert report.counts["users_changed"] == 0
    assert report.counts["audit_rows"] == 0


def test_state_persists_and_falls_only_by_retention(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(
        pg,
        [
            *engaged_user(1),
            event(
                1,
                "email_subscribe",
                "subscription",
                ago=timedelta(days=1),
                metadata={"consent_recorded": True},
            ),
        ],
    )
    run(dsn)
    assert states(pg) == {uid(1): "S3"}

    run(dsn, as_of=AS_OF + timedelta(days=20))  # quiet for 3 weeks: gates fail, state persists
    assert states(pg) == {uid(1): "S3"}

    run(dsn, as_of=AS_OF + timedelta(days=46))  # 47 days since the last event: R1
    assert states(pg) == {uid(1): "S2"}
    _, last = system_rows(pg, "state_change_logged")[-1]
    assert (last["prior_state"], last["new_state"], last["rule_trigger"]["rule"]) == (
        "S3",
        "S2",
        "R1",
    )
    assert last["rule_trigger"]["inactivity_days"] == 47


def test_anonymous_rows_are_counted_not_derived(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, [event(None, "content_view", "engagement"), *engaged_user(1)])

    report = run(dsn)

    assert report.counts["events_anonymous"] == 1
    assert set(states(pg)) == {uid(1)}


def test_system_rows_never_count_as_activity(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(
        pg,
        [
            event(
                1,
                "content_view",
                "engagement",
                ago=timedelta(days=30),
                metadata={"duration_seconds": 60},
            ),
            event(1, "state_change_logged", "system", ago=timedelta(hours=1)),
            event(1, "validation_pass", "system", ago=timedelta(hours=1)),
        ],
    )

    report = run(dsn)

    row = pg.execute(
        "SELECT current_state, last_event_type, last_activity_at FROM audience_state"
    ).fetchone()
    assert row[:2] == ("S0", "content_view")
    assert row[2] == AS_OF - timedelta(days=30)
    assert report.counts["events_read"] == 1


def test_user_option_derives_only_those_users(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, engaged_user(1) + engaged_user(2))

    run(dsn, users=[str(uid(2))])

    assert states(pg) == {uid(2): "S2"}


def test_dry_run_changes_nothing(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, engaged_user(1))
    before = snapshot(pg)

    report = run(dsn, dry_run=True)

    assert snapshot(pg) == before
    assert report.counts["users_changed"] == 1  # what it would write
    assert pg.execute("SELECT count(*) FROM derivation_runs").fetchone()[0] == 0


def test_run_is_logged_with_counts_and_timings(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, engaged_user(1))

    report = run(dsn)

    status, counts, timings = pg.execute(
        "SELECT status, counts, timings FROM derivation_runs WHERE run_id = %s", (report.run_id,)
    ).fetchone()
    assert status == "succeeded"
    assert counts["users_evaluated"] == 1
    assert set(timings) >= {"read", "compute", "write"}


def test_overlapping_run_is_skipped_and_changes_nothing(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, engaged_user(1))
    before = snapshot(pg)
    holder = hold_lease(pg, "derive")

    with pytest.raises(LockBusy, match=holder):
        run(dsn)

    assert snapshot(pg) == before
    statuses = pg.execute("SELECT status FROM derivation_runs ORDER BY started_at").fetchall()
    assert statuses == [("running",), ("skipped",)]


# -- fail-safes -----------------------------------------------------------------------------------


def _spam(user: int, n: int) -> list[dict[str, object]]:
    return [
        event(user, "multi_internal_click", "engagement", ago=timedelta(seconds=5 * i + 10))
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("reason", "bad_events"),
    [
        ("unknown_event_category", [event(9, "ping", "telemetry")]),
        ("consent_missing", [event(9, "email_subscribe", "subscription", metadata={})]),
        (
            "consent_missing",
            [event(9, "asset_download", "subscription", metadata={"consent_recorded": "yes"})],
        ),
        ("volume_spike", _spam(9, 501)),
    ],
)
def test_fail_safe_rejects_only_the_affected_user(
    dsn: str, pg: psycopg.Connection, reason: str, bad_events: list[dict[str, object]]
) -> None:
    insert_events(pg, [*engaged_user(1), *engaged_user(9), *bad_events])

    report = run(dsn)

    assert states(pg) == {uid(1): "S2"}
    assert report.counts["rejected_by_reason"] == {reason: 1}
    logged = system_rows(pg, "validation_fail")
    assert [(u, m["reasons"]) for u, m in logged] == [(uid(9), [reason])]
    assert reason in logged[0][1]["evidence"]


def test_volume_spike_needs_more_than_the_limit(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, _spam(9, 500))

    report = run(dsn)

    assert report.counts["users_rejected"] == 0


def test_identical_rejection_is_logged_once_per_day(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, [event(9, "ping", "telemetry", ago=timedelta(days=2))])

    run(dsn)
    run(dsn, as_of=AS_OF + timedelta(hours=23))
    assert len(system_rows(pg, "validation_fail")) == 1

    run(dsn, as_of=AS_OF + timedelta(hours=25))
    assert len(system_rows(pg, "validation_fail")) == 2


def test_new_reason_is_logged_even_within_a_day(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, [event(9, "ping", "telemetry", ago=timedelta(days=2))])
    run(dsn)
    insert_events(pg, [event(9, "email_subscribe", "subscription", ago=timedelta(minutes=1))])

    run(dsn)

    reasons = [m["reasons"] for _, m in system_rows(pg, "validation_fail")]
    assert reasons == [["unknown_event_category"], ["unknown_event_category", "consent_missing"]]


def _silent_edit(pg: psycopg.Connection, user: int, state: str) -> None:
    """A superuser bypassing the guard trigger, as an operator with psql might."""
    with pg.transaction():
        pg.execute("SET LOCAL session_replication_role = replica")
        pg.execute(
            "UPDATE audience_state SET current_state = %s WHERE user_id = %s", (state, uid(user))
        )


def test_state_jump_fires_after_a_silent_superuser_edit(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, engaged_user(1) + engaged_user(2))
    run(dsn)
    _silent_edit(pg, 1, "S5")

    # Found by full runs (and --verify); an incremental run reads only candidate users (SPEC §2.10).
    report = run(dsn, as_of=AS_OF + timedelta(minutes=15), full=True)

    assert report.counts["rejected_by_reason"] == {"state_jump": 1}
    ((user, meta),) = system_rows(pg, "validation_fail")
    assert user == uid(1)
    assert meta["evidence"]["state_jump"] == {
        "stored_state": "S5",
        "audited_state": "S2",
        "last_audit_id": meta["evidence"]["state_jump"]["last_audit_id"],
    }
    assert states(pg)[uid(1)] == "S5"  # rejected: left alone for an operator to look at


def test_adopt_gives_unaudited_states_a_trail_once(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, engaged_user(1))
    run(dsn)
    _silent_edit(pg, 1, "S4")

    with connect(dsn) as db:
        first = adopt(db, as_of=AS_OF)
        second = adopt(db, as_of=AS_OF)
    report = run(dsn, as_of=AS_OF + timedelta(minutes=15))

    assert (first, second) == (1, 0)
    ((_, adopted),) = system_rows(pg, "state_adopted")
    assert adopted["new_state"] == "S4"
    assert report.counts["users_rejected"] == 0
    assert states(pg)[uid(1)] == "S4"


def test_score_only_change_keeps_the_audit_pointer(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, engaged_user(1))
    run(dsn)
    pointer = pg.execute("SELECT metadata->'last_audit_id' FROM audience_state").fetchone()[0]
    insert_events(pg, [event(1, "multi_internal_click", "engagement", ago=timedelta(minutes=5))])

    changed = run(dsn)
    again = run(dsn, as_of=AS_OF + timedelta(minutes=15))

    assert changed.counts["users_changed"] == 1
    assert changed.counts["audit_rows"] == 0
    meta = pg.execute("SELECT metadata FROM audience_state").fetchone()[0]
    assert meta["last_audit_id"] == pointer
    assert meta["rule_trigger"]["rule"] == "G2"
    assert again.counts["users_rejected"] == 0
