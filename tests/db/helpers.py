"""Arrange/act helpers for database tests of the derivation job."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from derive.config import load_rules
from derive.io.connect import connect
from derive.jobs.derivation import RunReport, run_derivation

AS_OF = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def uid(n: int) -> uuid.UUID:
    """A readable, deterministic user id."""
    return uuid.UUID(int=n)


def event(
    user: int | None,
    event_type: str,
    category: str,
    *,
    ago: timedelta = timedelta(hours=1),
    session: str | None = "s1",
    metadata: Any = None,
    as_of: datetime = AS_OF,
) -> dict[str, Any]:
    """One audience_events row relative to ``as_of``."""
    return {
        "created_at": as_of - ago,
        "user_id": uid(user) if user is not None else None,
        "session_id": session,
        "event_type": event_type,
        "event_category": category,
        "metadata": json.dumps({} if metadata is None else metadata),
    }


def insert_events(pg: psycopg.Connection, rows: list[dict[str, Any]]) -> None:
    """Insert events as the superuser (the arrange step of a test)."""
    with pg.cursor() as cur:
        cur.executemany(
            "INSERT INTO audience_events (created_at, user_id, session_id, event_type,"
            " event_category, metadata) VALUES (%(created_at)s, %(user_id)s, %(session_id)s,"
            " %(event_type)s, %(event_category)s, %(metadata)s::jsonb)",
            rows,
        )


def run(dsn: str, *, as_of: datetime = AS_OF, **kwargs: Any) -> RunReport:
    """One ``derive run`` through the job's own code path."""
    with connect(dsn) as db:
        return run_derivation(
            db,
            as_of=as_of,
            lookback=kwargs.pop("lookback", timedelta(days=120)),
            rules=kwargs.pop("rules", load_rules()),
            **kwargs,
        )


def states(pg: psycopg.Connection) -> dict[uuid.UUID, str]:
    """user_id -> current_state."""
    return dict(pg.execute("SELECT user_id, current_state FROM audience_state").fetchall())


def system_rows(pg: psycopg.Connection, event_type: str) -> list[tuple[uuid.UUID, dict[str, Any]]]:
    """(user_id, metadata) of system events of a type, in write order."""
    return pg.execute(
        "SELECT user_id, metadata FROM audience_events WHERE event_category = 'system'"
        " AND event_type = %s ORDER BY created_at, id",
        (event_type,),
    ).fetchall()


def snapshot(pg: psycopg.Connection) -> tuple[Any, ...]:
    """Everything a run may change, to compare before/after."""
    return (
        pg.execute("SELECT * FROM audience_state ORDER BY user_id").fetchall(),
        pg.execute("SELECT * FROM audience_events ORDER BY id").fetchall(),
    )


def engaged_user(user: int, *, as_of: datetime = AS_OF) -> list[dict[str, Any]]:
    """Events that lift a new user to S2 (deep read this week, score >= 12)."""
    return [
        event(user, "scroll_depth_75", "engagement", ago=timedelta(days=1), as_of=as_of),
        event(user, "long_form_completion", "engagement", ago=timedelta(days=2), as_of=as_of),
        event(user, "video_completion_75", "engagement", ago=timedelta(days=3), as_of=as_of),
        event(user, "long_form_completion", "engagement", ago=timedelta(days=4), as_of=as_of),
    ]


def hold_lease(pg: psycopg.Connection, lock: str, *, seconds: int = 600) -> str:
    """Start a run holding ``lock`` the way every job does (another process's live lease)."""
    with pg.transaction():
        pg.execute("SET LOCAL ROLE service_role")
        row = pg.execute(
            "SELECT run_id::text, status FROM derive_start_run(%s, %s, now(), NULL, NULL, '{}', %s)",
            (lock, lock, seconds),
        ).fetchone()
    assert row is not None
    assert row[1] == "running"
    return str(row[0])
