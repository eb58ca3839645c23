"""Pure shaping of the dashboard's data (``derive report``): frames in, plot-ready frames out.

The database already aggregates per day; here the days of the window are completed (a quiet day
is a zero, not a gap), transitions are classified and series are pivoted into columns.
"""

from __future__ import annotations

from datetime import date

import polars as pl

from derive.config import STATES
from derive.transforms.states import state_index

TRANSITION_KINDS: tuple[str, ...] = ("first_seen", "upgrade", "downgrade")


def day_grid(start: date, end: date) -> pl.LazyFrame:
    """Every UTC day from ``start`` to ``end`` inclusive, as a ``day`` date column."""
    return pl.LazyFrame({"day": pl.date_range(start, end, interval="1d", eager=True)})


def state_funnel(distribution: pl.LazyFrame, /) -> pl.LazyFrame:
    """Users per state and users who reached at least that state, S0..S5 in order.

    Args:
        distribution: ``current_state``, ``users`` (missing states count as zero).
    """
    states = pl.LazyFrame({"state": list(STATES), "order": list(range(len(STATES)))})
    return (
        states.join(
            distribution.select(state="current_state", users="users"), on="state", how="left"
        )
        .with_columns(pl.col("users").fill_null(0).cast(pl.Int64))
        .sort("order", descending=True)
        .with_columns(reached=pl.col("users").cum_sum())
        .sort("order")
        .with_columns(
            share_reached=pl.when(pl.col("reached").first() > 0)
            .then(pl.col("reached") / pl.col("reached").first())
            .otherwise(0.0)
        )
        .select("state", "users", "reached", "share_reached")
    )


def transition_kind() -> pl.Expr:
    """``first_seen`` (no prior state), ``upgrade`` or ``downgrade``."""
    return (
        pl.when(pl.col("prior_state").is_null() | (pl.col("prior_state") == ""))
        .then(pl.lit("first_seen"))
        .when(state_index("new_state") > state_index("prior_state"))
        .then(pl.lit("upgrade"))
        .otherwise(pl.lit("downgrade"))
    )


def _pivot_days(
    frame: pl.LazyFrame, series: list[str], *, column: str, start: date, end: date
) -> pl.LazyFrame:
    """``day`` + one count column per series value, zero-filled over the whole window."""
    totals = frame.group_by("day", column).agg(n=pl.col("n").sum())
    wide = totals.group_by("day").agg(
        [pl.col("n").filter(pl.col(column) == s).sum().alias(s) for s in series]
    )
    return (
        day_grid(start, end)
        .join(wide, on="day", how="left")
        .with_columns([pl.col(s).fill_null(0).cast(pl.Int64) for s in series])
        .sort("day")
        .select("day", *series)
    )


def transitions_by_day(daily: pl.LazyFrame, /, *, start: date, end: date) -> pl.LazyFrame:
    """Audit steps per day by kind (``first_seen``, ``upgrade``, ``downgrade``).

    Args:
        daily: ``day`` (datetime), ``prior_state``, ``new_state``, ``n``.
    """
    kinds = daily.select(pl.col("day").cast(pl.Date), kind=transition_kind(), n="n")
    return _pivot_days(kinds, list(TRANSITION_KINDS), column="kind", start=start, end=end)


def transition_totals(daily: pl.LazyFrame, /) -> pl.LazyFrame:
    """Audit steps per (prior, new) over the window, most frequent first."""
    return (
        daily.with_columns(kind=transition_kind())
        .group_by("prior_state", "new_state", "kind")
        .agg(n=pl.col("n").sum())
        .with_columns(
            step=pl.concat_str(
                [
                    pl.when(pl.col("prior_state") == "")
                    .then(pl.lit("new"))
                    .otherwise(pl.col("prior_state")),
                    pl.col("new_state"),
                ],
                separator=" → ",
            )
        )
        .sort(["n", "step"], descending=[True, False])
        .select("step", "kind", "n")
    )


def rejections_by_day(
    daily: pl.LazyFrame, /, *, reasons: list[str], start: date, end: date
) -> pl.LazyFrame:
    """Logged rejections per day, one column per reason.

    Args:
        daily: ``day`` (datetime), ``reason``, ``n``.
        reasons: the series, in legend order.
    """
    frame = daily.select(pl.col("day").cast(pl.Date), "reason", "n")
    return _pivot_days(frame, reasons, column="reason", start=start, end=end)


def run_series(runs: pl.LazyFrame, /) -> pl.LazyFrame:
    """Finished runs oldest first, labelled for the duration chart.

    Args:
        runs: ``started_at``, ``job``, ``status``, ``seconds``, ``full_run``.
    """
    return (
        runs.sort("started_at")
        .with_columns(
            label=pl.concat_str(
                [
                    pl.col("job"),
                    pl.when(pl.col("full_run")).then(pl.lit("")).otherwise(pl.lit(" (users)")),
                ]
            ),
            series=pl.when(pl.col("status") == "failed")
            .then(pl.lit("failed"))
            .when(pl.col("full_run"))
            .then(pl.lit("full run"))
            .otherwise(pl.lit("user subset")),
        )
        .select("started_at", "job", "status", "seconds", "label", "series")
    )


def score_bins(histogram: pl.LazyFrame, /, *, width: float, bins: int) -> pl.LazyFrame:
    """Every score bin 0..bins-1 with its users per state as columns S0..S5 (zeros filled).

    Args:
        histogram: ``bin``, ``current_state``, ``users``; bins at or beyond ``bins`` (the top
            score itself) join the last bin.
        width: the bin width, for the ``label`` column ("10-20").
        bins: how many bins to show.
    """
    grid = pl.LazyFrame({"bin": list(range(bins))}, schema={"bin": pl.Int64()})
    counts = histogram.with_columns(pl.col("bin").clip(0, bins - 1))
    wide = _pivot_states(counts, index="bin")
    return (
        grid.join(wide, on="bin", how="left")
        .with_columns(pl.col(list(STATES)).fill_null(0))
        .with_columns(
            label=pl.format(
                "{}-{}",
                (pl.col("bin") * width).round(2),
                ((pl.col("bin") + 1) * width).round(2),
            )
        )
        .sort("bin")
    )


def states_over_time(history: pl.LazyFrame, /) -> pl.LazyFrame:
    """Users per state (columns S0..S5, zeros filled) at each history step, oldest first.

    Args:
        history: ``as_of``, ``current_state``, ``users``.
    """
    return _pivot_states(history, index="as_of").sort("as_of")


def _pivot_states(frame: pl.LazyFrame, *, index: str) -> pl.LazyFrame:
    summed = frame.group_by(index).agg(
        [
            pl.col("users").filter(pl.col("current_state") == state).sum().alias(state)
            for state in STATES
        ]
    )
    return summed.with_columns(pl.col(list(STATES)).fill_null(0).cast(pl.Int64))
