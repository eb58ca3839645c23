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


def metric_expr(metric: MetricDef, rules: Rules, as_of: datetime) -> pl.Expr:
    """The aggregation expression of one metric (per user, inside ``group_by``)."""
    mask = _mask(metric, rules, as_of)
    if metric.kind == "score":
        weight = pl.col("event_type").replace_strict(
            rules.weights, default=0.0, return_dtype=pl.Float64
        )
        points = pl.when(mask & qualified(rules)).then(weight).otherwise(0.0)
        return points.sum().round(6).alias(metric.name)
    if metric.kind == "sessions":
        return (
            pl.col("session_id")
            .filter(mask)
            .drop_nulls()
            .n_unique()
            .cast(pl.Int64)
            .alias(metric.name)
        )
    return mask.sum().cast(pl.Int64).alias(metric.name)


def user_metrics(events: pl.LazyFrame, /, *, as_of: datetime, rules: Rules) -> pl.LazyFrame:
    """One row per user: every rules metric, ``last_event_type`` and ``latest_event_at``.

    ``last_event_type`` is the type of the latest event, ties broken by id (SPEC §2.5).
    """
    latest = pl.col("created_at").max()
    at_latest = pl.col("created_at") == latest
    return (
        events.group_by(uuid_key("user_id").alias("_user"))
        .agg(
            pl.col("user_id").first(),
            *[metric_expr(m, rules, as_of) for m in rules.metrics],
            # The latest event's type; among events at the same instant, the greatest id.
            pl.col("event_type")
            .filter(at_latest)
            .get(uuid_key("id").filter(at_latest).arg_max())
            .alias(LAST_EVENT_TYPE),
            latest.alias(LATEST_EVENT_AT),
        )
        .drop("_user")
    )
