"""``derive attribution``: credit every conversion's value to the surfaces of its prior touches.

one bulk read (per-prospect touchpoints of the window, plus aggregate anonymous counts) -> pure
Polars models for all conversions at once (``derive.transforms.attribution``) -> one transaction
that replaces the credits of exactly those conversions and models, writing only what changed.
The run holds the job's advisory lock and is logged in ``derivation_runs``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import polars as pl

from derive.config import format_duration, utc_now
from derive.io.connect import Db
from derive.io.runlog import job_run
from derive.io.touchpoints import (
    AttributionBase,
    anonymous_counts,
    attribution_base,
    current_snapshot,
    lock_sources,
    read_attribution_touchpoints,
    read_run_surfaces,
    read_stored_credits,
    touchpoints_changed_since,
    write_credit_changes,
    write_run_surfaces,
)
from derive.transforms.attribution import attribute, diff_credits, surface_summary

JOB = "attribution"


def decimal_text(value: pl.Expr, /) -> pl.Expr:
    """A Decimal as its exact text without trailing zeros (``40.000`` -> ``40``)."""
    return value.cast(pl.String).str.replace(r"\.?0+$", "")


@dataclass
class AttributionReport:
    """What a run read, computed and wrote, with the per-surface totals."""

    run_id: str
    models: tuple[str, ...]
    window: timedelta
    half_life: timedelta
    since: datetime | None
    as_of: datetime
    surfaces: pl.DataFrame  # derive.transforms.attribution.SURFACE_SUMMARY
    anonymous: pl.DataFrame  # surface, touchpoints, conversions
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def surfaces_text(self) -> pl.DataFrame:
        """:attr:`surfaces` with values as exact decimal text without trailing zeros (CSV, JSON)."""
        return self.surfaces.with_columns(decimal_text(pl.col("attributed_value")))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (values as decimal strings, so no precision is lost)."""
        return {
            "run_id": self.run_id,
            "models": list(self.models),
            "window": format_duration(self.window),
            "half_life": format_duration(self.half_life),
            "since": self.since,
            "as_of": self.as_of,
            "counts": self.counts,
            "timings": self.timings,
            "surfaces": self.surfaces_text().to_dicts(),
            "anonymous": self.anonymous.to_dicts(),
        }


#: Counts a run that finds nothing changed takes over from its base.
_CARRIED = ("conversions", "conversions_bad_amount", "credits")


def _full_reason(
    db: Db, base: AttributionBase | None, *, args: dict[str, Any], as_of: datetime, full: bool
) -> str | None:
    """Why this run recomputes every credit, or ``None`` when the stored ones stand."""
    if full:
        return "--full"
    if base is None:
        return "no previous attribution run"
    if base.read_snapshot is None:
        return "the previous run recorded no read snapshot"
    if base.args != json.loads(json.dumps(args, default=str)):
        return f"options differ from run {base.run_id}"
    if as_of < base.as_of:
        return f"as_of is before the previous run's ({base.as_of.isoformat()})"
    if touchpoints_changed_since(db, base, as_of=as_of):
        return f"touchpoints changed since run {base.run_id}"
    return None


def run_attribution(
    db: Db,
    *,
    models: Sequence[str],
    window: timedelta,
    half_life: timedelta,
    since: datetime | None = None,
    as_of: datetime | None = None,
    full: bool = False,
) -> AttributionReport:
    """Compute and store the credits of every conversion in ``[since, as_of]`` under ``models``.

    Re-running over the same data replaces those conversions' credits for those models and
    writes nothing when nothing changed. A run with the same options as the previous one, when no
    touchpoint was inserted, updated or deleted since that run read (its snapshot is the
    watermark) and no conversion entered ``(its as_of, as_of]``, reads no touchpoint at all: the
    stored credits stand and the previous run's per-surface totals are reported again. ``full``
    recomputes anyway (credits edited outside derive are only found that way).

    Raises:
        LockBusy: another attribution run holds the lock.
        SourceError: the database refused the read or the write (nothing is kept).
    """
    as_of = as_of or utc_now()
    args = {
        "models": list(models),
        "window": format_duration(window),
        "half_life": format_duration(half_life),
        "since": since,
    }
    with job_run(db, job=JOB, as_of=as_of, lookback=window, args=args) as run:
        # One transaction under a SHARE lock on the touchpoints (see lock_sources): no touchpoint
        # can be deleted between the read and the write, so no credit can name a missing one.
        with db.transaction(role="service_role"):
            with run.phase("read"):
                lock_sources(db)
                snapshot = current_snapshot(db)
                base = attribution_base(db)
                why = _full_reason(db, base, args=args, as_of=as_of, full=full)
                anonymous = anonymous_counts(db, since=since, as_of=as_of, window=window)
            if why is None:
                assert base is not None
                # Nothing the base read changed: its credits are what a recomputation would write.
                surfaces = read_run_surfaces(db, base.run_id)
                run.counts = {
                    **{k: int(base.counts.get(k, 0)) for k in _CARRIED},  # type: ignore[call-overload]
                    "touchpoints_read": 0,
                    "credits_inserted": 0,
                    "credits_updated": 0,
                    "credits_deleted": 0,
                }
                run.extra = {"mode": "incremental", "base_run_id": base.run_id}
            else:
                with run.phase("read"):
                    touchpoints = read_attribution_touchpoints(
                        db, since=since, as_of=as_of, window=window
                    )
                with run.phase("compute"):
                    credits = attribute(
                        touchpoints.lazy().drop("bad_amount"),
                        models=models,
                        window=window,
                        half_life=half_life,
                        since=since,
                        as_of=as_of,
                    ).collect()
                    surfaces = surface_summary(credits.lazy()).collect()
                with run.phase("write"):
                    stored = read_stored_credits(db, models=models, since=since, as_of=as_of)
                    # One plan for the three parts: the key join is computed once, not three times.
                    inserts, updates, deletes = pl.collect_all(
                        list(diff_credits(credits.lazy(), stored.lazy()))
                    )
                    del stored
                    written = write_credit_changes(
                        db, inserts=inserts, updates=updates, deletes=deletes, run_id=run.run_id
                    )
                run.counts = {
                    "touchpoints_read": touchpoints.height,
                    "conversions": credits["conversion_id"].n_unique(),
                    "conversions_bad_amount": int(touchpoints["bad_amount"].sum()),
                    "credits": credits.height,
                    **{f"credits_{k}": v for k, v in written.items()},
                }
                run.extra = {"mode": "full", "full_reason": why}
            write_run_surfaces(db, run.run_id, surfaces)
        run.counts["anonymous_touchpoints"] = int(anonymous["touchpoints"].sum())
        run.counts["mode"] = run.extra["mode"]
        run.extra["read_snapshot"] = snapshot
        report = AttributionReport(
            run_id=run.run_id,
            models=tuple(models),
            window=window,
            half_life=half_life,
            since=since,
            as_of=as_of,
            surfaces=surfaces,
            anonymous=anonymous,
            counts=dict(run.counts),
        )
        report.timings = run.timings
    return report
