"""Reads of an incremental run (SPEC §2.10): the base run, the candidate users, their windows.

All of them run inside the run's read transaction (one REPEATABLE READ snapshot, see
:func:`derive.io.read.begin_snapshot`), so the candidate set, the windows read and the snapshot
recorded as the next run's watermark describe one consistent state of the database.

The watermark is a snapshot, not a cursor: a row is new to this run when the base run's snapshot
could not see it (its inserting transaction started at or after the snapshot's xmax, or was in
progress when it was taken). That finds rows of transactions that were open while the base run read and
committed later, and rows with any created_at, which a timestamp or sequence cursor loses.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from derive.io.connect import Db

#: Why a user is evaluated by an incremental run; the run log counts users per reason.
REASONS: tuple[str, ...] = ("new_rows", "entered", "left", "retention", "rejected", "requested")


@dataclass(frozen=True)
class BaseRun:
    """The latest succeeded run that covered every user: what an incremental run builds on."""

    run_id: str
    as_of: datetime
    lookback: timedelta | None
    rules_version: str | None
    read_snapshot: str | None


_BASE_SQL = """
SELECT r.run_id::text, r.as_of, extract(epoch FROM r.lookback)::float8, r.rules_version,
       r.read_snapshot::text
  FROM derivation_runs r
 WHERE r.job = $1
   AND r.status = 'succeeded'
   AND r.mode IN ('full', 'incremental')
 ORDER BY r.finished_at DESC
 LIMIT 1
"""


def latest_base(db: Db, *, job: str) -> BaseRun | None:
    """The latest succeeded full or incremental run of ``job`` (``--user`` and dry runs never count)."""
    with db.transaction(role="service_role"):
        rows = db.fetch_all(_BASE_SQL, (job,))
    if not rows:
        return None
    run_id, as_of, lookback, rules_version, snapshot = rows[0]
    return BaseRun(
        run_id=str(run_id),
        as_of=as_of,
        lookback=None if lookback is None else timedelta(seconds=float(lookback)),
        rules_version=rules_version,
        read_snapshot=snapshot,
    )


def read_snapshot(db: Db) -> str:
    """The read transaction's own snapshot (``xmin:xmax:xip,...``): the next run's watermark."""
    return str(db.fetch_value("SELECT pg_current_snapshot()::text"))


def unseen_rows_sql(
    *, columns: str, table: str, alias: str, xid: str, snapshot: str, where: str = "true"
) -> str:
    """SQL of the rows of ``table`` that ``snapshot`` could not see: the one watermark builder.

    A row is unseen when the transaction that inserted it (its ``xid`` column, an xid8) started at
    or after the snapshot's xmax, or was in progress when it was taken (its xip list): an index
    range over ``xid`` plus one index lookup per in-progress transaction. (Everything below the
    snapshot's xmin was visible; a range from xmin instead would read every row since the oldest
    transaction open at the time.) Rows with a null ``xid`` count as seen.

    Args:
        columns: the select list, naming columns through ``alias``.
        table: the table (our own name, never user input), read as ``alias``.
        xid: its xid8 column.
        snapshot: an SQL expression of type pg_snapshot (e.g. a ``current_setting(...)`` cast).
        where: further conditions on ``alias`` (both branches).
    """
    return f"""SELECT {columns}
  FROM {table} {alias}
 WHERE {alias}.{xid} >= pg_snapshot_xmax({snapshot}) AND ({where})
UNION ALL
SELECT {columns}
  FROM pg_snapshot_xip({snapshot}) AS derive_xip(xid)
 CROSS JOIN LATERAL (
        SELECT {alias}.* FROM {table} {alias}
         WHERE {alias}.{xid} = derive_xip.xid AND ({where})
        OFFSET 0  -- one index lookup per in-progress xid (a hash join would scan the table)
       ) {alias}"""


_BASE_SNAPSHOT = "current_setting('derive.base_snapshot')::pg_snapshot"

# Each branch is an index range scan: the watermark index (new rows), the created_at index (rows
# entering and leaving the window by time), the last_activity_at index (retention thresholds),
# and two small tables. The bounds come from transaction-local settings (see ``set_bounds``).
_CANDIDATES_SQL = (
    unseen_rows_sql(
        columns="e.user_id, 0::int2 AS reason",
        table="audience_events",
        alias="e",
        xid="ingest_xid",
        snapshot=_BASE_SNAPSHOT,
        where="e.user_id IS NOT NULL AND e.event_category <> 'system'",
    )
    + "\nUNION ALL\n"
    + unseen_rows_sql(
        columns="c.user_id, 0::int2",
        table="audience_event_changes",
        alias="c",
        xid="xid",
        snapshot=_BASE_SNAPSHOT,
    )
    + """
