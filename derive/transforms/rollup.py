"""Cross-surface rollup of surface metrics into metric aggregates (SPEC §3).

Values travel as ``value_e4``: the numeric(18,4) value times 10^4 as an integer, so sums and
comparisons are exact (PostgreSQL converts on read and write). The stages, composed by the job:

1. :func:`latest_per_surface` - insert-only sources are deduplicated on read: the newest fetch of
   each (user, surface, metric_kind, window) wins;
2. :func:`aggregate_across_surfaces` - one aggregate per (user, metric_kind, window), aggregated
   as the rules file says for the kind, with the per-surface breakdown and the currency rule;
   :func:`surface_values` - the same breakdown in long form, for the diff;
3. :func:`plan_rollup` - the diff against the stored aggregates that were due: what to write
   (with the cadence's ``stale_after``, :func:`stale_after`) and what only gets a new one, which
   needs no write: it follows from the run's clock (:func:`rollup_clock`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl

from derive.metrics_rules import MetricsRules

TS = pl.Datetime("us", "UTC")
UUID = pl.Binary()

#: One aggregate is identified by these columns (the table's unique key).
KEY: list[str] = ["user_id", "metric_kind", "window_start", "window_end"]

#: ``surface_metrics`` rows as read (candidates: no fresh aggregate covers their key).
SOURCES = pl.Schema(
    {
        "id": UUID,
        "user_id": UUID,
        "org_id": UUID,
        "surface": pl.String(),
        "metric_kind": pl.String(),
        "window_start": TS,
        "window_end": TS,
        "value_e4": pl.Int64(),
        "currency": pl.String(),
        "fetched_at": TS,
        "created_at": TS,
    }
)

#: Stored aggregates that are due (``stale_after <= as_of``).
STORED = pl.Schema(
    {
        "user_id": UUID,
        "org_id": UUID,
        "metric_kind": pl.String(),
        "window_start": TS,
        "window_end": TS,
        "value_e4": pl.Int64(),
        "currency": pl.String(),
        "surfaces_included": pl.List(pl.String()),
        "computed_at": TS,
    }
)

#: The stored ``surface_breakdown`` of those aggregates, one row per surface.
STORED_PARTS = pl.Schema(
    {
        "user_id": UUID,
        "metric_kind": pl.String(),
        "window_start": TS,
        "window_end": TS,
        "surface": pl.String(),
        "value_e4": pl.Int64(),
    }
)

#: Computed aggregates. ``status`` is ``ok`` or why the key cannot be aggregated; ``currencies``
#: lists the contributing rows' currencies in surface order (see :func:`skipped` for the distinct
#: ones).
AGGREGATES = pl.Schema(
    {
        "user_id": UUID,
        "org_id": UUID,
        "metric_kind": pl.String(),
        "window_start": TS,
        "window_end": TS,
        "value_e4": pl.Int64(),
        "currency": pl.String(),
        "currencies": pl.List(pl.String()),
        "surfaces_included": pl.List(pl.String()),
        "surface_breakdown": pl.String(),
        "status": pl.String(),
        "fetched_at": TS,
    }
)

#: One row per (aggregate, surface) of the breakdown.
PARTS = STORED_PARTS

#: What the write does per key: ``write`` (insert or recompute, with the surfaces and the
#: breakdown as JSON text), ``touch`` (nothing is written: the row's stale_after moves with the
#: rollup clock, :func:`rollup_clock`; surfaces and breakdown null) or
#: ``delete`` (the stored aggregate's sources can no longer be aggregated). ``refetched``: a
#: ``refreshed`` key whose sources were fetched again after the aggregate was computed, with
#: identical values.
PLAN = pl.Schema(
    {
        "user_id": UUID,
        "org_id": UUID,
        "metric_kind": pl.String(),
        "window_start": TS,
        "window_end": TS,
        "value_e4": pl.Int64(),
        "currency": pl.String(),
        "action": pl.String(),
        "outcome": pl.String(),
        "final": pl.Boolean(),
        "stale_after": TS,
        "computed_at": TS,
        "surfaces_included": pl.List(pl.String()),
        "surface_breakdown": pl.String(),
        "refetched": pl.Boolean(),
    }
)

#: Why a key is not aggregated (``status`` values other than ``ok``).
SKIP_STATUSES: tuple[str, ...] = ("mixed_currency", "no_numeric_value", "out_of_range", "no_rule")

#: Plan outcomes: inserted (missing aggregate), recomputed (sources advanced), refreshed (stale,
#: unchanged: only stale_after moves; identical re-fetches included), removed (the sources of a
#: stored aggregate now mix currencies or lost their numeric values: the stored total would
#: contradict them, so the row is deleted and the key reported as not aggregated).
OUTCOMES: tuple[str, ...] = ("inserted", "recomputed", "refreshed", "removed")

# numeric(18,4) holds |value| < 10^14, i.e. |value_e4| < 10^18.
_MAX_E4 = 10**18


def latest_per_surface(sources: pl.LazyFrame, /) -> pl.LazyFrame:
    """Keep the newest fetch of each (user, surface, metric_kind, window).

    Ties on ``fetched_at`` go to the later ``created_at`` (the later ingest), then the larger id:
    the ingest gives a file's rows time-ordered ids in file order, so within one file the later
    object (and the later row of an object) wins. The choice never depends on input order.
    """
    order = ["fetched_at", "created_at", "id"]
    return sources.sort(order, descending=True, nulls_last=True).unique(
        subset=[*KEY, "surface"], keep="first", maintain_order=False
    )


def _rules_frame(rules: MetricsRules) -> pl.LazyFrame:
    return pl.LazyFrame(
        {
            "metric_kind": [k.name for k in rules.kinds],
            "aggregate": [k.aggregate for k in rules.kinds],
            "monetary": [k.monetary for k in rules.kinds],
        },
        schema={"metric_kind": pl.String(), "aggregate": pl.String(), "monetary": pl.Boolean},
    )


def json_string(text: pl.Expr, /) -> pl.Expr:
    """``text`` as a JSON string literal (quoted and escaped by the JSON encoder)."""
    return (
        pl.struct(text.alias("s"))
        .struct.json_encode()
        .str.strip_prefix('{"s":')
        .str.strip_suffix("}")
    )


def decimal_text(value_e4: pl.Expr, /) -> pl.Expr:
    """``value_e4`` as the shortest exact decimal text (``1234500`` -> ``123.45``)."""
    magnitude = value_e4.abs()
    fraction = (magnitude % 10_000).cast(pl.String).str.zfill(4).str.strip_chars_end("0")
    return pl.concat_str(
        pl.when(value_e4 < 0).then(pl.lit("-")).otherwise(pl.lit("")),
        (magnitude // 10_000).cast(pl.String),
        pl.when(fraction.str.len_chars() > 0).then(pl.lit(".") + fraction).otherwise(pl.lit("")),
    )


def aggregate_across_surfaces(latest: pl.LazyFrame, /, *, rules: MetricsRules) -> pl.LazyFrame:
    """Aggregate the latest per-surface values into one row per (user, metric_kind, window).

    The kind's ``aggregate`` in the rules picks the statistic: ``sum`` (additive counts and
    amounts), ``mean`` (rates, rounded half away from zero to 4 decimals), ``min`` / ``max``
    (ranks: best position). Monetary kinds are aggregated only when every contributing surface
    reports the same currency; otherwise the key gets ``status = mixed_currency`` and no value.
    Rows without ``value_numeric`` (text-only ranks such as "Boosted") do not contribute; a key
    with only such rows gets ``no_numeric_value``. The aggregate's org is the largest non-null
    org_id of its sources (a user's rows normally share one org). ``surface_breakdown`` is the
    ``{surface: value}`` JSON object, surfaces in byte order (names escaped by the JSON encoder,
    values exact decimals).

    Returns:
        One row per key, shaped as :data:`AGGREGATES`.
    """
    has_value = pl.col("value_e4").is_not_null()
    member = pl.concat_str(
        json_string(pl.col("surface")), pl.lit(": "), decimal_text(pl.col("value_e4"))
    )
    value = pl.col("value_e4").cast(pl.Int128)
    # One explicit sort up front: groups keep their rows in surface order (no per-group sort),
    # and one group_by computes every statistic.
    stats = (
        latest.sort([*KEY, "surface"])
        .with_columns(member=member)
        .group_by(KEY, maintain_order=True)
        .agg(
            org_id=pl.col("org_id").max(),
            n_values=pl.col("value_e4").count(),
            sum=value.sum(),
            mean=value.mean().round(0, mode="half_away_from_zero").cast(pl.Int128),
            min=value.min(),
            max=value.max(),
            n_currencies=pl.col("currency").filter(has_value).n_unique(),
            currencies=pl.col("currency").filter(has_value),
            surfaces_included=pl.col("surface").filter(has_value),
            members=pl.col("member").drop_nulls().str.join(", "),
            fetched_at=pl.col("fetched_at").filter(has_value).max(),
        )
        .join(_rules_frame(rules), on="metric_kind", how="left", maintain_order="left")
    )
    chosen = (
        pl.when(pl.col("aggregate") == "sum")
        .then("sum")
        .when(pl.col("aggregate") == "mean")
        .then("mean")
        .when(pl.col("aggregate") == "min")
        .then("min")
        .when(pl.col("aggregate") == "max")
        .then("max")
    )
    status = (
        pl.when(pl.col("aggregate").is_null())
        .then(pl.lit("no_rule"))
        .when(pl.col("n_values") == 0)
        .then(pl.lit("no_numeric_value"))
        .when(pl.col("monetary") & (pl.col("n_currencies") > 1))
        .then(pl.lit("mixed_currency"))
        .when(chosen.abs() >= _MAX_E4)
        .then(pl.lit("out_of_range"))
        .otherwise(pl.lit("ok"))
    )
    ok = pl.col("status") == "ok"
    return (
        stats.with_columns(status=status)
        .select(
            *KEY[:1],
            "org_id",
            *KEY[1:],
            value_e4=pl.when(ok).then(chosen).cast(pl.Int64),
            currency=pl.when(ok & pl.col("monetary")).then(pl.col("currencies").list.first()),
            currencies="currencies",
            surfaces_included="surfaces_included",
            surface_breakdown=pl.when(ok).then(pl.lit("{") + pl.col("members") + pl.lit("}")),
            status="status",
            fetched_at="fetched_at",
        )
        .cast(AGGREGATES)
    )


def surface_values(latest: pl.LazyFrame, /) -> pl.LazyFrame:
    """The numeric value of each surface per key (the long form of the breakdown, for the diff)."""
    return (
        latest.filter(pl.col("value_e4").is_not_null())
        .select(*KEY, "surface", "value_e4")
        .cast(PARTS)
    )


def stale_after(window_end: pl.Expr, /, *, as_of: datetime, rules: MetricsRules) -> pl.Expr:
    """``as_of`` + the refresh interval of the youngest cadence band the window's age fits in.

    The age is ``as_of - window_end``; a band holds ages up to and including its ``max_age`` (a
    window still open has a negative age: youngest band). Null means final ('infinity'): the
    window ended longer ago than the last band.
    """
    age = pl.lit(as_of, TS) - window_end
    expr: pl.Expr = pl.lit(None, TS)
    for band in reversed(rules.cadence):
        expr = (
            pl.when(age <= pl.lit(band.max_age))
            .then(pl.lit(as_of + band.refresh_every, TS))
            .otherwise(expr)
        )
    return expr


#: Where the ticks of every cadence band are counted from (see :func:`next_tick`).
GRID_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)


def next_tick(at: datetime, every: timedelta) -> datetime:
    """The first multiple of ``every`` after :data:`GRID_ORIGIN` that lies strictly after ``at``."""
    return GRID_ORIGIN + ((at - GRID_ORIGIN) // every + 1) * every


def rollup_clock(*, as_of: datetime, rules: MetricsRules) -> tuple[list[datetime], list[datetime]]:
    """``(band_from, band_next)``: the new ``stale_after`` of aggregates found unchanged at ``as_of``.

    An aggregate that is due and whose sources did not change is not rewritten: the run records
    this clock (table ``rollup_clock``) and the ``metric_aggregates`` view derives its
    ``stale_after`` from it. ``band_from`` holds ascending ``window_end`` thresholds and
    ``band_next[i]`` the stale_after of windows ending in ``[band_from[i], band_from[i+1])``:
    the next tick (:func:`next_tick`) of the band the window's age at ``as_of`` falls in, so at
    most ``refresh_every`` after ``as_of``. Windows ending before ``band_from[0]`` are final:
    their age exceeded the last band's ``max_age`` at the last band's latest tick up to ``as_of``
    (so a window is only ever made final by a rollup that was due to look at it). Windows older
    than the last band but not final yet get the last band's next tick.
    """
    bands = list(reversed(rules.cadence))  # slowest first: thresholds ascend
    last = bands[0]
    final_from = next_tick(as_of, last.refresh_every) - last.refresh_every - last.max_age
    band_from = [final_from, *(as_of - b.max_age for b in bands[1:])]
    band_next = [next_tick(as_of, b.refresh_every) for b in bands]
    return band_from, band_next


def due_window_end(
    band_from: list[datetime], band_next: list[datetime], /, *, as_of: datetime
) -> datetime | None:
    """The oldest ``window_end`` whose unchanged aggregates a recorded clock makes due by ``as_of``.

    An aggregate stored with a ``computed_stale_after`` the clock has passed shows its band's
    tick (see :func:`rollup_clock`); the ticks fall from the slowest band to the youngest, so the
    bands due by ``as_of`` are the youngest ones, i.e. every window that ended at or after the
    returned instant (``None``: none is due).
    """
    due = [start for start, tick in zip(band_from, band_next, strict=True) if tick <= as_of]
    return min(due) if due else None


def checked_stale_after(window_end: pl.Expr, /, *, as_of: datetime, rules: MetricsRules) -> pl.Expr:
    """The ``stale_after`` an unchanged aggregate shows after a rollup at ``as_of`` (null: final).

    The same lookup the ``metric_aggregates`` view does with :func:`rollup_clock`.
    """
    band_from, band_next = rollup_clock(as_of=as_of, rules=rules)
    expr: pl.Expr = pl.lit(None, TS)
    for start, tick in zip(band_from, band_next, strict=True):
        expr = pl.when(window_end >= pl.lit(start, TS)).then(pl.lit(tick, TS)).otherwise(expr)
    return expr


def plan_rollup(
    aggregates: pl.LazyFrame,
    parts: pl.LazyFrame,
    stored: pl.LazyFrame,
    stored_parts: pl.LazyFrame,
    /,
    *,
    as_of: datetime,
    rules: MetricsRules,
) -> pl.LazyFrame:
    """Diff the computed aggregates against the stored aggregates that are due.

    ``aggregates`` covers only keys without a fresh aggregate (missing or due), ``parts`` is their
    :func:`surface_values`, ``stored`` / ``stored_parts`` only the due aggregates. A key with no stored row is ``inserted``; a due key whose content (value,
    currency, org, surfaces, breakdown) differs is ``recomputed``; a due key whose content is
    unchanged or lost its sources is ``refreshed``: only its ``stale_after`` moves (by the
    clock, :func:`rollup_clock`, without a write); one whose sources cannot be aggregated any
    more (mixed currencies ...) is ``removed``. Aggregates that are not due are not in the inputs and are
    never touched.

    Returns:
        :data:`PLAN` rows.
    """
    new_cols = ["org_id", "value_e4", "currency", "surfaces_included"]
    joined = aggregates.join(
        stored.with_columns(stored=pl.lit(True)).rename({c: f"{c}_old" for c in new_cols}),
        on=KEY,
        how="full",
        coalesce=True,
    ).with_columns(pl.col("stored").fill_null(False))
    part_changed = (
        parts.join(stored.select(KEY), on=KEY, how="semi")
        .join(stored_parts, on=[*KEY, "surface"], how="full", coalesce=True, suffix="_old")
        .filter(pl.col("value_e4").ne_missing(pl.col("value_e4_old")))
        .select(KEY)
        .unique()
        .with_columns(part_changed=pl.lit(True))
    )
    header_changed = pl.any_horizontal([pl.col(c).ne_missing(pl.col(f"{c}_old")) for c in new_cols])
    ok = pl.col("status") == "ok"
    outcome = (
        pl.when(ok & ~pl.col("stored"))
        .then(pl.lit("inserted"))
        .when(ok & (header_changed | pl.col("part_changed")))
        .then(pl.lit("recomputed"))
        .when(pl.col("stored") & pl.col("status").is_not_null() & ~ok)
        .then(pl.lit("removed"))
        .when(pl.col("stored"))
        .then(pl.lit("refreshed"))
    )
    refetched = (
        (pl.col("outcome") == "refreshed")
        & ok.fill_null(False)
        & (pl.col("fetched_at") > pl.col("computed_at")).fill_null(False)
    )
    action = (
        pl.when(pl.col("outcome") == "refreshed")
        .then(pl.lit("touch"))
        .when(pl.col("outcome") == "removed")
        .then(pl.lit("delete"))
        .otherwise(pl.lit("write"))
    )
    writes = pl.col("action") == "write"
    # Written rows get the cadence's stale_after; unchanged ones are not rewritten and show the
    # clock's (the value here only decides whether they count as final).
    due = (
        pl.when(writes)
        .then(stale_after(pl.col("window_end"), as_of=as_of, rules=rules))
        .otherwise(checked_stale_after(pl.col("window_end"), as_of=as_of, rules=rules))
    )
    plan = (
        joined.join(part_changed, on=KEY, how="left")
        .with_columns(pl.col("part_changed").fill_null(False))
        .with_columns(outcome=outcome)
        .filter(pl.col("outcome").is_not_null())
        .with_columns(action=action)
        .with_columns(stale_after=due)
        .select(
            *KEY[:1],
            "org_id",
            *KEY[1:],
            "value_e4",
            "currency",
            "action",
            "outcome",
            final=pl.col("stale_after").is_null(),
            stale_after="stale_after",
            computed_at=pl.lit(as_of, TS),
            surfaces_included=pl.when(writes).then(pl.col("surfaces_included")),
            surface_breakdown=pl.when(writes).then(pl.col("surface_breakdown")),
            refetched=refetched,
        )
        .cast(PLAN)
    )
    return plan


def skipped(aggregates: pl.LazyFrame, /) -> pl.LazyFrame:
    """The keys that could not be aggregated, with their status and distinct currencies."""
    return aggregates.filter(pl.col("status") != "ok").select(
        *KEY,
        "status",
        pl.col("currencies").list.unique().list.sort(nulls_last=True),
        "surfaces_included",
    )
