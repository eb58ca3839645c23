"""The whole audience-state derivation as one pure function of its inputs.

Used by the ``derive run`` job and by anything else that needs the same answers (backfills, the
benchmarks). Materialisation points, both measured and deliberate: the classified events (read by
validation counts, fail-safes and dedupe alike) and the dedupe sort (see ``dedupe``); every other
output comes out of one ``collect_all`` so shared sub-plans run once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import polars as pl

from derive.config import STATES, Rules
from derive.transforms import audit, dedupe, failsafe, metrics, states, validate


@dataclass(frozen=True)
class Derivation:
    """Everything one derivation computes; the job writes ``writes``, ``audit`` and ``to_log``."""

    events_read: int
    invalid: dict[str, int]
    deduplicated: int
    users_evaluated: int
    evaluated: pl.DataFrame
    audit: pl.DataFrame
    writes: pl.DataFrame
    rejected: pl.DataFrame
    to_log: pl.DataFrame
    before: dict[str, int]
    after: dict[str, int]

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        """Rejected users per reason (a user with two reasons counts under both)."""
        if self.rejected.height == 0:
            return {}
        counts = self.rejected.get_column("reasons").explode().value_counts(sort=True)
        return {str(r): int(n) for r, n in counts.iter_rows()}

    @property
    def state_changes(self) -> int:
        """Users whose state changed (a new user entering S0 counts)."""
        if self.writes.height == 0:
            return 0
        return int(self.writes.get_column("state_changed").sum())


def _distribution(frame: pl.DataFrame, column: str) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    if frame.height:
        for state, n in frame.get_column(column).value_counts().iter_rows():
            if state is not None:
                counts[str(state)] = int(n)
    return counts


def derive_states(
    events: pl.DataFrame,
    stored: pl.DataFrame,
    recent_rejections: pl.DataFrame,
    /,
    *,
    as_of: datetime,
    rules: Rules,
) -> Derivation:
    """Derive every user's state from the window's events and the stored states.

    Args:
        events: the lookback window (``schema.EVENTS``).
        stored: stored states with their audit pointer (``schema.STORED_STATES``).
        recent_rejections: ``validation_fail`` rows within the relog interval.
        as_of: the reference time.
        rules: the validated rules.
    """
    classified = validate.classify_events(events.lazy(), rules=rules).collect()
    valid = validate.valid_events(classified.lazy())
    marked = dedupe.mark_duplicates(valid, window=rules.dedupe_window)
    kept = marked.filter("kept")
    stored_lf = stored.lazy()

    per_user = metrics.user_metrics(kept, as_of=as_of, rules=rules)
    rejected = failsafe.rejections(classified.lazy(), valid, stored_lf, rules=rules)
    evaluated = states.evaluate(per_user, stored_lf, as_of=as_of, rules=rules)
    accepted = evaluated.join(rejected.select("user_id"), on="user_id", how="anti")
    audit_rows = audit.audit_rows(accepted, rules=rules)
    writes = audit.state_writes(accepted, audit_rows, as_of=as_of, rules=rules)
    to_log = failsafe.to_log(rejected, recent_rejections.lazy())
    counts = marked.select(valid=pl.len(), duplicates=(~pl.col("kept")).sum())
    after = pl.concat(
        [
            accepted.select(state=pl.col("new_state")),
            stored_lf.join(rejected.select("user_id"), on="user_id", how="semi").select(
                state=pl.col("current_state")
            ),
        ]
    )
    (
        invalid_df,
        evaluated_df,
        audit_df,
        writes_df,
        rejected_df,
        to_log_df,
        counts_df,
        after_df,
    ) = pl.collect_all(
        [
            validate.invalid_counts(classified.lazy()),
            accepted,
            audit_rows,
            writes,
            rejected,
            to_log,
            counts,
            after,
        ]
    )
    return Derivation(
        events_read=classified.height,
        invalid={str(r): int(n) for r, n in invalid_df.iter_rows()},
        deduplicated=int(counts_df.item(0, "duplicates") or 0),
        users_evaluated=evaluated_df.height + rejected_df.height,
        evaluated=evaluated_df,
        audit=audit_df,
        writes=writes_df,
        rejected=rejected_df,
        to_log=to_log_df,
        before=_distribution(stored, "current_state"),
        after=_distribution(after_df, "state"),
    )
