"""Incremental runs (SPEC §2.10) against a real PostgreSQL: the same tables as full runs.

The contract is equality: after any history of inserts and runs at increasing as_of, the tables
written by incremental runs equal those written by full runs at the same as_of points (states,
scores, last types, last_activity_at, audit and validation_fail rows, up to ids, run ids and wall
clock times). Two databases from one template, one driven each way.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derive.config import load_rules
from derive.io.connect import connect
from derive.jobs import derivation
from derive.jobs.derivation import verify_derivation
from tests.cli import derive
from tests.db.helpers import AS_OF, engaged_user, event, insert_events, run, states, uid

DAY = timedelta(days=1)
LOOKBACK = timedelta(days=120)


def derived_tables(pg: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """What runs write, without ids, run ids and wall-clock times."""
    return {
        "states": pg.execute(
            "SELECT user_id, current_state, engagement_score, last_event_type, last_activity_at,"
            " state_updated_at, metadata -> 'metrics', metadata -> 'rule_trigger'"
            " FROM audience_state ORDER BY user_id"
        ).fetchall(),
        "audit": pg.execute(
            "SELECT user_id, metadata ->> 'prior_state', metadata ->> 'new_state',"
            " metadata -> 'rule_trigger', metadata ->> 'derived_at', metadata ->> 'step'"
            " FROM audience_events WHERE event_type = 'state_change_logged'"
            " ORDER BY user_id, metadata ->> 'derived_at', (metadata ->> 'step')::int"
        ).fetchall(),
        "validation_fail": pg.execute(
            "SELECT user_id, metadata ->> 'reasons_key', metadata -> 'evidence',"
            " metadata ->> 'derived_at' FROM audience_events WHERE event_type = 'validation_fail'"
            " ORDER BY user_id, metadata ->> 'derived_at'"
        ).fetchall(),
        "rejected": pg.execute(
            "SELECT user_id, reasons_key FROM derive_rejected_users ORDER BY user_id"
        ).fetchall(),
    }


def modes(pg: psycopg.Connection) -> list[tuple[str, str | None]]:
    return pg.execute(
        "SELECT mode, full_reason FROM derivation_runs WHERE status = 'succeeded'"
        " ORDER BY started_at"
    ).fetchall()


@pytest.fixture
def pair(
    dsn: str, second_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str, psycopg.Connection, psycopg.Connection]]:
    """(incremental db, full db) with superuser connections; the incremental path never falls
    back to reading the whole window (it would hide the candidate read from these tests), and
    reads the candidates' windows in two halves on two connections from two users on."""
    monkeypatch.setattr(derivation, "FULL_READ_SHARE", 1e9)
    monkeypatch.setattr(derivation, "SPLIT_READ_USERS", 2)
    with (
        psycopg.connect(dsn, autocommit=True) as inc,
        psycopg.connect(second_dsn, autocommit=True) as full,
    ):
        yield dsn, second_dsn, inc, full


def both(pair: tuple[str, str, psycopg.Connection, psycopg.Connection], rows: list[Any]) -> None:
    """The same rows, ids included, into both databases: events at one instant are ordered by id
    (last_event_type, dedupe), so ids the databases drew apart would order them differently."""
    rows = [{**row, "id": uuid.uuid4()} for row in rows]
    for conn in (pair[2], pair[3]):
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO audience_events (id, created_at, user_id, session_id, event_type,"
                " event_category, metadata) VALUES (%(id)s, %(created_at)s, %(user_id)s,"
                " %(session_id)s, %(event_type)s, %(event_category)s, %(metadata)s::jsonb)",
                rows,
            )


def step(
    pair: tuple[str, str, psycopg.Connection, psycopg.Connection], as_of: Any, **kw: Any
) -> None:
    """One run at ``as_of`` on each database (incremental vs full), then compare."""
    run(pair[0], as_of=as_of, **kw)
    run(pair[1], as_of=as_of, full=True, **kw)
    assert derived_tables(pair[2]) == derived_tables(pair[3])


# -- the property ----------------------------------------------------------------------------------

