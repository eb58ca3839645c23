"""Seed 001's SQL entry points: requests recorded in SQL, served by ``derive watch``.

``derive_audience_state(uuid)`` and ``run_audience_derivation_batch(int)`` only record requests and
wake the watcher; the incremental run derives and marks them done with its run id.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from derive.errors import DeriveError
from tests.db import test_watch
from tests.db.helpers import engaged_user, insert_events, run, uid
from tests.db.test_watch import Watch, wait_for_state

watch_factory = test_watch.watch_factory  # the watcher subprocess fixture, shared

FUNCTIONS = (
    "derive_audience_state('00000000-0000-0000-0000-000000000001')",
    "run_audience_derivation_batch(1)",
    "derive_request_status(1)",
)


def as_service_role(pg: psycopg.Connection, sql: str) -> object:
    """One statement as service_role (the way a pg_cron job or an RPC call runs it)."""
    with pg.transaction():
        pg.execute("SET LOCAL ROLE service_role")
        row = pg.execute(f"SELECT {sql}").fetchone()
    assert row is not None
    return row[0]


def quiet_insert(dsn: str, user: uuid.UUID) -> None:
    """An event that wakes nobody (the trigger's notification switched off for the transaction)."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET LOCAL derive.notify = 'off'")
        conn.execute(
            "INSERT INTO audience_events (user_id, session_id, event_type, event_category)"
            " VALUES (%s, 's1', 'scroll_depth_75', 'engagement')",
            (user,),
        )


def request(pg: psycopg.Connection, rid: int) -> tuple[str, uuid.UUID | None, str | None]:
    row = pg.execute("SELECT * FROM derive_request_status(%s)", (rid,)).fetchone()
    assert row is not None
    return row  # type: ignore[return-value]


def wait_done(pg: psycopg.Connection, *, count: int, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = pg.execute(
            "SELECT count(*) FILTER (WHERE status <> 'done'), count(*) FILTER (WHERE status = 'done')"
            " FROM derive_requests"
        ).fetchone()
        assert row is not None
        if row[0] == 0 and row[1] >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"requests not served within {timeout}s")


def test_a_requested_user_is_derived_by_the_watcher_and_the_request_carries_the_run_id(
    dsn: str, pg: psycopg.Connection, watch_factory: Callable[..., Watch]
) -> None:
    watch = watch_factory("--dsn", dsn)
    first = watch.wait_for_line("full run (no base run)")
    user = uuid.UUID(int=0xB1)
    quiet_insert(dsn, user)  # nobody is woken: only the request will be

    requested = time.monotonic()
    rid = as_service_role(pg, f"derive_audience_state('{user}')")
    assert isinstance(rid, int)
    derived = wait_for_state(dsn, user, timeout=15)
    # Recorded, not asserted (about 1.2 s with --debounce 1s on an idle machine).
    print(f"request to derived state: {derived - requested:.3f}s (--debounce 1s)")
    watch.wait_for_line("incremental run", after=first)
    wait_done(pg, count=1)
    assert watch.terminate() == 0

    status, run_id, error = request(pg, rid)
    latest = pg.execute(
        "SELECT run_id FROM derivation_runs WHERE job = 'derive' AND mode = 'incremental'"
        " ORDER BY started_at DESC LIMIT 1"
    ).fetchone()
    assert latest is not None
    assert (status, run_id, error) == ("done", latest[0], None)


def test_a_batch_requests_the_most_recently_active_users_and_the_watcher_serves_them(
    dsn: str, pg: psycopg.Connection, watch_factory: Callable[..., Watch]
) -> None:
    now = datetime.now(UTC)
    rows = []
    for n in range(1, 261):  # user n was last active n minutes ago
        rows.extend(engaged_user(n, as_of=now - timedelta(minutes=n)))
    rows.append(  # a system row is no activity: user 300 stays out of the batch
        {
            "created_at": now,
            "user_id": uid(300),
            "session_id": None,
            "event_type": "state_transition",
            "event_category": "system",
            "metadata": "{}",
        }
    )
    insert_events(pg, rows)
    watch = watch_factory("--dsn", dsn)
    watch.wait_for_line("full run (no base run)")

    assert as_service_role(pg, "run_audience_derivation_batch(250)") == 250
    wait_done(pg, count=250)
    assert watch.terminate() == 0

    requested = {r[0] for r in pg.execute("SELECT user_id FROM derive_requests").fetchall()}
    assert requested == {uid(n) for n in range(1, 251)}
    served = pg.execute(
        "SELECT count(*) FROM derive_requests q JOIN audience_state s USING (user_id)"
        " WHERE q.status = 'done' AND q.run_id IS NOT NULL"
    ).fetchone()
    assert served == (250,)


def test_the_default_batch_is_250(pg: psycopg.Connection) -> None:
    insert_events(pg, [e for n in range(1, 4) for e in engaged_user(n)])
    assert as_service_role(pg, "run_audience_derivation_batch()") == 3


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize("call", FUNCTIONS)
def test_clients_may_not_call_the_entry_points(
    pg: psycopg.Connection, role: str, call: str
) -> None:
    with pg.transaction():
        pg.execute(f'SET LOCAL ROLE "{role}"')
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            pg.execute(f"SELECT {call}")
    assert pg.execute("SELECT count(*) FROM derive_requests").fetchone() == (0,)


@pytest.mark.parametrize(
    "call",
    [
        "derive_audience_state(NULL)",
        "run_audience_derivation_batch(NULL)",
        "derive_request_status(NULL)",
    ],
)
def test_a_null_argument_is_a_clear_sql_error(pg: psycopg.Connection, call: str) -> None:
    with pytest.raises(psycopg.errors.NullValueNotAllowed, match="is null"):
        as_service_role(pg, call)


@pytest.mark.parametrize("limit", [0, -1, -2147483648])
def test_a_batch_of_zero_or_fewer_requests_nobody(pg: psycopg.Connection, limit: int) -> None:
    insert_events(pg, engaged_user(1))
    assert as_service_role(pg, f"run_audience_derivation_batch({limit})") == 0
    assert pg.execute("SELECT count(*) FROM derive_requests").fetchone() == (0,)


def test_a_batch_on_an_empty_database_requests_nobody(pg: psycopg.Connection) -> None:
    assert as_service_role(pg, "run_audience_derivation_batch(250)") == 0


def test_an_unknown_user_is_served_with_nothing_to_derive(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, engaged_user(1))
    run(dsn)
    stranger = uuid.UUID(int=0xDEAD)
    rid = as_service_role(pg, f"derive_audience_state('{stranger}')")
    assert isinstance(rid, int)
    assert request(pg, rid)[0] == "pending"

    report = run(dsn)

    assert request(pg, rid) == ("done", uuid.UUID(report.run_id), None)
    assert pg.execute(
        "SELECT count(*) FROM audience_state WHERE user_id = %s", (stranger,)
    ).fetchone() == (0,)


def test_an_unknown_request_id_has_no_status(pg: psycopg.Connection) -> None:
    with pg.transaction():
        pg.execute("SET LOCAL ROLE service_role")
        assert pg.execute("SELECT * FROM derive_request_status(987654)").fetchall() == []


def test_a_request_wakes_a_listener(dsn: str, pg: psycopg.Connection) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN derive_audience_events")
        as_service_role(pg, f"derive_audience_state('{uid(7)}')")
        got = list(listener.notifies(timeout=5, stop_after=1))
    assert [n.payload for n in got] == [""]


def test_a_run_that_fails_marks_its_requests_failed_with_its_error(
    dsn: str, pg: psycopg.Connection
) -> None:
    # Arrange: a base run, then a request, and a write transaction that the server refuses.
    insert_events(pg, engaged_user(0xC1))
    run(dsn)
    failing = as_service_role(pg, f"derive_audience_state('{uuid.UUID(int=0xC1)}')")
    pg.execute(
        "CREATE FUNCTION refuse_serving() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF NEW.status = 'done' THEN RAISE EXCEPTION 'disk quota exceeded (test)'; END IF;"
        " RETURN NEW; END $$"
    )
    pg.execute(
        "CREATE TRIGGER refuse BEFORE UPDATE ON derive_requests"
        " FOR EACH ROW EXECUTE FUNCTION refuse_serving()"
    )

    # Act
    with pytest.raises(DeriveError, match="disk quota exceeded"):
        run(dsn)
    pg.execute("DROP TRIGGER refuse ON derive_requests")
    later = as_service_role(pg, f"derive_audience_state('{uuid.UUID(int=0xC1)}')")
    run(dsn)

    # Assert: the failed run's request carries that run and its error; a new one is served.
    status, run_id, error = request(pg, int(failing))  # type: ignore[call-overload]
    failed = pg.execute(
        "SELECT run_id FROM derivation_runs WHERE job = 'derive' AND status = 'failed'"
    ).fetchall()
    assert (status, [(run_id,)]) == ("failed", failed)
    assert error is not None
    assert "disk quota exceeded (test)" in error
    assert request(pg, int(later))[0] == "done"  # type: ignore[call-overload]
