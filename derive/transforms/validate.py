"""Event validation (SPEC §2.2): every event gets a verdict, invalid ones a reason.

An invalid event is discarded and counted by reason; it never fails the run.
"""

from __future__ import annotations

import polars as pl

from derive.config import SYSTEM_CATEGORY, Rules

_NUMERIC_KEYS = ("duration_seconds", "scroll_depth_percent")

#: RFC 8259's number grammar. The column holds the value's JSON text, so a JSON string ("20", with
#: its quotes), a boolean, null, an array or an object never matches, whatever a float parser
#: would make of it.
_JSON_NUMBER = r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?$"


def _as_number(column: str) -> pl.Expr:
    """A metadata value (its JSON text) as a finite float; null when missing or not a number.

    A JSON number beyond float64 (``1e400``) is not finite here, so it is not a number either.
    """
    text = pl.col(column)
    value = text.cast(pl.Float64, strict=False)
    return pl.when(text.str.contains(_JSON_NUMBER) & value.is_finite()).then(value)


def _malformed_number(column: str) -> pl.Expr:
    """The key is present but its value is not a finite number."""
    return pl.col(column).is_not_null() & _as_number(column).is_null()


def classify_events(events: pl.LazyFrame, /, *, rules: Rules) -> pl.LazyFrame:
    """Add ``invalid_reason`` (null when valid) and the parsed numeric metadata columns.

    Reasons, first match wins: ``unknown_category`` (not in the catalog), ``unknown_event_type``
    (known category, type not in the catalog), ``wrong_category`` (type filed under another
    category), ``malformed_metadata`` (metadata not a JSON object, or duration_seconds /
    scroll_depth_percent present but not a finite JSON number: a string such as ``"20"``, a
    boolean, null or an array is malformed). The numeric columns hold the value's JSON text.

    Adds ``duration`` and ``scroll_depth`` (floats, missing = 0) for the qualification rule.
    """
    category_of = rules.event_category
    known_categories = [c for c in rules.catalog if c != SYSTEM_CATEGORY]
    expected_category = pl.col("event_type").replace_strict(
        category_of, default=None, return_dtype=pl.String
    )
    reason = (
        pl.when(~pl.col("event_category").is_in(known_categories))
        .then(pl.lit("unknown_category"))
        .when(expected_category.is_null())
        .then(pl.lit("unknown_event_type"))
        .when(expected_category != pl.col("event_category"))
        .then(pl.lit("wrong_category"))
        .when(
            ~pl.col("metadata_is_object").fill_null(False)
            | pl.any_horizontal([_malformed_number(k) for k in _NUMERIC_KEYS])
        )
        .then(pl.lit("malformed_metadata"))
        .otherwise(None)
    )
    return events.with_columns(
        invalid_reason=reason,
        duration=_as_number("duration_seconds").fill_null(0.0),
        scroll_depth=_as_number("scroll_depth_percent").fill_null(0.0),
    )


def valid_events(classified: pl.LazyFrame, /) -> pl.LazyFrame:
    """Only the events without an ``invalid_reason``."""
    return classified.filter(pl.col("invalid_reason").is_null())


def invalid_counts(classified: pl.LazyFrame, /) -> pl.LazyFrame:
    """Discarded events per reason: columns ``invalid_reason``, ``events``."""
    return (
        classified.filter(pl.col("invalid_reason").is_not_null())
        .group_by("invalid_reason")
        .agg(events=pl.len())
        .sort("invalid_reason")
    )