SMALL_SPIKES = (
    (Path(__file__).parents[2] / "derive" / "rules" / "canonical.toml")
    .read_text()
    .replace("spike_max_events_per_hour = 500", "spike_max_events_per_hour = 4")
)

KINDS = [
    ("scroll_depth_75", "engagement", {}),
    ("content_view", "engagement", {"duration_seconds": 25}),
    ("content_view", "engagement", {}),
    ("long_form_completion", "engagement", {}),
    ("repeat_session_30d", "retention", {}),
    ("email_subscribe", "subscription", {"consent_recorded": True}),
    ("email_subscribe", "subscription", {}),  # consent_missing
    ("content_share", "advocacy", {}),
    ("referral_click", "advocacy", {}),
    ("utm_landing", "attribution", {}),  # weight 0: moves last_activity_at only
    ("ping", "telemetry", {}),  # unknown category
    ("made_up", "engagement", {}),  # invalid, discarded
    ("content_view", "engagement", {"duration_seconds": "abc"}),  # malformed
]
OFFSETS = [
    timedelta(minutes=-1),
    timedelta(minutes=-10),
    -2 * DAY,
    -7 * DAY + timedelta(minutes=5),
    -29 * DAY,
    -44 * DAY - timedelta(hours=23, minutes=50),
    -60 * DAY,
    -LOOKBACK + timedelta(minutes=10),  # leaves the window at the next 15-minute run
    -LOOKBACK - timedelta(minutes=1),  # already outside
    timedelta(minutes=10),  # in the future: enters the window later
    DAY,
]
ADVANCES = [timedelta(0), timedelta(minutes=15), DAY, 10 * DAY, 46 * DAY]

inserts = st.lists(
    st.tuples(
        st.integers(1, 4),  # user
        st.sampled_from(range(len(KINDS))),
        st.sampled_from(OFFSETS),
        st.sampled_from(["s1", "s2", None]),
        st.integers(1, 6),  # burst: copies one second apart (dedupe, spikes)
    ),
    min_size=0,
    max_size=6,
)
histories = st.lists(st.tuples(inserts, st.sampled_from(ADVANCES)), min_size=1, max_size=5)


def _rows(batch: list[tuple[int, int, timedelta, str | None, int]], now: Any) -> list[Any]:
    rows = []
    for user, kind, offset, session, copies in batch:
        event_type, category, metadata = KINDS[kind]
        for i in range(copies):
            ago = -(offset + timedelta(seconds=i))
            rows.append(
                event(
                    user,
                    event_type,
                    category,
                    ago=ago,
                    session=session,
                    metadata=metadata,
                    as_of=now,
                )
            )
    return rows


def _reset(pg: psycopg.Connection) -> None:
    pg.execute("SET session_replication_role = replica")  # the guard's truncate trigger too
    pg.execute(
        "TRUNCATE audience_events, audience_state, derivation_runs, derive_run_writes,"
        " derive_rejected_users, derive_requests, audience_event_changes"
    )
    pg.execute("RESET session_replication_role")


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=histories)
def test_incremental_runs_write_the_same_tables_as_full_runs(
    pair: tuple[str, str, psycopg.Connection, psycopg.Connection],
    tmp_path_factory: pytest.TempPathFactory,
    history: list[tuple[list[Any], timedelta]],
) -> None:
    rules_file = tmp_path_factory.mktemp("rules") / "rules.toml"
    rules_file.write_text(SMALL_SPIKES)
    rules = load_rules(rules_file)
    _reset(pair[2])
    _reset(pair[3])
    as_of = AS_OF
    run(pair[0], as_of=as_of, rules=rules)  # the base (full: nothing to build on yet)
    run(pair[1], as_of=as_of, rules=rules, full=True)
    for batch, advance in history:
        both(pair, _rows(batch, as_of))
        as_of = as_of + advance
        step(pair, as_of, rules=rules)

    assert all(mode == "incremental" for mode, _ in modes(pair[2])[1:])


