"""Bulk reads of the derivation's inputs, Arrow end to end.

The queries take no bind parameters: their bounds are transaction-local settings
(``derive.window_start``, ``derive.as_of``, ...) set with bound values just before, which keeps the
ADBC driver on its binary-COPY read path. The numeric metadata keys are read as their JSON text
(``20``, ``"20"``, ``true``, ``null``, ``[20]``: the type stays visible) and ``consent_recorded``
only when it is a JSON boolean, so a malformed value can never abort the query: validation happens
in the transforms (SPEC §2.2: only a finite JSON number is a number).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta

import polars as pl

from derive.io.connect import Db
from derive.io.jsonsql import timestamptz_at, uuid_or_null
from derive.schema import EVENTS, RECENT_REJECTIONS, STORED_STATES

_EVENT_COLUMNS = """
SELECT e.id,
       e.created_at,
       e.user_id,
       e.session_id,
       e.event_type,
       e.event_category,
       jsonb_typeof(e.metadata) = 'object' AS metadata_is_object,
       (e.metadata -> 'duration_seconds')::text AS duration_seconds,
       (e.metadata -> 'scroll_depth_percent')::text AS scroll_depth_percent,
       CASE WHEN jsonb_typeof(e.metadata -> 'consent_recorded') = 'boolean'
            THEN (e.metadata ->> 'consent_recorded')::boolean END AS consent_recorded
  FROM audience_events e
"""

#: The lookback window of every user's non-system events (the benchmark's read floor uses it too).
EVENTS_WINDOW_SQL = (
    _EVENT_COLUMNS
    + """ WHERE e.user_id IS NOT NULL
   AND e.event_category <> 'system'
   AND e.created_at >= current_setting('derive.window_start')::timestamptz
   AND e.created_at <= current_setting('derive.as_of')::timestamptz"""
)

#: Rows the covering index ``audience_events_user_window_idx`` (migration 0023) holds: small
#: enough that an index tuple with them always fits a btree page (PostgreSQL refuses a larger one,
#: which would fail the application's insert). The others, rare, are in the small
#: ``audience_events_user_window_rest_idx``. The text must equal the migration's predicates: the
#: planner matches a partial index by the expressions' form.
_SMALL_ROW = """octet_length(e.metadata::text) <= 256 AND coalesce(octet_length(e.session_id), 0) <= 256
    AND octet_length(e.event_type) <= 128 AND octet_length(e.event_category) <= 64"""

_LISTED_WINDOW = (
    _EVENT_COLUMNS.replace(
        "FROM audience_events e",
        "FROM unnest(string_to_array(current_setting('derive.users'), ',')::uuid[]) AS u(user_id)\n"
        "  JOIN audience_events e ON e.user_id = u.user_id",
    )
    + """ WHERE e.event_category <> 'system' AND e.user_id IS NOT NULL
   AND e.created_at >= current_setting('derive.window_start')::timestamptz
   AND e.created_at <= current_setting('derive.as_of')::timestamptz
   AND {part}"""
)

#: The same window for the users listed in ``derive.users`` (distinct, comma-separated uuids):
#: a join against the list, so each user is one range scan per index: an index-only scan of the
#: covering index for the usual rows (no heap page per event: at L, 10k users, 0.62 s -> 0.17 s
#: on the server) and the rest index for the oversized ones.
#: (``user_id = ANY (array)`` let the planner filter the created_at index row by row instead:
#: minutes for a few thousand users.)
EVENTS_USERS_SQL = (
    _LISTED_WINDOW.format(part=f"({_SMALL_ROW})")
    + "\nUNION ALL\n"
    + _LISTED_WINDOW.format(part=f"NOT ({_SMALL_ROW})")
)

_STATES = f"""
SELECT s.user_id,
       s.current_state,
       s.state_updated_at,
       s.engagement_score::float8 AS engagement_score,
       s.last_event_type,
       s.last_activity_at,
       s.metadata ->> 'last_audit_id' AS last_audit_id,
       a.new_state AS audit_new_state,
       a.user_id = s.user_id AS audit_user_matches
  FROM audience_state s
  -- One primary-key lookup per state: the cost follows the number of users, not the length of
  -- the audit history (a hash join would read every audit row ever written).
  LEFT JOIN LATERAL (
        SELECT e.user_id, e.metadata ->> 'new_state' AS new_state
          FROM audience_events e
         WHERE e.id = {uuid_or_null("s.metadata ->> 'last_audit_id'")}
           AND e.event_category = 'system'
           AND e.event_type IN ('state_change_logged', 'state_adopted')
        OFFSET 0  -- keeps the subquery a per-row lookup (the planner would flatten it into a join)
       ) a ON true
