"""``derive rollup``: surface metrics -> cross-surface ``metric_aggregates`` (SPEC §3).

Same shape as the derivation: one snapshot read (sources of missing or due aggregates, and the due
aggregates), pure Polars transforms for all keys at once, a diff, and one transaction as
``service_role`` (ADBC bulk load into temporary tables, upsert, stale_after touch). The run is
logged in ``derivation_runs`` under the job's advisory lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import polars as pl

from derive.io.connect import Db
from derive.io.metrics import read_rollup_input, write_rollup
from derive.io.runlog import job_run
from derive.metrics_rules import MetricsRules
from derive.transforms.rollup import (
    OUTCOMES,
    SKIP_STATUSES,
    SOURCES,
    STORED,
    STORED_PARTS,
    aggregate_across_surfaces,
    latest_per_surface,
    plan_rollup,
    skipped,
    surface_values,
)

JOB = "rollup"


@dataclass
class RollupResult:
    """The outcome of one rollup run."""

    run_id: str
    as_of: datetime
    rules_version: str
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)


def _uuid_text(column: str) -> pl.Expr:
    """16-byte uuid -> its canonical text form (for reports)."""
    hexed = pl.col(column).bin.encode("hex")
    cuts = [(0, 8), (8, 4), (12, 4), (16, 4), (20, 12)]
    return pl.concat_str([hexed.str.slice(a, n) for a, n in cuts], separator="-")


def _shaped(frame: pl.DataFrame, schema: pl.Schema) -> pl.LazyFrame:
    return frame.lazy().select(list(schema)).cast(schema)


def run_rollup(db: Db, *, as_of: datetime, rules: MetricsRules) -> RollupResult:
    """Create missing aggregates, recompute due ones whose sources changed, move ``stale_after``.

    Aggregates whose ``stale_after`` is after ``as_of`` are neither read nor written, so a
    second run at the same ``as_of`` writes nothing.

    Raises:
        LockBusy: another rollup holds the lock (recorded as ``skipped``).
    """
    with job_run(
        db, job=JOB, as_of=as_of, rules_version=rules.tag, args={"rules": rules.source}
    ) as run:
        with run.phase("read"):
            data = read_rollup_input(db, as_of_iso=as_of.isoformat())
        with run.phase("compute"):
            # Materialised per stage: each stage's output feeds several joins of the next one.
            latest = latest_per_surface(_shaped(data.sources, SOURCES)).collect()
            aggregates, parts = pl.collect_all(
                [
                    aggregate_across_surfaces(latest.lazy(), rules=rules),
                    surface_values(latest.lazy()),
                ]
            )
            plan, not_aggregated = pl.collect_all(
                [
                    plan_rollup(
                        aggregates.lazy(),
                        parts.lazy(),
                        _shaped(data.stored, STORED),
                        _shaped(data.stored_parts, STORED_PARTS),
                        as_of=as_of,
                        rules=rules,
                    ),
                    skipped(aggregates.lazy()),
                ]
            )
        with run.phase("write"), db.transaction(role="service_role"):
            written = write_rollup(db, plan)
        outcomes = dict(plan.group_by("outcome").len().iter_rows())
        reasons = dict(not_aggregated.group_by("status").len().iter_rows())
        run.counts = {
            "sources_read": data.sources.height,
            "sources_superseded": data.sources.height - latest.height,
            "due_aggregates_read": data.stored.height,
            **{o: int(outcomes.get(o, 0)) for o in OUTCOMES},
            "final": int(plan["final"].sum()),
            **{f"not_aggregated_{s}": int(reasons.get(s, 0)) for s in SKIP_STATUSES},
            "rows_written": written["written"],
            "rows_touched": written["touched"],
        }
        result = RollupResult(run.run_id, as_of, rules.tag, run.counts, run.timings)
        result.skipped = (
            not_aggregated.with_columns(user_id=_uuid_text("user_id"))
            .sort("status", "user_id", "metric_kind", "window_start")
            .to_dicts()
        )
    result.timings = dict(run.timings)
    return result
