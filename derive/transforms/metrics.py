"""Per-user metrics (SPEC §2.5) over valid, deduplicated, non-system events.

Each metric of the rules file becomes one aggregation expression, so all users and all metrics
come out of a single ``group_by``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl

from derive.config import MetricDef, Rules
from derive.transforms.dedupe import uuid_key

#: Columns every user gets besides the rules' metrics.
LAST_EVENT_TYPE = "last_event_type"
LATEST_EVENT_AT = "latest_event_at"


def qualified(rules: Rules) -> pl.Expr:
    """A ``content_view`` qualifies by duration or scroll depth; other types always do."""
    return (pl.col("event_type") != rules.qualified_event_type) | (
        (pl.col("duration") >= rules.min_duration_seconds)
        | (pl.col("scroll_depth") >= rules.min_scroll_depth_percent)
    )


def within(days: int, as_of: datetime) -> pl.Expr:
    """``created_at`` within ``days`` before ``as_of`` (inclusive bounds, SPEC §2)."""
    return (pl.col("created_at") >= as_of - timedelta(days=days)) & (pl.col("created_at") <= as_of)


def _mask(metric: MetricDef, rules: Rules, as_of: datetime) -> pl.Expr:
    terms = [pl.lit(True)]
    if metric.event_types:
        terms.append(pl.col("event_type").is_in(list(metric.event_types)))
    if metric.categories:
        terms.append(pl.col("event_category").is_in(list(metric.categories)))
    if metric.within_days is not None:
        terms.append(within(metric.within_days, as_of))
    if metric.only == "qualified":
        terms.append(qualified(rules))
    if metric.only == "consented":
        terms.append(pl.col("consent_recorded").fill_null(False))
    return pl.all_horizontal(terms)


def metric_column(metric: MetricDef, rules: Rules, as_of: datetime) -> pl.Expr:
    """The row-level contribution of one event to a metric (summed or counted per user).

    Computing these as plain columns and aggregating with sums is ~3x faster than filtering
    inside the ``group_by`` (measured on 2.2M events).
    """
    mask = _mask(metric, rules, as_of)
    if metric.kind == "score":
        weight = pl.col("event_type").replace_strict(
            rules.weights, default=0.0, return_dtype=pl.Float64
        )
        return pl.when(mask & qualified(rules)).then(weight).otherwise(0.0)
    if metric.kind == "sessions":
        return pl.when(mask).then(pl.col("session_id"))
    return mask.cast(pl.Int32)


def _aggregate(metric: MetricDef) -> pl.Expr:
    column = pl.col(f"_m_{metric.name}")
    if metric.kind == "score":
        return column.sum().round(6).alias(metric.name)
    if metric.kind == "sessions":
        return column.drop_nulls().n_unique().cast(pl.Int64).alias(metric.name)
    return column.sum().cast(pl.Int64).alias(metric.name)


def user_metrics(events: pl.LazyFrame, /, *, as_of: datetime, rules: Rules) -> pl.LazyFrame:
    """One row per user: every rules metric, ``last_event_type`` and ``latest_event_at``.

    ``last_event_type`` is the type of the latest event, ties broken by the greatest id (SPEC
    §2.5). The common case (one latest event) is an ``arg_max``; only users with several events at
    their latest instant are resolved again by id.
    """
    rows = events.with_columns(
        uuid_key("user_id").alias("_user"),
        *[metric_column(m, rules, as_of).alias(f"_m_{m.name}") for m in rules.metrics],
    )
    latest = pl.col("created_at").max()
    per_user = rows.group_by("_user").agg(
        pl.col("user_id").first(),
        *[_aggregate(m) for m in rules.metrics],
        pl.col("event_type").get(pl.col("created_at").arg_max()).alias(LAST_EVENT_TYPE),
        latest.alias(LATEST_EVENT_AT),
        (pl.col("created_at") == latest).sum().alias("_at_latest"),
    )
    at_latest = pl.col("created_at") == pl.col(LATEST_EVENT_AT)
    tied = (
        rows.join(
            per_user.filter(pl.col("_at_latest") > 1).select("_user", LATEST_EVENT_AT),
            on="_user",
            how="inner",
        )
        .filter(at_latest)
        .group_by("_user")
        .agg(pl.col("event_type").get(uuid_key("id").arg_max()).alias("_tie_type"))
    )
    return (
        per_user.join(tied, on="_user", how="left")
        .with_columns(pl.coalesce("_tie_type", LAST_EVENT_TYPE).alias(LAST_EVENT_TYPE))
        .drop("_user", "_at_latest", "_tie_type")
    )