"""
STATES_SQL = _STATES
STATES_USERS_SQL = _STATES.replace(
    "FROM audience_state s",
    "FROM unnest(string_to_array(current_setting('derive.users'), ',')::uuid[]) AS u(user_id)\n"
    "  JOIN audience_state s ON s.user_id = u.user_id",
)

#: Users per stored state (the summary's "before" of an incremental run, which reads few states).
STATE_COUNTS_SQL = "SELECT current_state, count(*) FROM audience_state GROUP BY current_state"

_DERIVED_AT = timestamptz_at("e.metadata", "derived_at")

#: ``validation_fail`` rows of the relog interval; a row whose derived_at is not a time is
#: ignored here and counted by ``read_side_counts``.
RECENT_REJECTIONS_SQL = f"""
SELECT e.user_id, e.metadata ->> 'reasons_key' AS reasons_key
  FROM audience_events e
 WHERE e.event_category = 'system'
   AND e.event_type = 'validation_fail'
   AND e.created_at > current_setting('derive.relog_since')::timestamptz
   AND {_DERIVED_AT} > current_setting('derive.relog_since')::timestamptz
   AND {_DERIVED_AT} <= current_setting('derive.as_of')::timestamptz
"""

# Two index range scans (anonymous rows sit together in the (user_id, created_at) index, future
# rows at the end of the created_at index) instead of a second pass over the window. Bound
# parameters, so the planner sees the bounds and picks the indexes.
_SIDE_COUNTS_SQL = f"""
SELECT (SELECT count(*)
          FROM audience_events
         WHERE user_id IS NULL
           AND event_category <> 'system'
           AND created_at >= $1
           AND created_at <= $2) AS anonymous,
       (SELECT count(*)
          FROM audience_events
         WHERE created_at > $2
           AND event_category <> 'system') AS future,
       (SELECT count(*)
          FROM audience_events e
         WHERE e.event_category = 'system'
           AND e.event_type = 'validation_fail'
           AND e.created_at > current_setting('derive.relog_since')::timestamptz
           AND {_DERIVED_AT} IS NULL) AS system_rows_malformed
"""


def _conform(frame: pl.DataFrame, schema: pl.Schema) -> pl.DataFrame:
    """Cast to the stage schema (an empty result carries no useful types)."""
    if frame.height == 0:
        return pl.DataFrame(schema=schema)
    return frame.select([pl.col(name).cast(dtype) for name, dtype in schema.items()])


def begin_snapshot(db: Db, *, snapshot: str | None = None) -> str:
    """Start a read-only REPEATABLE READ transaction as ``service_role``; return its snapshot id.

    With ``snapshot``, the transaction adopts that exported snapshot, so two connections read one
    consistent state of the database.
    """
    db.rollback()
    db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    if snapshot is not None:
        if not re.fullmatch(r"[0-9A-F]+-[0-9A-F]+-[0-9]+", snapshot):
            raise ValueError(f"unexpected snapshot id {snapshot!r}")
        db.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")  # a server-made id, checked above
    db.lift_timeouts()  # the window read may outlast a hosted server's statement_timeout
    db.execute('SET LOCAL ROLE "service_role"')
    db.execute("SET LOCAL jit = off")  # compiling these plans costs more than it saves
    return str(db.fetch_value("SELECT pg_export_snapshot()"))


def set_window(
    db: Db,
    *,
    as_of: datetime,
    lookback: timedelta,
    relog_after: timedelta,
    users: Sequence[str] = (),
) -> None:
    """Bind the window bounds for the read queries of this transaction."""
    db.set_local(
        as_of=as_of.isoformat(),
        window_start=(as_of - lookback).isoformat(),
        relog_since=(as_of - relog_after).isoformat(),
        users=",".join(users),
    )


def _user_range(column: str, lo: bytes | None, hi: bytes | None) -> str:
    """The ``[lo, hi)`` user_id condition as SQL over ``derive.shard_lo/hi`` (open end: none)."""
    parts = []
    if lo is not None:
        parts.append(f"{column} >= current_setting('derive.shard_lo')::uuid")
    if hi is not None:
        parts.append(f"{column} < current_setting('derive.shard_hi')::uuid")
    return "".join(f"\n   AND {p}" for p in parts)


def set_user_range(db: Db, lo: bytes | None, hi: bytes | None) -> None:
    """Bind a shard's user_id bounds (16-byte uuids) for the range reads of this transaction."""
    db.set_local(
        shard_lo="" if lo is None else str(uuid.UUID(bytes=lo)),
        shard_hi="" if hi is None else str(uuid.UUID(bytes=hi)),
    )


def prefer_lookups(db: Db) -> None:
    """Make the listed-user reads a nested loop of index lookups, one per listed user.

    From ~10k listed users the planner switches to a hash join, i.e. a scan of the whole table
    (measured at L, 11.8k of 1M users: 7.7 s for the hash join, 1.1 s for the lookups). For the
    rest of the transaction.
    """
    db.execute(
        "SELECT set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)"
    )


def read_events(
    db: Db,
    *,
    users: Sequence[str] = (),
    user_range: tuple[bytes | None, bytes | None] | None = None,
) -> pl.DataFrame:
    """The lookback window of events (non-null user, non-system), one Arrow read.

    ``user_range``: only the users in ``[lo, hi)`` (bound with :func:`set_user_range` first).
    """
    if users:
        return _conform(db.fetch_df(EVENTS_USERS_SQL), EVENTS)
    sql = EVENTS_WINDOW_SQL
    if user_range is not None:
        sql += _user_range("e.user_id", *user_range)
    return _conform(db.fetch_df(sql), EVENTS)


