"""Two people with rows in every table, sharing a session and a prospect (export / erase tests)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from derive.io.connect import connect
from derive.jobs.attribution import run_attribution
from derive.schema import MODELS
from tests.db.helpers import AS_OF, insert_events, run

DAY = timedelta(days=1)


@dataclass(frozen=True)
class People:
    """Ids of the scenario: tenants/audience members ``a`` and ``b``, their prospects."""

    a: uuid.UUID
    b: uuid.UUID
    prospect_a: uuid.UUID
    prospect_b: uuid.UUID


def _events(
    user: uuid.UUID, *, session: str, days_ago: float, kinds: list[tuple[str, str]]
) -> list[dict[str, Any]]:
    return [
        {
            "created_at": AS_OF - timedelta(days=days_ago, minutes=i),
            "user_id": user,
            "session_id": session,
            "event_type": event_type,
            "event_category": category,
            "metadata": "{}",
        }
        for i, (event_type, category) in enumerate(kinds)
    ]


_ENGAGED = [
    ("scroll_depth_75", "engagement"),
    ("long_form_completion", "engagement"),
    ("video_completion_75", "engagement"),
    ("long_form_completion", "engagement"),
]


def touch(
    pg: psycopg.Connection,
    user: uuid.UUID,
    prospect: uuid.UUID | None,
    *,
    kind: str,
    days_ago: float,
    identifier: bytes | None = None,
    payload: dict[str, Any] | None = None,
    surface: str = "tryst",
) -> uuid.UUID:
    row = pg.execute(
        "INSERT INTO prospect_touchpoints (user_id, prospect_id, surface, touchpoint, external_id,"
        " identifier_hash, occurred_at, payload_jsonb, ingestion_source)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'manual') RETURNING id",
        (
            user,
            prospect,
            surface,
            kind,
            str(uuid.uuid4()),
            identifier,
            AS_OF - timedelta(days=days_ago),
            None if payload is None else Jsonb(payload),
        ),
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def _tenant_rows(pg: psycopg.Connection, user: uuid.UUID) -> None:
    pg.execute(
        "INSERT INTO surface_metrics (user_id, surface, metric_kind, window_start, window_end,"
        " value_numeric, source, payload_jsonb) VALUES (%s, 'tryst', 'profile_view', %s, %s, 12,"
        " 'adapter', %s)",
        (user, AS_OF - 2 * DAY, AS_OF - DAY, Jsonb({"raw": "profile views"})),
    )
    pg.execute(
        "INSERT INTO metric_aggregate_rows (user_id, metric_kind, window_start, window_end,"
        " value_numeric, surfaces_included, surface_breakdown, computed_stale_after)"
        " VALUES (%s, 'profile_view', %s, %s, 12, ARRAY['tryst'], %s, %s)",
        (user, AS_OF - 2 * DAY, AS_OF - DAY, Jsonb({"tryst": 12}), AS_OF),
    )
    session = pg.execute(
        "INSERT INTO ingestion_sessions (kind, user_id, surface, source, status, rows_received,"
        " rows_inserted, rows_rejected, health_note, started_at)"
        " VALUES ('surface_metrics', %s, 'tryst', 'adapter', 'succeeded', 1, 1, 0, 'ok', %s)"
        " RETURNING id",
        (user, AS_OF - DAY),
    ).fetchone()
    assert session is not None
    pg.execute(
        "INSERT INTO ingestion_session_steps (session_id, ordinal, step, status, started_at,"
        " finished_at) VALUES (%s, 1, 'tier_check', 'ok', %s, %s)",
        (session[0], AS_OF - DAY, AS_OF - DAY),
    )
    pg.execute(
        "INSERT INTO audience_state_history (as_of, user_id, current_state, state_updated_at,"
        " engagement_score) VALUES (%s, %s, 'S1', %s, 5)",
        (AS_OF - 3 * DAY, user, AS_OF - 3 * DAY),
    )


def two_people(dsn: str, pg: psycopg.Connection) -> People:
    """A and B: audience members in one shared session and tenants whose touchpoints share
    B's prospect; states, audit and validation_fail rows, a --user run naming both, state
    history, surface metrics, aggregates, ingestion sessions and attribution credits."""
    a, b = uuid.uuid4(), uuid.uuid4()
    prospect_a, prospect_b = uuid.uuid4(), uuid.uuid4()
    for user in (a, b):
        pg.execute(
            "INSERT INTO users (id, attribution_salt) VALUES (%s, %s)", (user, os.urandom(32))
        )
    pg.execute(
        "INSERT INTO prospects (id, user_id) VALUES (%s, %s), (%s, %s)",
        (prospect_a, a, prospect_b, b),
    )
    insert_events(
        pg,
        _events(a, session="shared", days_ago=3, kinds=_ENGAGED)
        + _events(b, session="shared", days_ago=3, kinds=_ENGAGED),
    )
    pg.execute(
        "INSERT INTO audience_events (created_at, session_id, event_type, event_category)"
        " VALUES (%s, 'shared', 'content_view', 'engagement')",
        (AS_OF - 3 * DAY,),
    )
    run(dsn, as_of=AS_OF - 2 * DAY)
    # A's subscription without recorded consent: A is rejected next run (one validation_fail).
    insert_events(
        pg, _events(a, session="a-only", days_ago=1, kinds=[("email_subscribe", "subscription")])
    )
    run(dsn, as_of=AS_OF)
    run(dsn, as_of=AS_OF, users=[str(a), str(b)])
    for user in (a, b):
        _tenant_rows(pg, user)
        pg.execute("INSERT INTO derive_requests (user_id) VALUES (%s)", (user,))
    hash_a = os.urandom(32)
    touch(pg, a, prospect_a, kind="dm_inbound", days_ago=5, identifier=hash_a)
    touch(pg, a, None, kind="profile_view", days_ago=4, identifier=hash_a)
    touch(pg, a, prospect_a, kind="tip", days_ago=2, payload={"amount": 10, "currency": "USD"})
    touch(pg, a, prospect_b, kind="dm_inbound", days_ago=4)
    touch(pg, b, prospect_b, kind="dm_inbound", days_ago=5, identifier=os.urandom(32))
    touch(pg, b, prospect_b, kind="tip", days_ago=1, payload={"amount": 7, "currency": "USD"})
    with connect(dsn) as db:
        run_attribution(db, models=MODELS, window=30 * DAY, half_life=7 * DAY, as_of=AS_OF)
    return People(a=a, b=b, prospect_a=prospect_a, prospect_b=prospect_b)


def public_tables(pg: psycopg.Connection) -> list[str]:
    """Every table of the public schema."""
    return [
        r[0]
        for r in pg.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        ).fetchall()
    ]


def rows_mentioning(pg: psycopg.Connection, value: uuid.UUID) -> dict[str, int]:
    """Rows per table whose text form contains the id (dashed or as bytea hex), anywhere."""
    found = {}
    for table in public_tables(pg):
        n = pg.execute(
            f'SELECT count(*) FROM "{table}" t WHERE t::text LIKE %s OR t::text LIKE %s',
            (f"%{value}%", f"%{value.hex}%"),
        ).fetchone()
        assert n is not None
        if n[0]:
            found[table] = int(n[0])
    return found
