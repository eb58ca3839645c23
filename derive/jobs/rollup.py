"""``derive rollup``: surface metrics -> cross-surface ``metric_aggregates`` (SPEC §3).

Same shape as the derivation: one snapshot read (sources of missing or due aggregates, and the due
aggregates), pure Polars transforms for all keys at once, a diff, and one transaction as
``service_role`` (ADBC bulk load into temporary tables, upsert, the run's clock row). The run is
logged in ``derivation_runs`` under the job's advisory lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import polars as pl

from derive.io.connect import Db
from derive.io.metrics import (
    RollupBase,
    RollupClock,
    read_rollup_input,
    rollup_base,
    write_rollup,
)
from derive.io.runlog import job_run
from derive.metrics_rules import MetricsRules
from derive.transforms.rollup import (
    OUTCOMES,
    SKIP_STATUSES,
    SOURCES,
    STORED,
    STORED_PARTS,
    aggregate_across_surfaces,
    due_window_end,
    latest_per_surface,
    plan_rollup,
    rollup_clock,
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
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)


def _uuid_text(column: str) -> pl.Expr:
    """16-byte uuid -> its canonical text form (for reports)."""
    hexed = pl.col(column).bin.encode("hex")
    cuts = [(0, 8), (8, 4), (12, 4), (16, 4), (20, 12)]
    return pl.concat_str([hexed.str.slice(a, n) for a, n in cuts], separator="-")


def _shaped(frame: pl.DataFrame, schema: pl.Schema) -> pl.LazyFrame:
    return frame.lazy().select(list(schema)).cast(schema)


PENDING = pl.Schema(
    {
        "user_id": pl.Binary(),
        "metric_kind": pl.String(),
        "window_start": pl.Datetime("us", "UTC"),
        "window_end": pl.Datetime("us", "UTC"),
        "fetched_at": pl.Datetime("us", "UTC"),
    }
)


def _mode(base: RollupBase | None, *, as_of: datetime, rules: MetricsRules) -> tuple[str, str]:
    """(``incremental`` or ``full``, why) for a run at ``as_of`` after ``base``."""
    if base is None:
        return "full", "no previous rollup"
    if base.snapshot is None:
        return "full", "the previous rollup recorded no read snapshot"
    if base.rules_version != rules.tag:
        return "full", f"rules changed ({base.rules_version} -> {rules.tag})"
    if as_of < base.as_of:
        return "full", f"as_of is before the previous rollup's ({base.as_of.isoformat()})"
    return "incremental", f"new sources since run {base.run_id}"


def run_rollup(db: Db, *, as_of: datetime, rules: MetricsRules, full: bool = False) -> RollupResult:
    """Create missing aggregates, recompute due ones whose sources changed, move ``stale_after``.

    Incremental by default: only source rows that became visible after the previous rollup's read
    snapshot (and the rows it left pending) are read, with the sources of the keys they touch;
    due aggregates no new row touches are only counted: they get a new ``stale_after`` from the
    clock the run records, without a write. A run with nothing new reads nothing but those two
    small sets. ``full`` (or no usable base: first run,
    changed rules, an ``as_of`` before the previous run's) reads every source row and every stored
    aggregate. Both give the same table.

    Raises:
        LockBusy: another rollup holds the lock (recorded as ``skipped``).
    """
    with job_run(
        db, job=JOB, as_of=as_of, rules_version=rules.tag, args={"rules": rules.source}
    ) as run:
        with run.phase("read"):
            base = rollup_base(db)
            mode, why = ("full", "--full") if full else _mode(base, as_of=as_of, rules=rules)
            assert base is not None or mode == "full"
            band_from, band_next = rollup_clock(as_of=as_of, rules=rules)
            data = read_rollup_input(
                db,
                as_of_iso=as_of.isoformat(),
                base_snapshot=base.snapshot if mode == "incremental" and base else None,
                band_from=band_from,
                due_end=lambda old_from, old_next: due_window_end(old_from, old_next, as_of=as_of),
            )
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
            pending = _shaped(data.pending, PENDING).unique().collect()
        with run.phase("write"), db.transaction(role="service_role"):
            clock = RollupClock(run.run_id, as_of, band_from, band_next)
            written = write_rollup(db, plan, pending, clock=clock)
        outcomes = dict(plan.group_by("outcome").len().iter_rows())
        # Due aggregates no new source touches were counted, not read.
        outcomes["refreshed"] = outcomes.get("refreshed", 0) + data.unchanged_due
        reasons = dict(not_aggregated.group_by("status").len().iter_rows())
        run.counts = {
            "mode": mode,
            "mode_reason": why,
            "sources_read": data.sources.height,
            "sources_superseded": data.sources.height - latest.height,
            "aggregates_read": data.stored.height,
            **{o: int(outcomes.get(o, 0)) for o in OUTCOMES},
            "refreshed_refetched_identical": int(plan["refetched"].sum()),
            "final": int(plan["final"].sum()) + data.unchanged_due_final,
            **{f"not_aggregated_{s}": int(reasons.get(s, 0)) for s in SKIP_STATUSES},
            "rows_written": written["written"],
            "rows_removed": written["removed"],
            "pending": pending.height,
            "read_snapshot": data.snapshot,
        }
        result = RollupResult(run.run_id, as_of, rules.tag, run.counts, run.timings)
        result.skipped = (
            not_aggregated.with_columns(user_id=_uuid_text("user_id"))
            .sort("status", "user_id", "metric_kind", "window_start")
            .to_dicts()
        )
    result.timings = dict(run.timings)
    return result
