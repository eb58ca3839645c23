"""One shard of a full run: the users of a user_id range, derived on their own.

Every rule of the derivation reads one user's rows only, so the users can be split into ranges of
the 128-bit uuid space and each range derived alone; the union of the shards' diffs equals one
derivation over everyone. :func:`derive_shard` is the unit a distributed executor calls: a pure
function of (bounds, as_of, rules, the range's events, its stored states, recent rejections) to
Arrow tables (no connection, no clock, no globals).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import polars as pl
import pyarrow as pa

from derive.config import STATES, Rules
from derive.transforms.pipeline import derive_states

UUID_BITS = 128


@dataclass(frozen=True)
class ShardBounds:
    """A user_id range ``[lo, hi)`` as 16-byte big-endian uuids; ``None`` is an open end."""

    index: int
    lo: bytes | None
    hi: bytes | None

    def expr(self, column: str = "user_id") -> pl.Expr:
        """Whether ``column`` (16-byte binary, byte order = uuid order) lies in the range."""
        inside = pl.lit(True)
        if self.lo is not None:
            inside = inside & (pl.col(column) >= pl.lit(self.lo, dtype=pl.Binary()))
        if self.hi is not None:
            inside = inside & (pl.col(column) < pl.lit(self.hi, dtype=pl.Binary()))
        return inside

    def contains(self, user_id: bytes) -> bool:
        """Whether one uuid lies in the range."""
        return (self.lo is None or user_id >= self.lo) and (self.hi is None or user_id < self.hi)


def shard_bounds(count: int) -> list[ShardBounds]:
    """Split the uuid space into ``count`` equal ranges (first and last open-ended)."""
    if count < 1:
        raise ValueError(f"shard count must be at least 1, got {count}")
    cuts = [(i * (1 << UUID_BITS)) // count for i in range(1, count)]
    edges: list[bytes | None] = [None, *(c.to_bytes(16, "big") for c in cuts), None]
    return [ShardBounds(i, edges[i], edges[i + 1]) for i in range(count)]


def shard_of(bounds: list[ShardBounds], user_id: bytes) -> int:
    """Index of the shard holding ``user_id``."""
    for shard in bounds:
        if shard.contains(user_id):
            return shard.index
    raise ValueError(f"no shard holds {user_id.hex()}")


@dataclass(frozen=True)
class ShardDiff:
    """What one shard writes and counts.

    ``states``, ``audit``, ``to_log`` and ``rejected`` are the rows of
    ``Derivation.writes/audit/to_log/rejected`` for the range; the rest are the shard's counts,
    which add up over shards (:func:`combine_counts`).
    """

    bounds: ShardBounds
    states: pa.Table
    audit: pa.Table
    to_log: pa.Table
    rejected: pa.Table
    events_read: int
    deduplicated: int
    users_evaluated: int
    state_changes: int
    invalid: dict[str, int] = field(default_factory=dict)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)


def derive_shard(
    bounds: ShardBounds,
    events: pl.DataFrame,
    stored: pl.DataFrame,
    recent_rejections: pl.DataFrame,
    /,
    *,
    as_of: datetime,
    rules: Rules,
) -> ShardDiff:
    """Derive the users of ``bounds`` (rows outside the range are ignored, whoever passes them).

    Args:
        bounds: the shard's user_id range.
        events: the window's events (``schema.EVENTS``), at least those of the range.
        stored: stored states (``schema.STORED_STATES``), at least those of the range.
        recent_rejections: ``validation_fail`` rows of the relog interval (any users).
        as_of: the reference time.
        rules: the validated rules.
    """
    inside = bounds.expr()
    d = derive_states(
        events.filter(inside),
        stored.filter(inside),
        recent_rejections.filter(inside),
        as_of=as_of,
        rules=rules,
    )
    return ShardDiff(
        bounds=bounds,
        states=d.writes.to_arrow(),
        audit=d.audit.to_arrow(),
        to_log=d.to_log.to_arrow(),
        rejected=d.rejected.to_arrow(),
        events_read=d.events_read,
        deduplicated=d.deduplicated,
        users_evaluated=d.users_evaluated,
        state_changes=d.state_changes,
        invalid=d.invalid,
        rejected_by_reason=d.rejected_by_reason,
        before=d.before,
        after=d.after,
    )


def _add(into: dict[str, int], more: dict[str, int]) -> None:
    for key, n in more.items():
        into[key] = into.get(key, 0) + n


@dataclass
class Totals:
    """The sum of the shards' counts (what one derivation over everyone would count)."""

    events_read: int = 0
    deduplicated: int = 0
    users_evaluated: int = 0
    state_changes: int = 0
    users_changed: int = 0
    users_rejected: int = 0
    rejections_logged: int = 0
    audit_rows: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    before: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    after: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))

    def add(self, diff: ShardDiff) -> None:
        """Count one more shard."""
        self.events_read += diff.events_read
        self.deduplicated += diff.deduplicated
        self.users_evaluated += diff.users_evaluated
        self.state_changes += diff.state_changes
        self.users_changed += diff.states.num_rows
        self.users_rejected += diff.rejected.num_rows
        self.rejections_logged += diff.to_log.num_rows
        self.audit_rows += diff.audit.num_rows
        _add(self.invalid, diff.invalid)
        _add(self.rejected_by_reason, diff.rejected_by_reason)
        _add(self.before, diff.before)
        _add(self.after, diff.after)

    def sorted_reasons(self) -> dict[str, int]:
        """Rejected users per reason, most frequent first (as ``Derivation.rejected_by_reason``)."""
        return dict(sorted(self.rejected_by_reason.items(), key=lambda kv: (-kv[1], kv[0])))


def shard_index(user_id: pl.Expr, bounds: list[ShardBounds]) -> pl.Expr:
    """The index of the shard holding each ``user_id`` (the number of lower bounds at or below)."""
    lows = [shard.lo for shard in bounds[1:] if shard.lo is not None]
    if not lows:
        return pl.lit(0, dtype=pl.UInt32())
    return pl.sum_horizontal([(user_id >= pl.lit(lo, dtype=pl.Binary())) for lo in lows]).cast(
        pl.UInt32()
    )