def test_rows_of_a_transaction_open_while_the_base_read_are_derived_by_the_next_run(
    pair: tuple[str, str, psycopg.Connection, psycopg.Connection],
) -> None:
    both(pair, engaged_user(1))
    step(pair, AS_OF)
    # A transaction that started before the next run reads (its xid is below that run's
    # snapshot xmax) and commits after it: its back-dated row is invisible to that run.
    late = psycopg.connect(pair[0])
    late.execute("SELECT pg_current_xact_id()")
    insert_events(late, engaged_user(2, as_of=AS_OF - 30 * DAY))
    with psycopg.connect(pair[1], autocommit=True) as control:
        insert_events(control, engaged_user(2, as_of=AS_OF - 30 * DAY))

    run(pair[0], as_of=AS_OF + timedelta(minutes=15))
    before_commit = states(pair[2])
    late.commit()
    late.close()
    run(pair[0], as_of=AS_OF + timedelta(minutes=30))
    run(pair[1], as_of=AS_OF + timedelta(minutes=30), full=True)

    assert uid(2) not in before_commit
    assert uid(2) in states(pair[2])
    assert derived_tables(pair[2]) == derived_tables(pair[3])


def test_a_transaction_committing_during_the_read_is_found_by_the_next_run(
    pair: tuple[str, str, psycopg.Connection, psycopg.Connection],
) -> None:
    # Concurrency for real: inserts commit from another thread while runs read.
    both(pair, engaged_user(1))
    step(pair, AS_OF)
    stop = threading.Event()

    def writer() -> None:
        n = 10
        with psycopg.connect(pair[0], autocommit=True) as conn:
            while not stop.is_set() and n < 60:
                insert_events(conn, [event(n, "scroll_depth_75", "engagement", ago=3 * DAY)])
                n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    for k in range(1, 4):
        run(pair[0], as_of=AS_OF + k * timedelta(minutes=15))
    stop.set()
    thread.join()
    run(pair[0], as_of=AS_OF + timedelta(hours=1))
    rows = (
        pair[2]
        .execute(
            "SELECT created_at, user_id, session_id, event_type, event_category, metadata::text"
            " FROM audience_events WHERE event_category <> 'system'"
        )
        .fetchall()
    )
    insert_events(
        pair[3],
        [
            {
                "created_at": c,
                "user_id": u,
                "session_id": s,
                "event_type": t,
                "event_category": cat,
                "metadata": m,
            }
            for c, u, s, t, cat, m in rows
            if u != uid(1)
        ],
    )
    run(pair[1], as_of=AS_OF + timedelta(hours=1), full=True)

    assert states(pair[2]) == states(pair[3])


# -- each candidate reason at its boundary ---------------------------------------------------------


@pytest.mark.parametrize(
    ("ago", "score"),
    [
        (LOOKBACK, 14),  # exactly at t1 - lookback: still in the window
        (LOOKBACK + timedelta(microseconds=1), 10),  # just before it: has left
        # exactly at t0 - lookback: in the base's window, gone by t1 (the first row to leave)
        (LOOKBACK + timedelta(minutes=15), 10),
    ],
)
def test_an_event_leaving_the_window_at_its_edge(
    pair: tuple[str, str, psycopg.Connection, psycopg.Connection], ago: timedelta, score: int
) -> None:
    t1 = AS_OF + timedelta(minutes=15)
    rows = [
        event(1, "long_form_completion", "engagement", ago=ago, as_of=t1),
        event(1, "long_form_completion", "engagement", ago=DAY, as_of=t1),
        event(1, "long_form_completion", "engagement", ago=2 * DAY, as_of=t1),
        event(1, "multi_internal_click", "engagement", ago=3 * DAY, as_of=t1),
    ]
    both(pair, rows)
    step(pair, AS_OF)  # the base: the edge event is inside either way

    step(pair, t1)

    (stored,) = pair[2].execute("SELECT engagement_score FROM audience_state").fetchone()
    assert stored == score


