"""Multi-touch attribution of conversions to the surfaces of the prospect's prior touchpoints.

A conversion is a touchpoint of kind subscription_new, tip, booking_confirmed or
booking_completed; its value is ``payload_jsonb.amount`` (0 when absent) in
``payload_jsonb.currency``. Its prior touches are the touchpoints of the same (user_id,
prospect_id) with ``occurred_at`` in ``[conversion - window, conversion)``: the window start is
inclusive, the conversion instant exclusive (so a touch at the very same instant as the
conversion, including a second conversion, is not prior to it). block, unblock and
subscription_cancel never earn credit. Touches are ordered by ``(occurred_at, id)``.

A prior conversion of the same prospect IS a touch on its surface: a tip on one surface that
precedes a booking on another is exactly the kind of cross-surface path attribution is meant to
show, and a conversion is a touchpoint like any other in ``prospect_touchpoints``.

Anonymous touchpoints (prospect_id null) never enter this per-prospect computation, neither as
conversions nor as touches; the job reports them only as aggregate counts.

Models (weights per conversion sum to 1):

- ``first_touch`` / ``last_touch``: all credit to the first / last prior touch;
- ``linear``: ``1 / n`` each;
- ``time_decay``: proportional to ``2 ** (-age / half_life)``, age = conversion - touch, in
  continuous time (not bucketed into days), normalised;
- ``position_based``: one touch 100 %; two 50/50; n >= 3: 40 % first, 40 % last, 20 % split
  evenly over the middle.

A conversion without any prior touch gives full credit to its own surface (``touchpoint_id``
null). Credited values are rounded to 9 decimal places and the rounding remainder goes to the
conversion's largest-weight credit (the latest one among equals), so the credited values of a
conversion sum to its value exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import polars as pl

from derive.schema import (
    CONVERSION_KINDS,
    CREDIT_KEY,
    CREDIT_VALUES,
    CREDITS,
    MODELS,
    NO_CREDIT_KINDS,
    VALUE,
)

_CONVERSION = ["conversion_id"]
_CONVERSION_MODEL = ["conversion_id", "model"]


def conversions(
    touchpoints: pl.LazyFrame,
    /,
    *,
    since: datetime | None = None,
    as_of: datetime | None = None,
) -> pl.LazyFrame:
    """The per-prospect conversions with ``occurred_at`` in ``[since, as_of]``, with their value."""
    frame = touchpoints.filter(
        pl.col("touchpoint").is_in(CONVERSION_KINDS), pl.col("prospect_id").is_not_null()
    )
    if since is not None:
        frame = frame.filter(pl.col("occurred_at") >= since)
    if as_of is not None:
        frame = frame.filter(pl.col("occurred_at") <= as_of)
    return frame.select(
        conversion_id=pl.col("id"),
        user_id="user_id",
        org_id="org_id",
        prospect_id="prospect_id",
        conversion_surface=pl.col("surface"),
        converted_at=pl.col("occurred_at"),
        value=pl.col("amount").cast(VALUE, strict=False).fill_null(pl.lit(0).cast(VALUE)),
        currency="currency",
    )


def prior_touches(
    conversions: pl.LazyFrame, touchpoints: pl.LazyFrame, /, *, window: timedelta
) -> pl.LazyFrame:
    """Each conversion's creditable touches in ``[conversion - window, conversion)``.

    A range join on (user_id, prospect_id) for all conversions at once. Adds ``position`` (0-based,
    by ``(occurred_at, id)``) and ``touches`` (how many priors the conversion has).
    """
    touches = touchpoints.filter(
        pl.col("prospect_id").is_not_null(), ~pl.col("touchpoint").is_in(NO_CREDIT_KINDS)
    ).select(
        touchpoint_id=pl.col("id"),
        touch_user_id=pl.col("user_id"),
        touch_prospect_id=pl.col("prospect_id"),
        surface="surface",
        occurred_at="occurred_at",
    )
    return (
        conversions.select(
            *_CONVERSION,
            "user_id",
            "prospect_id",
            "converted_at",
            window_start=pl.col("converted_at") - window,
        )
        .join_where(
            touches,
            pl.col("user_id") == pl.col("touch_user_id"),
            pl.col("prospect_id") == pl.col("touch_prospect_id"),
            pl.col("occurred_at") >= pl.col("window_start"),
            pl.col("occurred_at") < pl.col("converted_at"),
        )
        .select(*_CONVERSION, "touchpoint_id", "surface", "occurred_at", "converted_at")
        # Explicit order: positions and the (float) time-decay sums never depend on input order.
        .sort("conversion_id", "occurred_at", "touchpoint_id")
        .with_columns(
            position=pl.int_range(pl.len(), dtype=pl.UInt32).over(_CONVERSION),
            touches=pl.len().over(_CONVERSION).cast(pl.UInt32),
        )
    )


def _first_touch() -> pl.Expr:
    return (pl.col("position") == 0).cast(pl.Float64)


def _last_touch() -> pl.Expr:
    return (pl.col("position") == pl.col("touches") - 1).cast(pl.Float64)


def _linear() -> pl.Expr:
    return 1.0 / pl.col("touches").cast(pl.Float64)


def _time_decay(half_life: timedelta) -> pl.Expr:
    age = (pl.col("converted_at") - pl.col("occurred_at")).dt.total_microseconds() / 1e6
    # Measured from the conversion's youngest touch: the ratios (and so the normalised weights)
    # are those of 2^(-age/half_life), but the largest term is 1, so a short half-life over a
    # long window cannot underflow every term to 0.
    relative = age - age.min().over(_CONVERSION)
    raw = pl.lit(2.0).pow(-relative / half_life.total_seconds())
    return raw / raw.sum().over(_CONVERSION)


def _position_based() -> pl.Expr:
    n = pl.col("touches")
    end = (pl.col("position") == 0) | (pl.col("position") == n - 1)
    return (
        pl.when(n == 1)
        .then(1.0)
        .when(n == 2)
        .then(0.5)
        .when(end)
        .then(0.4)
        .otherwise(0.2 / (n.cast(pl.Float64) - 2.0))
    )


def model_weight(model: str, *, half_life: timedelta) -> pl.Expr:
    """The weight expression of ``model`` over a :func:`prior_touches` frame."""
    if model == "first_touch":
        return _first_touch()
    if model == "last_touch":
        return _last_touch()
    if model == "linear":
        return _linear()
    if model == "time_decay":
        return _time_decay(half_life)
    if model == "position_based":
        return _position_based()
    raise ValueError(f"unknown attribution model {model!r}; use one of {', '.join(MODELS)}")


def _distribute_value() -> pl.Expr:
    """``weight * value`` at 9 decimals, the exact remainder on the largest (latest) weight."""
    share = (pl.col("weight") * pl.col("value").cast(pl.Float64)).round(9).cast(VALUE)
    remainder = pl.col("value") - share.sum().over(_CONVERSION_MODEL)
    anchor = pl.col("position") == (
        pl.col("position").filter(pl.col("weight") == pl.col("weight").max()).max()
    ).over(_CONVERSION_MODEL)
    return pl.when(anchor).then(share + remainder).otherwise(share)


def attribute(
    touchpoints: pl.LazyFrame,
    /,
    *,
    models: Sequence[str],
    window: timedelta,
    half_life: timedelta,
    since: datetime | None = None,
    as_of: datetime | None = None,
) -> pl.LazyFrame:
    """Credits of every conversion in ``[since, as_of]`` under each of ``models``.

    Args:
        touchpoints: shaped like :data:`TOUCHPOINTS`; must hold the touches back to
            ``since - window`` for the result to be complete.
        models: names from :data:`MODELS`.
        window: how far back a touch may lie before its conversion.
        half_life: of ``time_decay``.

    Returns:
        Frame shaped like :data:`CREDITS`, rows with weight 0 (e.g. the middle touches under
        first_touch) left out.
    """
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown attribution models {unknown}; use some of {', '.join(MODELS)}")
    convs = conversions(touchpoints, since=since, as_of=as_of)
    priors = prior_touches(convs, touchpoints, window=window)
    weighted = (
        priors.with_columns(**{f"weight_{m}": model_weight(m, half_life=half_life) for m in models})
        .unpivot(
            index=[*_CONVERSION, "touchpoint_id", "surface", "position"],
            on=[f"weight_{m}" for m in models],
            variable_name="model",
            value_name="weight",
        )
        .with_columns(pl.col("model").str.strip_prefix("weight_"))
    )
    own_surface = (
        convs.join(priors.select(_CONVERSION).unique(), on=_CONVERSION, how="anti")
        .join(pl.LazyFrame({"model": list(models)}, schema={"model": pl.String}), how="cross")
        .select(
            *_CONVERSION,
            touchpoint_id=pl.lit(None, dtype=touchpoints.collect_schema()["id"]),
            surface=pl.col("conversion_surface"),
            position=pl.lit(0, dtype=pl.UInt32),
            model="model",
            weight=pl.lit(1.0),
        )
    )
    credits = pl.concat([weighted.filter(pl.col("weight") > 0), own_surface], how="vertical")
    days = 86400.0
    return (
        credits.join(convs, on=_CONVERSION, how="inner")
        .with_columns(
            attributed_value=_distribute_value(),
            window_days=pl.lit(window.total_seconds() / days),
            half_life_days=pl.when(pl.col("model") == "time_decay").then(
                pl.lit(half_life.total_seconds() / days)
            ),
        )
        .select(CREDITS.names())
    )


def diff_credits(
    computed: pl.LazyFrame, stored: pl.LazyFrame, /
) -> tuple[pl.LazyFrame, pl.LazyFrame, pl.LazyFrame]:
    """What to write so that ``stored`` becomes ``computed``: (inserts, updates, deletes).

    Args:
        computed: credits shaped like :data:`CREDITS`.
        stored: the stored credits of the same conversions and models (:data:`STORED_CREDITS`).

    Returns:
        ``inserts`` (:data:`CREDITS` rows with no stored counterpart), ``updates`` (the stored
        ``id`` with the new values, only where a value differs) and ``deletes`` (``id`` of stored
        credits that are no longer computed). Identical rows appear in none of them, so a re-run
        over unchanged data writes nothing.
    """
    key = list(CREDIT_KEY)
    joined = computed.with_columns(_computed=pl.lit(True)).join(
        stored.rename({c: f"{c}_stored" for c in CREDIT_VALUES}),
        on=key,
        how="full",
        nulls_equal=True,
        coalesce=True,
    )
    is_new = pl.col("id").is_null()
    is_gone = pl.col("_computed").is_null()
    changed = pl.any_horizontal(
        *[pl.col(c).ne_missing(pl.col(f"{c}_stored")) for c in CREDIT_VALUES]
    )
    inserts = joined.filter(is_new).select(CREDITS.names())
    updates = joined.filter(~is_new, ~is_gone, changed).select("id", *CREDITS.names())
    deletes = joined.filter(is_gone).select("id")
    return inserts, updates, deletes


def surface_summary(credits: pl.LazyFrame, /) -> pl.LazyFrame:
    """Attributed value per (model, surface, currency), with conversion and credit counts."""
    return (
        credits.group_by("model", "surface", "currency")
        .agg(
            conversions=pl.col("conversion_id").n_unique().cast(pl.UInt32),
            credits=pl.len().cast(pl.UInt32),
            attributed_value=pl.col("attributed_value").sum(),
        )
        .sort("model", "surface", "currency", nulls_last=True)
    )