def stream_events(db: Db) -> Iterator[pl.DataFrame]:
    """The whole window (as :func:`read_events`), batch by batch."""
    for frame in db.stream_df(EVENTS_WINDOW_SQL):
        yield _conform(frame, EVENTS)


def stream_states(db: Db) -> Iterator[pl.DataFrame]:
    """Every stored state (as :func:`read_states`), batch by batch."""
    for frame in db.stream_df(STATES_SQL):
        yield _conform(frame, STORED_STATES)


def read_states(
    db: Db,
    *,
    users: Sequence[str] = (),
    user_range: tuple[bytes | None, bytes | None] | None = None,
) -> pl.DataFrame:
    """Stored states with their last audit row's ``new_state`` resolved (point lookups)."""
    if users:
        return _conform(db.fetch_df(STATES_USERS_SQL), STORED_STATES)
    sql = STATES_SQL
    if user_range is not None:
        sql += " WHERE true" + _user_range("s.user_id", *user_range)
    return _conform(db.fetch_df(sql), STORED_STATES)


#: The heaviest users of the table by the planner's statistics (candidates for the largest user
#: of a window; counted exactly by ``_USER_WINDOW_ROWS``).
_HEAVY_USERS_SQL = """
SELECT u::text
  FROM pg_stats s, unnest(s.most_common_vals::text::text[]) AS u
 WHERE s.schemaname = current_schema() AND s.tablename = 'audience_events'
   AND s.attname = 'user_id'
 LIMIT 5
"""
_USER_WINDOW_ROWS = """
SELECT count(*) FROM audience_events
 WHERE user_id = $1::uuid AND event_category <> 'system' AND created_at >= $2 AND created_at <= $3
"""
_WINDOW_ESTIMATE_SQL = """
EXPLAIN (FORMAT JSON)
SELECT 1 FROM audience_events
 WHERE user_id IS NOT NULL AND event_category <> 'system' AND created_at >= $1 AND created_at <= $2
"""


def estimate_window_rows(db: Db, *, window_start: datetime, as_of: datetime) -> int:
    """The planner's estimate of the window's rows (planning only: no row is read)."""
    plan = db.fetch_value(_WINDOW_ESTIMATE_SQL, (window_start, as_of))
    parsed = json.loads(plan) if isinstance(plan, str) else plan
    return int(parsed[0]["Plan"]["Plan Rows"])


def estimate_window(db: Db, *, window_start: datetime, as_of: datetime) -> tuple[int, int]:
    """The planner's estimate of the window's rows, and the largest known user's exact rows.

    The largest user is looked for among the table's most common user_ids (``pg_stats``); with
    no statistics it is 0 (the run checks each shard's largest user as it reads it).
    """
    db.lift_timeouts()  # planning waits for locks; the exact counts read heavy users' rows
    rows = estimate_window_rows(db, window_start=window_start, as_of=as_of)
    heavy = [str(u) for (u,) in db.fetch_all(_HEAVY_USERS_SQL)]
    largest = 0
    for user in heavy:
        n = int(db.fetch_value(_USER_WINDOW_ROWS, (user, window_start, as_of)))
        largest = max(largest, n)
    return rows, largest


#: Stored states as the planner estimates them (its statistics scaled to the table's current
#: size); NULL when the table has no statistics yet.
_STATES_ESTIMATE_SQL = """
SELECT CASE WHEN c.reltuples >= 0 AND c.relpages > 0
            THEN (c.reltuples / c.relpages
                  * (pg_relation_size(c.oid) / current_setting('block_size')::int))::bigint END
  FROM pg_class c
 WHERE c.oid = 'audience_state'::regclass
"""


def estimate_states(db: Db) -> int:
    """Stored states: the planner's estimate when the table has statistics, else counted.

    Only for choosing between two reads that give the same answer (no scan of the table).
    """
    estimate = db.fetch_value(_STATES_ESTIMATE_SQL)
    if estimate is not None:
        return int(estimate)
    return int(db.fetch_value("SELECT count(*) FROM audience_state"))


def read_state_counts(db: Db) -> dict[str, int]:
    """Stored users per state."""
    return {str(state): int(n) for state, n in db.fetch_all(STATE_COUNTS_SQL)}


def read_recent_rejections(db: Db) -> pl.DataFrame:
    """``validation_fail`` rows derived within the relog interval before ``as_of``."""
    return _conform(db.fetch_df(RECENT_REJECTIONS_SQL), RECENT_REJECTIONS)


def read_side_counts(db: Db, *, window_start: datetime, as_of: datetime) -> dict[str, int]:
    """What the run counts but does not derive.

    Anonymous events in the window, events stamped after ``as_of``, and the ``validation_fail``
    rows of the relog interval whose derived_at is not a time (ignored by the rejection read).
    """
    anonymous, future, malformed = db.fetch_all(_SIDE_COUNTS_SQL, (window_start, as_of))[0]
    return {
        "anonymous": int(anonymous),
        "future": int(future),
        "system_rows_malformed": int(malformed),
    }
