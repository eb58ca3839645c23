"""SQL of ``derive prune``: what retention removes, in batches of short transactions.

Each :class:`Target` is one kind of row with an age column and a cutoff (bound as ``$1``):
candidates are picked by an index range scan, ``batch_rows`` at a time, and deleted (or, for raw
payloads, reduced to what the jobs still read) in their own transaction, so no lock is held for
long and a crash loses at most the batch in flight, which the next prune does again. Optionally
the old rows are returned by the same statement and written to Parquet before the commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import pyarrow as pa

from derive.config import MAX_DURATION
from derive.io.connect import Db
from derive.io.jsonsql import array_length_at
from derive.io.privacy import portable_columns

# Conversions keep what attribution reads (amount, currency); everything else of the raw
# payload goes. A payload reduced to nothing becomes NULL.
_REDUCED_TOUCHPOINT = (
    "nullif(jsonb_strip_nulls(jsonb_build_object("
    "'amount', t.payload_jsonb -> 'amount', 'currency', t.payload_jsonb -> 'currency')),"
    " '{}'::jsonb)"
)


@dataclass(frozen=True)
class Target:
    """One kind of row retention removes.

    Attributes:
        where: predicate over ``t`` naming the rows past the cutoff ``$1``.
        order_by: the index order candidates are picked in.
        key: the columns that identify a row (for the batch's self-join).
        reduced: for payload targets, the value the payload is replaced with (``None``: delete).
    """

    name: str
    table: str
    where: str
    order_by: str
    key: tuple[str, ...] = ("id",)
    reduced: str | None = None


EVENTS = Target(
    "events",
    "audience_events",
    "t.created_at < $1 AND t.event_category <> 'system'",
    "t.created_at",
)
# The audit row a stored state points at stays (the state_jump fail-safe reads it), and so does
# every erasure record.
SYSTEM_EVENTS = Target(
    "system_events",
    "audience_events",
    """t.created_at < $1 AND t.event_category = 'system' AND t.event_type <> 'subject_erased'
   AND NOT EXISTS (SELECT 1 FROM audience_state s
                    WHERE s.user_id = t.user_id
                      AND s.metadata ->> 'last_audit_id' = t.id::text)""",
    "t.created_at",
)
METRIC_PAYLOADS = Target(
    "surface_metric_payloads",
    "surface_metrics",
    "t.created_at < $1 AND t.payload_jsonb IS NOT NULL",
    "t.created_at",
    reduced="NULL::jsonb",
)
TOUCHPOINT_PAYLOADS = Target(
    "touchpoint_payloads",
    "prospect_touchpoints",
    f"t.created_at < $1 AND t.payload_jsonb IS NOT NULL"
    f" AND t.payload_jsonb IS DISTINCT FROM {_REDUCED_TOUCHPOINT}",
    "t.created_at",
    reduced=_REDUCED_TOUCHPOINT,
)
STATE_HISTORY = Target(
    "state_history",
    "audience_state_history",
    "t.as_of < $1",
    "t.as_of, t.user_id",
    key=("as_of", "user_id"),
)


def _batch(target: Target) -> str:
    keys = ", ".join(f"t.{k}" for k in target.key)
    return f"SELECT {keys} FROM {target.table} t WHERE {target.where} ORDER BY {target.order_by} LIMIT $2"


def _statement(db: Db, target: Target, *, archive: bool) -> str:
    keys = ", ".join(target.key)
    match = " AND ".join(f"t.{k} = b.{k}" for k in target.key)
    if target.reduced is None:
        returning = portable_columns(db, target.table) if archive else "1"
        return (
            f"DELETE FROM {target.table} t USING ({_batch(target)}) b({keys})"
            f" WHERE {match} RETURNING {returning}"
        )
    # The old payload comes from the batch (RETURNING sees the new row).
    returning = "t.id::text AS id, b.old::text AS payload_jsonb" if archive else "1"
    batch = _batch(target).replace("SELECT t.id", "SELECT t.id, t.payload_jsonb", 1)
    return (
        f"UPDATE {target.table} t SET payload_jsonb = {target.reduced}"
        f" FROM ({batch} FOR UPDATE) b(id, old) WHERE {match} RETURNING {returning}"
    )


def count_due(db: Db, target: Target, *, cutoff: datetime) -> int:
    """Rows of the target past the cutoff (what a prune would remove)."""
    with db.transaction(role="service_role"):
        return int(
            db.fetch_value(f"SELECT count(*) FROM {target.table} t WHERE {target.where}", (cutoff,))
        )


def prune_batch(
    db: Db, target: Target, *, cutoff: datetime, limit: int, archive: bool
) -> tuple[int, pa.Table | None]:
    """Remove up to ``limit`` rows in one open transaction (the caller commits).

    Returns:
        The rows removed, and with ``archive`` their old contents as Arrow.
    """
    db.rollback()
    db.execute('SET LOCAL ROLE "service_role"')
    sql = _statement(db, target, archive=archive)
    if archive:
        table = db.fetch_arrow(sql, (cutoff, limit))
        return table.num_rows, table
    n = db.fetch_value(f"WITH changed AS ({sql}) SELECT count(*) FROM changed", (cutoff, limit))
    return int(n), None


def drop_history_markers(db: Db, *, cutoff: datetime) -> int:
    """Delete the completion markers of history steps before the cutoff (before their rows).

    Without its marker a step counts as incomplete, so a crash between this and the row deletes
    leaves steps a resumed backfill rewrites, never a partial step taken for whole.
    """
    with db.transaction(role="service_role"):
        return int(
            db.fetch_value(
                "WITH gone AS (DELETE FROM audience_state_history_steps WHERE as_of < $1"
                " RETURNING 1) SELECT count(*) FROM gone",
                (cutoff,),
            )
        )


def lookback_facts(db: Db, *, job: str) -> tuple[datetime, timedelta | None, datetime | None]:
    """Database time, the longest lookback ``job`` ever ran with, and the as_of of its last
    successful run covering every user (the base the next incremental run starts from)."""
    with db.transaction(role="service_role"):
        now, longest, base = db.fetch_all(
            "SELECT clock_timestamp(),"
            " (SELECT extract(epoch FROM max(r.lookback))::float8 FROM derivation_runs r"
            # A lookback derive cannot have run with (over 100 years: a forged run row) is
            # ignored, so it can neither overflow the cutoff nor stop the prune.
            "   WHERE r.job = $1 AND r.lookback IS NOT NULL"
            f"   AND r.lookback <= interval '{MAX_DURATION.days} days'),"
            " (SELECT r.as_of FROM derivation_runs r WHERE r.job = $1 AND r.status = 'succeeded'"
            f"   AND coalesce({array_length_at('r.args', 'users')}, 0) = 0"
            "   ORDER BY r.finished_at DESC LIMIT 1)",
            (job,),
        )[0]
    return now, None if longest is None else timedelta(seconds=longest), base
