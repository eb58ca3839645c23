"""Full runs in shards (user_id ranges) against a real PostgreSQL: the same tables at any count.

The contract is equality: whatever the shard count, a full run writes the same states, audit rows,
validation_fail rows and rejected set as the unsharded run (``shards=1`` takes the one-read path,
the reference). Users sit on the shard bounds of 2 and 7 shards, at the minimum and maximum uuid.
"""

from __future__ import annotations

import itertools
import json
import math
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from derive.config import load_rules
from derive.errors import UsageError
from derive.io.connect import connect
from derive.jobs import derivation
from derive.jobs.derivation import plan_shards, verify_derivation
from derive.transforms.shard import shard_bounds
from tests.db.helpers import AS_OF, engaged_user, event, insert_events, run
from tests.db.test_incremental import (
    ADVANCES,
    KINDS,
    OFFSETS,
    SMALL_SPIKES,
    _reset,
    derived_tables,
)

LOOKBACK = timedelta(days=120)
MAX_UUID = (1 << 128) - 1


def _bound_users() -> list[int]:
    """uuids exactly at, just below and just above every bound of 2 and 7 shards, and the ends."""
    users = {0, 1, MAX_UUID, MAX_UUID - 1}
    for count in (2, 7):
        for shard in shard_bounds(count)[1:]:
            assert shard.lo is not None
            at = int.from_bytes(shard.lo, "big")
            users |= {at - 1, at, at + 1}
    return sorted(users)


USERS = _bound_users()

inserts = st.lists(
    st.tuples(
        st.sampled_from(USERS),
        st.sampled_from(range(len(KINDS))),
        st.sampled_from(OFFSETS),
        st.sampled_from(["s1", None]),
        st.integers(1, 6),  # burst: copies one second apart (dedupe, spikes)
    ),
    min_size=1,
    max_size=10,
)
histories = st.lists(st.tuples(inserts, st.sampled_from(ADVANCES)), min_size=1, max_size=3)


def _rows(batch: list[tuple[int, int, timedelta, str | None, int]], now: Any) -> list[Any]:
    rows = []
    for user, kind, offset, session, copies in batch:
        event_type, category, metadata = KINDS[kind]
        for i in range(copies):
            rows.append(
                {
                    "created_at": now + offset + timedelta(seconds=i),
                    "user_id": uuid.UUID(int=user),
                    "session_id": session,
                    "event_type": event_type,
                    "event_category": category,
                    "metadata": json.dumps(metadata),
                }
            )
    return rows


def _replay(
    dsn: str, pg: psycopg.Connection, history: list[Any], rules: Any, shards: int
) -> list[Any]:
    """Reset, then insert and run each step of ``history`` with ``shards``; tables per step."""
    _reset(pg)
    tables = []
    as_of = AS_OF
    for batch, advance in history:
        insert_events(pg, _rows(batch, as_of))
        as_of = as_of + advance
        run(dsn, as_of=as_of, rules=rules, full=True, shards=shards)
        tables.append(derived_tables(pg))
    return tables


@settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=histories)
def test_full_runs_write_the_same_tables_for_1_2_and_7_shards(
    dsn: str, tmp_path_factory: pytest.TempPathFactory, history: list[tuple[list[Any], timedelta]]
) -> None:
    rules_file = tmp_path_factory.mktemp("rules") / "rules.toml"
    rules_file.write_text(SMALL_SPIKES)
    rules = load_rules(rules_file)
    with psycopg.connect(dsn, autocommit=True) as pg:
        one = _replay(dsn, pg, history, rules, 1)
        assert _replay(dsn, pg, history, rules, 2) == one
        assert _replay(dsn, pg, history, rules, 7) == one


def test_every_uuid_lies_in_exactly_one_shard() -> None:
    for count in (1, 2, 3, 7, 16):
        bounds = shard_bounds(count)
        assert bounds[0].lo is None
        assert bounds[-1].hi is None
        for user in USERS:
            raw = user.to_bytes(16, "big")
            assert sum(shard.contains(raw) for shard in bounds) == 1
        # Consecutive: each range starts where the last one ended.
        assert all(a.hi == b.lo for a, b in itertools.pairwise(bounds))


def test_a_sharded_run_reports_the_same_counts_as_one_read(dsn: str, second_dsn: str) -> None:
    rows = [
        {
            "created_at": AS_OF - timedelta(hours=h),
            "user_id": uuid.UUID(int=user),
            "session_id": "s1",
            "event_type": event_type,
            "event_category": category,
            "metadata": "{}",
        }
        for h, (user, event_type, category) in enumerate(
            [
                (0, "content_share", "advocacy"),
                (MAX_UUID, "scroll_depth_75", "engagement"),
                (1 << 127, "made_up", "engagement"),
                (1 << 127, "ping", "telemetry"),
                ((1 << 127) - 1, "referral_click", "advocacy"),
            ]
        )
    ]
    with (
        psycopg.connect(dsn, autocommit=True) as a,
        psycopg.connect(second_dsn, autocommit=True) as b,
    ):
        insert_events(a, rows)
        insert_events(b, rows)
    one = run(dsn, full=True, shards=1)
    seven = run(second_dsn, full=True, shards=7)
    assert seven.counts.pop("shards")["shards"] == 7
    assert seven.counts == one.counts
    assert (seven.before, seven.after) == (one.before, one.after)
    with connect(dsn) as db:
        reference = verify_derivation(db, lookback=LOOKBACK, rules=load_rules(), shards=1)
    with connect(second_dsn) as db:
        sharded = verify_derivation(db, lookback=LOOKBACK, rules=load_rules(), shards=7)
    assert sharded.equal
    assert reference.equal
    assert sharded.users_compared == reference.users_compared == 3