@pytest.mark.parametrize(("days", "expected"), [(45, "S2"), (44.99, "S3")])
def test_a_retention_threshold_crossed_between_runs(
    pair: tuple[str, str, psycopg.Connection, psycopg.Connection], days: float, expected: str
) -> None:
    t1 = AS_OF + timedelta(minutes=15)
    last = t1 - timedelta(days=days)
    consent = {"consent_recorded": True}
    both(
        pair,
        [
            *engaged_user(1, as_of=last),
            event(
                1, "email_subscribe", "subscription", ago=timedelta(0), as_of=last, metadata=consent
            ),
        ],
    )
    step(pair, last + timedelta(minutes=1))  # climbs to S3 while active
    step(pair, AS_OF)  # 15 minutes before the crossing: still S3
    assert states(pair[2])[uid(1)] == "S3"

    step(pair, t1)

    assert states(pair[2])[uid(1)] == expected
    (retention,) = (
        pair[2]
        .execute(
            "SELECT counts -> 'candidates' ->> 'retention' FROM derivation_runs WHERE as_of = %s",
            (t1,),
        )
        .fetchone()
    )
    assert retention == ("1" if expected == "S2" else "0")


def test_a_rejected_user_is_accepted_once_the_spike_leaves_the_window(
    pair: tuple[str, str, psycopg.Connection, psycopg.Connection],
) -> None:
    # 501 events within 9 minutes, 10-18 minutes before they leave the window.
    edge = LOOKBACK - timedelta(minutes=10)
    spike = [
        event(1, "multi_internal_click", "engagement", ago=edge - timedelta(seconds=i))
        for i in range(501)
    ]
    both(pair, [*spike, *engaged_user(1)])
    step(pair, AS_OF)
    assert uid(1) not in states(pair[2])

    step(pair, AS_OF + timedelta(minutes=15))

    assert states(pair[2])[uid(1)] == "S2"
    # Found as rejected (reason 5), not only because its spike left the window (reason 3).
    (candidates,) = pair[2].execute(
        "SELECT counts -> 'candidates' FROM derivation_runs WHERE mode = 'incremental'"
        " ORDER BY started_at DESC LIMIT 1"
    ).fetchone() or (None,)
    assert candidates["rejected"] == 1
    assert candidates["left"] == 1


def test_a_rejection_is_logged_again_after_24_hours_without_new_events(
    pair: tuple[str, str, psycopg.Connection, psycopg.Connection],
) -> None:
    both(pair, [event(1, "ping", "telemetry", ago=DAY)])
    step(pair, AS_OF)
    step(pair, AS_OF + timedelta(hours=23))  # within 24 h: not logged again

    step(pair, AS_OF + timedelta(hours=24, minutes=1))

    assert len(derived_tables(pair[2])["validation_fail"]) == 2


def test_a_back_dated_insert_after_the_base_is_derived(
    pair: tuple[str, str, psycopg.Connection, psycopg.Connection],
) -> None:
    step(pair, AS_OF)
    both(pair, engaged_user(7, as_of=AS_OF - 90 * DAY + 3 * DAY))

    step(pair, AS_OF + timedelta(minutes=15))

    (counts,) = (
        pair[2]
        .execute("SELECT counts -> 'candidates' FROM derivation_runs WHERE mode = 'incremental'")
        .fetchone()
    )
    assert counts["new_rows"] == 1
    assert uid(7) in states(pair[2])


def test_an_event_stamped_in_the_future_enters_the_window_with_time(
    pair: tuple[str, str, psycopg.Connection, psycopg.Connection],
) -> None:
    both(pair, [event(3, "scroll_depth_75", "engagement", ago=-timedelta(minutes=10))])
    step(pair, AS_OF)
    assert uid(3) not in states(pair[2])

    step(pair, AS_OF + timedelta(minutes=15))

    assert states(pair[2])[uid(3)] == "S1"


def test_deleted_and_updated_events_are_found(
    pair: tuple[str, str, psycopg.Connection, psycopg.Connection],
) -> None:
    both(pair, [*engaged_user(1), *engaged_user(2)])
    step(pair, AS_OF)
    for pg in pair[2:]:
        pg.execute(
            "DELETE FROM audience_events WHERE user_id = %s AND event_type = 'scroll_depth_75'",
            (uid(1),),
        )
        pg.execute(
            "UPDATE audience_events SET event_type = 'utm_landing', event_category = 'attribution'"
            " WHERE user_id = %s AND event_type = 'video_completion_75'",
            (uid(2),),
        )

    step(pair, AS_OF + timedelta(minutes=15))


