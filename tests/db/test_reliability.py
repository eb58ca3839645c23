"""Crash safety, overlapping runs and hostile input, through the real console script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import psycopg

from tests.db.helpers import AS_OF, engaged_user, event, insert_events, run, snapshot


def derive(*args: str) -> subprocess.Popen[str]:
    """Start ``derive ...`` as its own process."""
    return subprocess.Popen(
        [sys.executable, "-m", "derive.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DERIVE_LEASE_SECONDS": str(LEASE)},
    )


#: The killed runs' lease: what the next run waits before it takes over.
LEASE = 2


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def write_blocked(pg: psycopg.Connection) -> bool:
    """A derive backend of this database is inside its write, waiting for a table lock."""
    return bool(
        pg.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%audience_state%'"
            " AND pid <> pg_backend_pid()"
        ).fetchone()
    )


def block_writes(dsn: str) -> psycopg.Connection:
    """Hold a lock that makes the job's upsert wait (the job holds its advisory lock meanwhile)."""
    blocker = psycopg.connect(dsn)
    blocker.execute("LOCK TABLE audience_state IN SHARE MODE")
    return blocker


def population() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for user in range(1, 41):
        rows += engaged_user(user)
        if user % 3 == 0:
            rows.append(
                event(
                    user,
                    "email_subscribe",
                    "subscription",
                    ago=timedelta(hours=30),
                    metadata={"consent_recorded": True},
                )
            )
    return rows


def derived(pg: psycopg.Connection) -> tuple[Any, Any]:
    """States and the audit trail, minus what legitimately differs between runs (ids, times)."""
    state_rows = pg.execute(
        "SELECT user_id, current_state, engagement_score, last_event_type, last_activity_at,"
        " state_updated_at FROM audience_state ORDER BY user_id"
    ).fetchall()
    trail = pg.execute(
        "SELECT user_id, metadata->>'prior_state', metadata->>'new_state',"
        " metadata->'rule_trigger' FROM audience_events WHERE event_type = 'state_change_logged'"
        " ORDER BY user_id, (metadata->>'step')::int"
    ).fetchall()
    return state_rows, trail


def test_sigkill_during_write_leaves_everything_as_before_and_next_run_converges(
    dsn: str, second_dsn: str, pg: psycopg.Connection
) -> None:
    insert_events(pg, population())
    before = snapshot(pg)
    blocker = block_writes(dsn)
    job = derive("run", "--dsn", dsn, "--as-of", AS_OF.isoformat())
    wait_for(lambda: write_blocked(pg), "the run to reach its write")

    job.send_signal(signal.SIGKILL)
    job.communicate()
    blocker.rollback()
    blocker.close()
    wait_for(
        lambda: (
            not write_blocked(pg)
            and not pg.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        ),
        "the killed run's session to end",
    )

    assert snapshot(pg) == before
    time.sleep(LEASE + 0.5)  # the killed run's lease expires: the next run takes over
    run(dsn)
    with psycopg.connect(second_dsn, autocommit=True) as control:
        insert_events(control, population())
        run(second_dsn)
        assert derived(pg) == derived(control)
    statuses = [s for (s,) in pg.execute("SELECT status FROM derivation_runs ORDER BY started_at")]
    assert statuses == ["failed", "succeeded"]
    error = pg.execute("SELECT error FROM derivation_runs WHERE status = 'failed'").fetchone()
    assert error is not None
    assert "lease expired" in error[0]


def test_two_runs_started_together_one_succeeds_the_other_exits_75(
    dsn: str, pg: psycopg.Connection
) -> None:
    insert_events(pg, population())
    blocker = block_writes(dsn)
    first = derive("run", "--dsn", dsn, "--as-of", AS_OF.isoformat())
    wait_for(lambda: write_blocked(pg), "the first run to hold the lock")
    before = snapshot(pg)

    second = derive("run", "--dsn", dsn, "--as-of", AS_OF.isoformat())
    _, second_err = second.communicate(timeout=120)
    after_second = snapshot(pg)
    blocker.rollback()
    blocker.close()
    first.communicate(timeout=120)

    assert second.returncode == 75, second_err
    assert "skipped" in second_err
    assert after_second == before
    assert first.returncode == 0
    statuses = sorted(s for (s,) in pg.execute("SELECT status FROM derivation_runs"))
    assert statuses == ["skipped", "succeeded"]


HOSTILE = [
    event(1, "content_view", "engagement", metadata={"duration_seconds": "abc"}),
    event(1, "content_view", "engagement", metadata={"scroll_depth_percent": True}),
    event(1, "content_view", "engagement", metadata={"duration_seconds": {"v": 1}}),
    event(2, "content_view", "engagement", metadata=[1, 2]),
    event(2, "content_view", "engagement", metadata="just text"),
    event(2, "content_view", "engagement", metadata=None),
    event(3, "made_up", "engagement"),
    event(3, "content_share", "engagement"),
    event(4, "ping", "telemetry"),
    event(None, "content_view", "engagement", session=None),
    event(5, "content_view", "engagement", session=None, metadata={"duration_seconds": 30}),
    event(5, "content_view", "engagement", ago=-timedelta(days=3)),
]


