"""The covering index of users' windows (migration 0052): every row is read once, by index alone
for the usual ones, and a row too large for an index tuple is still accepted and derived."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta

import psycopg
import pytest

from derive.config import load_rules
from derive.io import read
from derive.io.connect import connect
from derive.jobs import derivation
from tests.db.helpers import AS_OF, engaged_user, event, insert_events, run, states, uid

LOOKBACK = timedelta(days=120)


def listed_ids(dsn: str, users: list[int]) -> list[str]:
    """Event ids the listed-user read returns (``--user``, incremental candidates)."""
    with connect(dsn) as db:
        inputs = derivation.read_inputs(
            db,
            as_of=AS_OF,
            lookback=LOOKBACK,
            rules=load_rules(),
            users=[str(uid(n)) for n in users],
        )
    return sorted(inputs.events.get_column("id").bin.encode("hex").to_list())


def window_ids(pg: psycopg.Connection, users: list[int]) -> list[str]:
    rows = pg.execute(
        "SELECT replace(id::text, '-', '') FROM audience_events WHERE user_id = ANY(%s)"
        " AND event_category <> 'system' AND created_at BETWEEN %s AND %s",
        ([uid(n) for n in users], AS_OF - LOOKBACK, AS_OF),
    ).fetchall()
    return sorted(r[0] for r in rows)


def metadata_of_text_length(pg: psycopg.Connection, length: int) -> str:
    """A metadata object whose jsonb text form is exactly ``length`` bytes."""
    value = json.dumps({"duration_seconds": 40, "k": "x" * (length - 33)})
    got = pg.execute("SELECT octet_length(%s::jsonb::text)", (value,)).fetchone()
    assert got == (length,)
    return value


def test_a_row_too_large_for_an_index_tuple_is_inserted_read_and_derived(
    dsn: str, pg: psycopg.Connection
) -> None:
    # Incompressible and over the 2704-byte btree limit: a covering index of every row would fail
    # this insert ("index row size exceeds btree maximum"). (A session_id that long is refused by
    # the application's own session index, audience_events_session_idx, so it stays shorter.)
    huge = {"duration_seconds": 40, "blob": secrets.token_hex(4000)}
    rows = engaged_user(1)
    rows[0] = {**rows[0], "metadata": json.dumps(huge), "session_id": secrets.token_hex(600)}
    insert_events(pg, rows)

    report = run(dsn, users=[str(uid(1))])

    assert report.counts["events_read"] == len(rows)
    assert states(pg) == {uid(1): "S2"}
    assert listed_ids(dsn, [1]) == window_ids(pg, [1])


@pytest.mark.parametrize("length", [255, 256, 257])
def test_rows_at_the_size_bound_of_the_covering_index_are_each_read_once(
    dsn: str, pg: psycopg.Connection, length: int
) -> None:
    metadata = metadata_of_text_length(pg, length)
    insert_events(
        pg,
        [
            {
                **event(1, "content_view", "engagement", ago=timedelta(hours=2)),
                "metadata": metadata,
            },
            {**event(2, "content_view", "engagement"), "session_id": "s" * length},
            {**event(3, "x" * (length // 2), "engagement")},
            *engaged_user(4),
        ],
    )

    assert listed_ids(dsn, [1, 2, 3, 4]) == window_ids(pg, [1, 2, 3, 4])


def test_the_listed_read_is_an_index_only_scan_of_the_covering_index(
    dsn: str, pg: psycopg.Connection
) -> None:
    insert_events(pg, [row for n in range(1, 40) for row in engaged_user(n)])
    pg.execute("VACUUM ANALYZE audience_events")  # the visibility map an index-only scan needs

    with pg.transaction():
        for name, value in (
            ("derive.users", ",".join(str(uid(n)) for n in range(1, 40))),
            ("derive.window_start", (AS_OF - LOOKBACK).isoformat()),
            ("derive.as_of", AS_OF.isoformat()),
            ("enable_hashjoin", "off"),  # as read.prefer_lookups sets them
            ("enable_mergejoin", "off"),
        ):
            pg.execute("SELECT set_config(%s, %s, true)", (name, value))
        plan = "\n".join(r[0] for r in pg.execute(f"EXPLAIN {read.EVENTS_USERS_SQL}").fetchall())

    # The predicates in read.py and in the migration are written alike: drift between them would
    # silently fall back to one heap page per event.
    assert "Index Only Scan using audience_events_user_window_idx" in plan
    assert "audience_events_user_window_rest_idx" in plan
