"""The 15-minute cron tick after a base run: (f) 1 % of users active since the base, (g) no one.

Both start from a copy of the database right after the steady-state runs (the base: a run at
``as_of`` t0 over every user). (f) appends, for 1 % of the users with a stored state (a fixed-seed
choice), the user's two latest kinds of non-system event again, in a new session, at times spread
over (t0, t1] with t1 = t0 + 15 min: what an ingest pipeline writes while the next run waits. Then
``derive run --as-of t1`` runs (incremental by default when the checkout has incremental runs; a
full run otherwise, which the run log's ``mode`` column, or its absence, shows).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

import psycopg

#: How far as_of moves between the base run and the measured run (a cron interval).
TICK = timedelta(minutes=15)
#: Share of the users with a stored state who get new events in (f).
ACTIVE_SHARE = 0.01
#: Events appended per active user (copies of their latest events' kinds).
EVENTS_PER_USER = 2

_APPEND = """
WITH chosen AS (
  SELECT s.user_id
    FROM audience_state s
   ORDER BY md5(s.user_id::text || %(seed)s)
   LIMIT %(users)s
), picked AS (
  SELECT c.user_id, e.event_type, e.event_category, e.event_source, e.metadata,
         row_number() OVER (PARTITION BY c.user_id ORDER BY e.created_at DESC) AS k
    FROM chosen c
   CROSS JOIN LATERAL (
         SELECT x.event_type, x.event_category, x.event_source, x.metadata, x.created_at
           FROM audience_events x
          WHERE x.user_id = c.user_id AND x.event_category <> 'system'
          ORDER BY x.created_at DESC
          LIMIT %(per_user)s) e
)
INSERT INTO audience_events
       (created_at, user_id, session_id, event_type, event_category, event_source, metadata)
SELECT %(since)s::timestamptz + (%(until)s::timestamptz - %(since)s::timestamptz)
         * ((('x' || substr(md5(p.user_id::text || ':' || p.k || %(seed)s), 1, 8))::bit(32)::bigint
             + 1) / 4294967296.0)::float8,
       p.user_id,
       'tick-' || substr(md5(p.user_id::text || %(seed)s), 1, 12),
       p.event_type, p.event_category, p.event_source, p.metadata
  FROM picked p
"""


def active_users(stored_states: int, share: float = ACTIVE_SHARE) -> int:
    """Users who get new events: ``share`` of the stored states, at least one when there are any."""
    return min(stored_states, max(1, math.ceil(stored_states * share))) if stored_states else 0


def append_recent_events(
    dsn: str,
    *,
    since: datetime,
    until: datetime,
    seed: int,
    share: float = ACTIVE_SHARE,
    per_user: int = EVENTS_PER_USER,
) -> dict[str, Any]:
    """Append events for ``share`` of the stored users at times in (since, until]; one commit.

    Returns:
        ``users`` (active users chosen) and ``events`` (rows inserted).
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        stored_row = conn.execute("SELECT count(*) FROM audience_state").fetchone()
        users = active_users(int(stored_row[0]) if stored_row else 0, share)
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(
                _APPEND,
                {
                    "seed": str(seed),
                    "users": users,
                    "per_user": per_user,
                    "since": since,
                    "until": until,
                },
            )
            events = cur.rowcount
    return {"users": users, "events": events}


def candidates_note(counts: dict[str, Any]) -> str:
    """``reason=count`` of ``counts['candidates']`` (a JSON object), or why there are none."""
    candidates = counts.get("candidates")
    if not isinstance(candidates, dict):
        return "no candidates recorded"
    shown = [f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in candidates.items()]
    return ", ".join(shown) if shown else "no candidates"