UNION ALL
SELECT e.user_id, 1::int2
  FROM audience_events e
 WHERE e.created_at > current_setting('derive.t0')::timestamptz
   AND e.created_at <= current_setting('derive.t1')::timestamptz
   AND e.user_id IS NOT NULL
   AND e.event_category <> 'system'
UNION ALL
SELECT e.user_id, 2::int2
  FROM audience_events e
 WHERE e.created_at >= current_setting('derive.t0')::timestamptz
                       - current_setting('derive.lookback')::interval
   AND e.created_at < current_setting('derive.t1')::timestamptz
                      - current_setting('derive.lookback')::interval
   AND e.user_id IS NOT NULL
   AND e.event_category <> 'system'
UNION ALL
SELECT s.user_id, 3::int2
  FROM unnest(string_to_array(nullif(current_setting('derive.thresholds'), ''), ',')::int[]) AS d(days)
 CROSS JOIN LATERAL (
        SELECT s.user_id
          FROM audience_state s
         WHERE s.last_activity_at > current_setting('derive.t0')::timestamptz - make_interval(days => d.days)
           AND s.last_activity_at <= current_setting('derive.t1')::timestamptz - make_interval(days => d.days)
        OFFSET 0  -- an index range per threshold (pulled up, it became a scan of every state)
       ) s
UNION ALL
-- The stored last_activity_at lags when only weight-0 events arrived (the row is written only when
-- state, score or last type change), so events in the crossing slice count as well.
SELECT e.user_id, 3::int2
  FROM unnest(string_to_array(nullif(current_setting('derive.thresholds'), ''), ',')::int[]) AS d(days)
 CROSS JOIN LATERAL (
        SELECT e.user_id
          FROM audience_events e
         WHERE e.created_at > current_setting('derive.t0')::timestamptz - make_interval(days => d.days)
           AND e.created_at <= current_setting('derive.t1')::timestamptz - make_interval(days => d.days)
           AND e.user_id IS NOT NULL
           AND e.event_category <> 'system'
       ) e
UNION ALL
SELECT r.user_id, 4::int2 FROM derive_rejected_users r
UNION ALL
SELECT q.user_id, 5::int2 FROM derive_requests q WHERE q.status = 'pending'
"""
)


def set_bounds(
    db: Db,
    *,
    base: BaseRun,
    as_of: datetime,
    lookback: timedelta,
    thresholds: tuple[int, ...],
) -> None:
    """Bind the candidate query's bounds in the open read transaction."""
    assert base.read_snapshot is not None
    db.set_local(
        base_snapshot=base.read_snapshot,
        t0=base.as_of.isoformat(),
        t1=as_of.isoformat(),
        lookback=f"{int(lookback.total_seconds())} seconds",
        thresholds=",".join(str(d) for d in sorted(set(thresholds))),
    )


def read_candidates(db: Db) -> pl.DataFrame:
    """``(user_id, reason)`` rows, one per user and reason that applies (duplicates possible)."""
    frame = db.fetch_df(_CANDIDATES_SQL)
    if frame.height == 0:
        return pl.DataFrame(schema={"user_id": pl.Binary(), "reason": pl.Int16()})
    return frame.select(pl.col("user_id").cast(pl.Binary), pl.col("reason").cast(pl.Int16))


def pending_requests(db: Db) -> int:
    """The highest pending request id visible to the read snapshot (0 when none)."""
    return int(
        db.fetch_value("SELECT coalesce(max(id), 0) FROM derive_requests WHERE status = 'pending'")
    )


_EVENTS_UNSEEN = unseen_rows_sql(
    columns="1",
    table="audience_events",
    alias="e",
    xid="ingest_xid",
    snapshot="$1::pg_snapshot",
    where="e.user_id IS NOT NULL AND e.event_category <> 'system'",
)
_CHANGES_UNSEEN = unseen_rows_sql(
    columns="1", table="audience_event_changes", alias="c", xid="xid", snapshot="$1::pg_snapshot"
)
_ANYTHING_NEW_SQL = f"""
SELECT EXISTS ({_EVENTS_UNSEEN})
    OR EXISTS ({_CHANGES_UNSEEN})
    OR EXISTS (SELECT 1 FROM derive_requests q WHERE q.status = 'pending')
    -- rows the base saw but stamped after its as_of (inserted between its clock and its read)
    OR EXISTS (SELECT 1 FROM audience_events e
                WHERE e.created_at > $2 AND e.created_at <= clock_timestamp()
                  AND e.user_id IS NOT NULL AND e.event_category <> 'system')
"""


def anything_new(db: Db, base: BaseRun | None) -> bool:
    """Whether rows or requests arrived that ``base`` did not see, or rows entered the window
    since (always true without a base).

    Index probes: what the watcher asks before it spends a run on a wake-up.
    """
    if base is None or base.read_snapshot is None:
        return True
    with db.transaction(role="service_role"):
        return bool(db.fetch_value(_ANYTHING_NEW_SQL, (base.read_snapshot, base.as_of)))