def test_a_dry_run_in_shards_counts_like_one_read_and_writes_nothing(dsn: str) -> None:
    rows = [
        {
            "created_at": AS_OF - timedelta(hours=1 + i),
            "user_id": uuid.UUID(int=user),
            "session_id": "s1",
            "event_type": "content_share",
            "event_category": "advocacy",
            "metadata": "{}",
        }
        for i, user in enumerate(USERS)
    ]
    with psycopg.connect(dsn, autocommit=True) as pg:
        insert_events(pg, rows)
        one = run(dsn, full=True, dry_run=True, shards=1)
        seven = run(dsn, full=True, dry_run=True, shards=7)
        assert pg.execute("SELECT count(*) FROM audience_state").fetchone() == (0,)
    seven.counts.pop("shards")
    assert seven.counts == one.counts


def test_a_limit_smaller_than_one_users_window_is_a_usage_error(dsn: str) -> None:
    heavy = [
        {
            "created_at": AS_OF - timedelta(minutes=i),
            "user_id": uuid.UUID(int=5),
            "session_id": "s1",
            "event_type": "scroll_depth_75",
            "event_category": "engagement",
            "metadata": "{}",
        }
        for i in range(300)
    ]
    with psycopg.connect(dsn, autocommit=True) as pg:
        insert_events(pg, heavy)
        pg.execute("ANALYZE audience_events")
    with connect(dsn) as db, pytest.raises(UsageError, match="raise --memory-limit to at least"):
        # 300 events x 700 bytes ~ 205 KiB > 100 KiB
        plan_shards(db, as_of=AS_OF, lookback=LOOKBACK, memory_limit=100 * 1024)
    with connect(dsn) as db:
        assert plan_shards(db, as_of=AS_OF, lookback=LOOKBACK, memory_limit=2**20).count >= 1


def test_the_shard_count_follows_the_window_estimate(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DERIVE_SHARDS", raising=False)  # CI forces one for the whole suite
    rows = [
        {
            "created_at": AS_OF - timedelta(minutes=i),
            "user_id": uuid.UUID(int=i % 50),
            "session_id": "s1",
            "event_type": "scroll_depth_75",
            "event_category": "engagement",
            "metadata": "{}",
        }
        for i in range(2000)
    ]
    with psycopg.connect(dsn, autocommit=True) as pg:
        insert_events(pg, rows)
        pg.execute("ANALYZE audience_events")
    with connect(dsn) as db:
        small = plan_shards(db, as_of=AS_OF, lookback=LOOKBACK, memory_limit=256 * 1024)
        large = plan_shards(db, as_of=AS_OF, lookback=LOOKBACK, memory_limit=2**30)
        forced = plan_shards(db, as_of=AS_OF, lookback=LOOKBACK, memory_limit=2**30, shards=3)
        # a shard never holds more than MAX_SHARD_ROWS rows, however large the limit
        monkeypatch.setattr(derivation, "MAX_SHARD_ROWS", 500)
        capped = plan_shards(db, as_of=AS_OF, lookback=LOOKBACK, memory_limit=2**40)
    # ~2000 rows x 700 bytes x 2.5 / 256 KiB ~ 14 shards
    assert 1800 <= small.estimated_rows <= 2200
    assert small.count == math.ceil(small.estimated_rows * 700 * 2.5 / (256 * 1024)) > 1
    assert large.count == 1
    assert forced.count == 3
    assert capped.count == math.ceil(capped.estimated_rows / 500) >= 4


def test_an_incremental_run_whose_candidates_exceed_the_memory_limit_runs_full_in_shards(
    dsn: str, pg: psycopg.Connection
) -> None:
    """Candidates are read in one piece; when their windows would not fit --memory-limit the
    run is a full run in shards instead (the same answer), never one read past the limit."""
    # Arrange: 40 users with a base run, then every one of them active again, twice.
    users = range(1, 41)
    insert_events(pg, [row for n in users for row in engaged_user(n)])
    run(dsn)
    tick1, tick2 = AS_OF + timedelta(minutes=15), AS_OF + timedelta(minutes=30)
    for when in (tick1, tick2):
        insert_events(
            pg,
            [
                event(n, "content_share", "advocacy", ago=timedelta(minutes=5), as_of=when)
                for n in users
            ],
        )
    pg.execute("ANALYZE audience_events")
    pg.execute("ANALYZE audience_state")
    # 40 users x 5-6 rows at 700 bytes x 2.5: ~0.4 MiB; one user's window ~4 KiB.
    small, ample = 100 * 1024, 1 << 30

    # Act
    roomy = run(dsn, as_of=tick1, memory_limit=ample)
    tight = run(dsn, as_of=tick2, memory_limit=small)
    with connect(dsn) as db:
        verified = verify_derivation(db, lookback=LOOKBACK, rules=load_rules(), as_of=tick2)

    # Assert
    assert (roomy.mode, roomy.counts["candidates"]["total"]) == ("incremental", 40)
    assert tight.mode == "full"
    assert tight.full_reason is not None
    assert tight.full_reason.startswith("40 candidates: their windows (~")
    assert "exceed the memory limit (0.1 MiB), read in shards" in tight.full_reason
    assert tight.counts["shards"]["shards"] > 1
    assert tight.counts["users_evaluated"] == 40
    assert verified.equal