def test_an_incremental_run_with_nothing_new_writes_nothing(
    pair: tuple[str, str, psycopg.Connection, psycopg.Connection],
) -> None:
    both(pair, [*engaged_user(1), *engaged_user(2)])
    step(pair, AS_OF)

    report = run(pair[0], as_of=AS_OF + timedelta(minutes=15))

    assert report.mode == "incremental"
    assert report.counts["users_evaluated"] == 0
    assert report.counts["candidates"]["total"] == 0
    assert report.after == report.before


def test_too_many_candidates_read_the_whole_window_and_release_the_waiting_sibling(
    pair: tuple[str, str, psycopg.Connection, psycopg.Connection],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    both(pair, [*engaged_user(1), *engaged_user(2)])
    step(pair, AS_OF)
    both(pair, [event(1, "content_share", "advocacy", ago=timedelta(minutes=5))])
    monkeypatch.setattr(derivation, "FULL_READ_SHARE", 0.0)  # any candidate is too many

    step(pair, AS_OF + timedelta(minutes=15))

    counts = (
        pair[2]
        .execute(
            "SELECT counts -> 'candidates' FROM derivation_runs WHERE status = 'succeeded'"
            " ORDER BY started_at DESC LIMIT 1"
        )
        .fetchone()
    )
    assert counts is not None
    assert counts[0]["read_whole_window"] == 1
    assert counts[0]["total"] == 1
    # The sibling started before the candidates were known was told to stop, not left waiting.
    assert not [t for t in threading.enumerate() if t.name == "derive-sibling-read"]


# -- when a run is full, and why -------------------------------------------------------------------


def _rules_variant(tmp_path: Path, old: str, new: str) -> Any:
    source = (Path(__file__).parents[2] / "derive" / "rules" / "canonical.toml").read_text()
    assert old in source
    path = tmp_path / "rules.toml"
    path.write_text(source.replace(old, new))
    return load_rules(path)


@pytest.mark.parametrize(
    ("second", "reason"),
    [
        ({}, None),
        ({"full": True}, "--full"),
        ({"lookback": timedelta(days=90)}, "lookback changed (120d -> 90d)"),
        ({"as_of": AS_OF - timedelta(minutes=1)}, "as_of before the base run's"),
        ("rules", "rules tag changed"),
        ("non-monotone", "rules not monotone: gate G2 compares score <= 12"),
    ],
)
def test_a_run_is_full_when_it_cannot_build_on_the_base_and_says_why(
    dsn: str, pg: psycopg.Connection, tmp_path: Path, second: Any, reason: str | None
) -> None:
    insert_events(pg, engaged_user(1))
    first = run(dsn)
    kwargs: dict[str, Any] = {"as_of": AS_OF + timedelta(minutes=15)}
    if second == "rules":
        kwargs["rules"] = _rules_variant(
            tmp_path, "spike_max_events_per_hour = 500", "spike_max_events_per_hour = 400"
        )
    elif second == "non-monotone":
        kwargs["rules"] = _rules_variant(
            tmp_path,
            '{ metric = "score", op = ">=", value = 12 }',
            '{ metric = "score", op = "<=", value = 12 }',
        )
    else:
        kwargs.update(second)

    report = run(dsn, **kwargs)

    assert (first.mode, first.full_reason) == ("full", "no base run")
    if reason is None:
        assert report.mode == "incremental"
        assert report.headline.startswith("incremental run (base ")
    else:
        assert report.mode == "full"
        assert reason in (report.full_reason or "")
        assert report.headline.startswith(f"full run ({report.full_reason}")
    stored = pg.execute(
        "SELECT mode, full_reason, base_run_id::text, read_snapshot IS NOT NULL FROM derivation_runs"
        " WHERE run_id = %s",
        (report.run_id,),
    ).fetchone()
    assert stored == (
        report.mode,
        report.full_reason,
        first.run_id if report.mode == "incremental" else None,
        True,
    )


def test_user_runs_are_never_a_base(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, engaged_user(1))
    base = run(dsn)
    run(dsn, as_of=AS_OF + timedelta(minutes=5), users=[str(uid(1))])

    report = run(dsn, as_of=AS_OF + timedelta(minutes=15))

    assert report.base_run_id == base.run_id


# -- verify ----------------------------------------------------------------------------------------


def test_verify_finds_a_silent_superuser_edit(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, [*engaged_user(1), *engaged_user(2)])
    run(dsn)
    with connect(dsn) as db:
        clean = verify_derivation(db, lookback=LOOKBACK, rules=load_rules())
    pg.execute("ALTER TABLE audience_state DISABLE TRIGGER USER")
    pg.execute("UPDATE audience_state SET current_state = 'S5' WHERE user_id = %s", (uid(1),))
    pg.execute("UPDATE audience_state SET engagement_score = 99 WHERE user_id = %s", (uid(2),))
    pg.execute("ALTER TABLE audience_state ENABLE TRIGGER USER")

    with connect(dsn) as db:
        dirty = verify_derivation(db, lookback=LOOKBACK, rules=load_rules())

    assert clean.equal
    assert clean.as_of == AS_OF
    assert dirty.differences.select("user_id", "problem").rows() == [
        (str(uid(1)), "state_jump: stored state disagrees with its audit trail"),
        (str(uid(2)), "score or last event type differs"),
    ]
    assert json.dumps(dirty.differences.to_dicts(), default=str)


def test_verify_on_the_command_line_exits_1_with_the_first_20_differences_and_json_has_all(
    dsn: str, pg: psycopg.Connection
) -> None:
    # Arrange: 25 users; 22 of them silently edited after a clean run.
    insert_events(pg, [row for n in range(1, 26) for row in engaged_user(n)])
    run(dsn)
    clean = derive("run", "--verify", "--dsn", dsn)
    pg.execute("ALTER TABLE audience_state DISABLE TRIGGER USER")
    pg.execute(
        "UPDATE audience_state SET engagement_score = engagement_score + 1 WHERE user_id = ANY(%s)",
        ([uid(n) for n in range(1, 23)],),
    )
    pg.execute("ALTER TABLE audience_state ENABLE TRIGGER USER")

    # Act
    dirty = derive("run", "--verify", "--dsn", dsn)
    dirty_json = derive("run", "--verify", "--json", "--dsn", dsn)

    # Assert
    assert clean.returncode == 0, clean.stderr
    assert "25 users, stored states equal a full run" in clean.stdout
    assert dirty.returncode == 1, dirty.stderr
    assert "22 of 25 users differ from a full run (first 20; --json lists all)" in dirty.stdout
    shown = {u for n in range(1, 26) if (u := str(uid(n))) in dirty.stdout}
    assert len(shown) == 20
    assert shown <= {str(uid(n)) for n in range(1, 23)}
    assert dirty_json.returncode == 1, dirty_json.stderr
    report = json.loads(dirty_json.stdout)
    assert report["equal"] is False
    assert report["users_compared"] == 25
    assert sorted(d["user_id"] for d in report["differences"]) == sorted(
        str(uid(n)) for n in range(1, 23)
    )


@pytest.mark.parametrize("split_from", [1, 2, 10**6], ids=["split-always", "split-2", "one-read"])
def test_listed_users_read_in_halves_or_whole_give_the_same_inputs(
    dsn: str, pg: psycopg.Connection, monkeypatch: pytest.MonkeyPatch, split_from: int
) -> None:
    insert_events(pg, [row for n in range(1, 6) for row in engaged_user(n)])
    run(dsn)  # stored states for all five
    monkeypatch.setattr(derivation, "SPLIT_READ_USERS", split_from)
    listed = [str(uid(n)) for n in (1, 2, 3, 5)]

    with connect(dsn) as db:
        inputs = derivation.read_inputs(
            db, as_of=AS_OF, lookback=timedelta(days=120), rules=load_rules(), users=listed
        )

    assert sorted(
        {str(u) for u in inputs.events.get_column("user_id").bin.encode("hex")}
    ) == sorted(u.replace("-", "") for u in listed)
    assert inputs.events.height == 4 * len(engaged_user(1))
    assert inputs.events.get_column("id").n_unique() == inputs.events.height
    assert sorted(inputs.stored.get_column("user_id").bin.encode("hex").to_list()) == sorted(
        u.replace("-", "") for u in listed
    )