def test_hostile_input_is_counted_and_the_run_completes(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, HOSTILE)
    pg.execute(
        "UPDATE audience_events SET metadata = 'null'::jsonb WHERE user_id = %s"
        " AND metadata = '{}'::jsonb AND event_type = 'content_view'",
        ("00000000-0000-0000-0000-000000000002",),
    )
    pg.execute(
        "INSERT INTO audience_events (user_id, event_type, event_category)"
        " VALUES (NULL, 'content_view', 'engagement')"
    )

    job = derive("run", "--dsn", dsn, "--as-of", AS_OF.isoformat(), "--json")
    out, err = job.communicate(timeout=120)

    assert job.returncode == 0, err
    counts = json.loads(out)["counts"]
    assert counts["events_invalid"] == {
        "malformed_metadata": 6,
        "unknown_category": 1,
        "unknown_event_type": 1,
        "wrong_category": 1,
    }
    assert counts["events_anonymous"] == 1
    assert counts["events_future"] == 2  # the future row, and the row stamped now() by default
    assert counts["rejected_by_reason"] == {"unknown_event_category": 1}


def test_empty_tables_run_cleanly(dsn: str) -> None:
    job = derive("run", "--dsn", dsn, "--json")
    out, err = job.communicate(timeout=120)

    assert job.returncode == 0, err
    counts = json.loads(out)["counts"]
    assert counts["events_read"] == 0
    assert counts["users_evaluated"] == 0


def test_sigkill_during_an_incremental_write_leaves_before_and_the_next_run_converges(
    dsn: str, second_dsn: str, pg: psycopg.Connection
) -> None:
    later = AS_OF + timedelta(minutes=15)
    insert_events(pg, population())
    run(dsn)  # the base
    insert_events(pg, engaged_user(40, as_of=later))
    before = snapshot(pg)
    blocker = block_writes(dsn)
    job = derive("run", "--dsn", dsn, "--as-of", later.isoformat())
    wait_for(lambda: write_blocked(pg), "the incremental run to reach its write")

    job.send_signal(signal.SIGKILL)
    job.communicate()
    blocker.rollback()
    blocker.close()
    wait_for(lambda: not write_blocked(pg), "the killed run's write to end")

    after_kill = snapshot(pg)
    time.sleep(LEASE + 0.5)
    report = run(dsn, as_of=later)
    with psycopg.connect(second_dsn, autocommit=True) as control:
        insert_events(control, population())
        run(second_dsn)
        insert_events(control, engaged_user(40, as_of=later))
        run(second_dsn, as_of=later, full=True)
        assert derived(pg) == derived(control)
    assert after_kill == before
    assert report.mode == "incremental"
    modes = pg.execute("SELECT status, mode FROM derivation_runs ORDER BY started_at").fetchall()
    assert modes == [("succeeded", "full"), ("failed", None), ("succeeded", "incremental")]


def test_the_run_row_is_finished_inside_the_write_transaction(
    dsn: str, pg: psycopg.Connection
) -> None:
    """What the commit makes visible holds the run's final row: a kill -9 right after the commit
    cannot leave the data written and the run row ``running`` (or ``failed`` with no counts).

    A deferred constraint trigger runs at commit time inside the write transaction and records
    the run row as that transaction sees it then.
    """
    # Arrange
    pg.execute("CREATE TABLE seen_at_commit (status text, users_changed text)")
    pg.execute(
        "CREATE FUNCTION record_run_at_commit() RETURNS trigger LANGUAGE plpgsql"
        " SECURITY DEFINER SET search_path = public AS $$ BEGIN"
        " INSERT INTO seen_at_commit SELECT status, counts->>'users_changed' FROM derivation_runs"
        "  WHERE run_id = current_setting('derive.run_id')::uuid;"
        " RETURN NULL; END $$"
    )
    pg.execute(
        "CREATE CONSTRAINT TRIGGER record_run AFTER INSERT OR UPDATE ON audience_state"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION record_run_at_commit()"
    )
    insert_events(pg, [*engaged_user(1), *engaged_user(2)])

    # Act
    report = run(dsn)

    # Assert: both rows' checks saw the run already succeeded, with its counts.
    seen = pg.execute("SELECT status, users_changed FROM seen_at_commit").fetchall()
    assert report.counts["users_changed"] == 2
    assert seen == [("succeeded", "2"), ("succeeded", "2")]
