"""Row validation of FetchMetricsOutput rows (SPEC §3): every rule rejects with its reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from derive.io.metrics import raw_rows_frame
from derive.metrics_rules import load_metrics_rules
from derive.transforms.metrics_contract import REASONS, VALID_ROWS, validate_metric_rows

RULES = load_metrics_rules()
GOOD: dict[str, Any] = {
    "metric_kind": "profile_view",
    "window_start": "2026-11-20T00:00:00Z",
    "window_end": "2026-11-21T00:00:00Z",
    "value_numeric": 120,
}


def decoded(row: Any) -> Any:
    """A row as the reader decodes it (numbers exact)."""
    return json.loads(json.dumps(row), parse_float=Decimal)


def validate(*rows: Any) -> tuple[pl.DataFrame, pl.DataFrame]:
    raw = raw_rows_frame([(1, n, decoded(r)) for n, r in enumerate(rows, start=1)])
    valid, rejected = validate_metric_rows(
        raw.lazy(), kinds=RULES.kind_names, monetary_kinds=RULES.monetary_kinds
    )
    return valid.collect(), rejected.collect()


def reasons_of(rejected: pl.DataFrame) -> dict[int, list[str]]:
    return {row: reasons for row, reasons in rejected.select("row", "reasons").iter_rows()}


def test_valid_row_is_typed_and_kept() -> None:
    valid, rejected = validate({**GOOD, "payload_jsonb": {"raw": [1, "x"]}})

    expected = pl.DataFrame(
        {
            "object": [1],
            "row": [1],
            "metric_kind": ["profile_view"],
            "window_start": [datetime(2026, 11, 20, tzinfo=UTC)],
            "window_end": [datetime(2026, 11, 21, tzinfo=UTC)],
            "value_numeric": ["120"],
            "value_text": [None],
            "currency": [None],
            "payload_jsonb": ['{"raw": [1, "x"]}'],
        },
        schema=VALID_ROWS,
    )
    assert_frame_equal(valid, expected)
    assert rejected.is_empty()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"metric_kind": "pageviews"}, "unknown_metric_kind"),
        ({"metric_kind": 3}, "unknown_metric_kind"),
        ({"metric_kind": None}, "unknown_metric_kind"),
        ({"window_end": "2026-11-20T00:00:00Z"}, "window_not_increasing"),
        ({"window_end": "2026-11-19T23:59:59Z"}, "window_not_increasing"),
        ({"window_start": "yesterday"}, "bad_window_start"),
        ({"window_start": "2026-13-01T00:00:00Z"}, "bad_window_start"),
        ({"window_start": 1763596800}, "bad_window_start"),
        ({"window_end": "2026-11-21 00:00"}, "bad_window_end"),
        ({"window_end": None}, "bad_window_end"),
        ({"value_numeric": "120"}, "bad_value_numeric"),
        ({"value_numeric": True}, "bad_value_numeric"),
        ({"value_numeric": [1]}, "bad_value_numeric"),
        ({"value_numeric": 1e14}, "bad_value_numeric"),
        ({"value_text": 5, "value_numeric": None}, "bad_value_text"),
        ({"value_numeric": None}, "no_value"),
        ({"value_numeric": None, "value_text": "  "}, "no_value"),
        ({"currency": "usd"}, "bad_currency"),
        ({"currency": "XYZ"}, "bad_currency"),
        ({"currency": 840}, "bad_currency"),
        ({"metric_kind": "tip_amount"}, "missing_currency"),
        ({"metric_kind": "gross_revenue", "currency": None}, "missing_currency"),
    ],
)
def test_each_rule_rejects_with_its_reason_and_keeps_the_good_rows(
    change: dict[str, Any], reason: str
) -> None:
    bad = {k: v for k, v in {**GOOD, **change}.items() if v is not None or k in change}

    valid, rejected = validate(GOOD, bad, {**GOOD, "window_start": "2026-11-19T00:00:00Z"})

    assert valid["row"].to_list() == [1, 3]
    assert reasons_of(rejected) == {2: [reason]}


def test_missing_field_is_reported_as_missing() -> None:
    row = {k: v for k, v in GOOD.items() if k != "window_start"}

    _, rejected = validate(row)

    assert rejected["reasons"].to_list() == [["bad_window_start"]]
    assert rejected["detail"].item() == "window_start (missing) is not an ISO-8601 timestamp"


def test_a_row_that_is_not_an_object_is_rejected() -> None:
    valid, rejected = validate(GOOD, [1, 2], "profile_view")

    assert valid["row"].to_list() == [1]
    assert reasons_of(rejected) == {2: ["not_an_object"], 3: ["not_an_object"]}


def test_every_reason_of_a_row_is_reported_in_order() -> None:
    bad = {"metric_kind": "nope", "window_start": "x", "window_end": 5, "currency": "usd"}

    _, rejected = validate(bad)

    assert rejected["reasons"].to_list()[0] == [
        "unknown_metric_kind",
        "bad_window_start",
        "bad_window_end",
        "no_value",
        "bad_currency",
    ]
    assert 'metric_kind "nope" is not a known kind' in rejected["detail"].item()


def test_window_end_one_microsecond_after_start_is_valid() -> None:
    valid, rejected = validate(
        {
            **GOOD,
            "window_start": "2026-11-20T00:00:00Z",
            "window_end": "2026-11-20T00:00:00.000001Z",
        }
    )

    assert rejected.is_empty()
    assert valid["window_end"].item() == datetime(2026, 11, 20, 0, 0, 0, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-20T02:00:00+02:00", datetime(2026, 11, 20, tzinfo=UTC)),
        ("2026-11-20T00:00:00.5Z", datetime(2026, 11, 20, 0, 0, 0, 500000, tzinfo=UTC)),
        ("2026-11-20T00:00:00", datetime(2026, 11, 20, tzinfo=UTC)),
        ("2026-11-20", datetime(2026, 11, 20, tzinfo=UTC)),
    ],
)
def test_accepted_timestamp_forms(text: str, expected: datetime) -> None:
    valid, _ = validate({**GOOD, "window_start": text, "window_end": "2026-12-01T00:00:00Z"})

    assert valid["window_start"].item() == expected


def test_monetary_row_with_currency_and_exact_decimal_is_valid() -> None:
    valid, rejected = validate(
        {**GOOD, "metric_kind": "tip_amount", "value_numeric": 0.1, "currency": "EUR"}
    )

    assert rejected.is_empty()
    assert valid.select("value_numeric", "currency").row(0) == ("0.1", "EUR")


def test_text_only_rank_label_is_valid() -> None:
    valid, _ = validate(
        {**GOOD, "metric_kind": "search_rank", "value_numeric": None, "value_text": "Boosted"}
    )

    assert valid.select("value_numeric", "value_text").row(0) == (None, "Boosted")


def test_repeated_kind_and_window_in_one_object_rejects_the_later_row() -> None:
    valid, rejected = validate(GOOD, {**GOOD, "value_numeric": 7})

    assert valid["row"].to_list() == [1]
    assert reasons_of(rejected) == {2: ["duplicate_row"]}


def test_reasons_are_drawn_from_the_published_list() -> None:
    _, rejected = validate([1], {"metric_kind": 1}, {**GOOD, "currency": "x"}, GOOD, GOOD)

    assert set(rejected["reasons"].explode().to_list()) <= set(REASONS)


json_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10),
    st.text(max_size=5),
    st.sampled_from(["profile_view", "tip_amount", "USD", "2026-11-20T00:00:00Z"]),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from([*GOOD, "currency", "value_text"]), json_values, max_size=6
        ),
        max_size=8,
    )
)
def test_every_row_is_either_valid_or_rejected_once(rows: list[dict[str, Any]]) -> None:
    valid, rejected = validate(*rows)

    assert sorted(valid["row"].to_list() + rejected["row"].to_list()) == list(
        range(1, len(rows) + 1)
    )
    assert rejected["reasons"].list.len().min() in (None, *range(1, len(REASONS) + 1))
