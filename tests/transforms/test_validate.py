"""SPEC §2.2 validation: every event gets a verdict, an invalid one exactly one reason."""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from derive.transforms.validate import classify_events, invalid_counts, valid_events
from tests.transforms.conftest import RULES, make_events


def reasons_of(events: pl.DataFrame) -> pl.DataFrame:
    return classify_events(events.lazy(), rules=RULES).select("invalid_reason").collect()


def expected_reasons(*reasons: str | None) -> pl.DataFrame:
    return pl.DataFrame({"invalid_reason": list(reasons)}, schema={"invalid_reason": pl.String})


def test_every_catalog_type_in_its_own_category_is_valid() -> None:
    pairs = [(t, c) for c, types in RULES.catalog.items() if c != "system" for t in types]
    events = make_events(
        event_type=[t for t, _ in pairs],
        event_category=[c for _, c in pairs],
        consent_recorded=True,
    )

    result = reasons_of(events)

    assert_frame_equal(result, expected_reasons(*[None] * len(pairs)))


def test_unknown_category() -> None:
    events = make_events(event_category=["telemetry", "Engagement", "engagement"])

    result = reasons_of(events)

    assert_frame_equal(result, expected_reasons("unknown_category", "unknown_category", None))


def test_unknown_event_type_in_a_known_category() -> None:
    events = make_events(
        event_type=["page_ping", "Content_View", "content_view"], event_category="engagement"
    )

    result = reasons_of(events)

    assert_frame_equal(result, expected_reasons("unknown_event_type", "unknown_event_type", None))


@pytest.mark.parametrize(
    ("event_type", "filed_under"),
    [
        ("content_view", "advocacy"),
        ("email_subscribe", "engagement"),
        ("content_share", "subscription"),
        ("state_change_logged", "engagement"),
    ],
)
def test_wrong_category(event_type: str, filed_under: str) -> None:
    events = make_events(event_type=[event_type], event_category=[filed_under])

    result = reasons_of(events)

    assert_frame_equal(result, expected_reasons("wrong_category"))


def test_malformed_metadata_when_metadata_is_not_an_object() -> None:
    events = make_events(metadata_is_object=[False, True], duration_seconds=None)

    result = reasons_of(events)

    assert_frame_equal(result, expected_reasons("malformed_metadata", None))


# The numeric columns hold the value's JSON text (``derive.io.read``): '"20"' is the JSON string.
NOT_FINITE_JSON_NUMBERS = [
    '"20"',  # a JSON string that looks like a number is not a number (SPEC §2.2)
    '"abc"',
    '""',
    "true",
    "false",
    "null",
    "[20]",
    '{"value": 20}',
    "1e400",  # a JSON number beyond float64
    "-1" + "0" * 400,
    # Not JSON number syntax (PostgreSQL never writes these, a float parser would take them):
    "NaN",
    "Infinity",
    "-Infinity",
    "inf",
    " 20",
    ".5",
    "+5",
    "0x10",
    "",
]


@pytest.mark.parametrize("text", NOT_FINITE_JSON_NUMBERS)
@pytest.mark.parametrize("key", ["duration_seconds", "scroll_depth_percent"])
def test_malformed_metadata_when_a_numeric_key_is_not_a_finite_json_number(
    key: str, text: str
) -> None:
    events = make_events(**{key: [text]}, event_type="scroll_depth_75")

    result = reasons_of(events)

    assert_frame_equal(result, expected_reasons("malformed_metadata"))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("20", 20.0),
        ("19.999", 19.999),
        ("1e2", 100.0),
        ("2E+1", 20.0),
        ("-5", -5.0),
        ("0", 0.0),
        ("-0", 0.0),
        ("0.5", 0.5),
        ("1e-400", 0.0),  # underflows to zero: finite
    ],
)
def test_json_numbers_are_numbers(text: str, value: float) -> None:
    events = make_events(duration_seconds=[text], scroll_depth_percent=[text])

    result = (
        classify_events(events.lazy(), rules=RULES)
        .select("invalid_reason", "duration", "scroll_depth")
        .collect()
    )

    expected = pl.DataFrame(
        {"invalid_reason": [None], "duration": [value], "scroll_depth": [value]},
        schema={"invalid_reason": pl.String, "duration": pl.Float64, "scroll_depth": pl.Float64},
    )
    assert_frame_equal(result, expected)


def test_missing_numeric_keys_are_zero_and_valid() -> None:
    events = make_events(duration_seconds=[None], scroll_depth_percent=[None])

    result = (
        classify_events(events.lazy(), rules=RULES)
        .select("invalid_reason", "duration", "scroll_depth")
        .collect()
    )

    expected = pl.DataFrame(
        {"invalid_reason": [None], "duration": [0.0], "scroll_depth": [0.0]},
        schema={"invalid_reason": pl.String, "duration": pl.Float64, "scroll_depth": pl.Float64},
    )
    assert_frame_equal(result, expected)


def test_first_failing_check_names_the_reason() -> None:
    # Each row fails every check from its reason on; the earliest one is recorded.
    events = make_events(
        event_type=["content_view", "page_ping", "content_view", "content_view"],
        event_category=["telemetry", "engagement", "advocacy", "engagement"],
        metadata_is_object=False,
        duration_seconds="abc",
    )

    result = reasons_of(events)

    assert_frame_equal(
        result,
        expected_reasons(
            "unknown_category", "unknown_event_type", "wrong_category", "malformed_metadata"
        ),
    )


def test_system_rows_are_never_valid_events() -> None:
    events = make_events(
        event_type=["state_change_logged", "validation_fail", "content_view"],
        event_category=["system", "system", "system"],
    )

    result = valid_events(classify_events(events.lazy(), rules=RULES)).collect()

    assert result.height == 0


def test_invalid_counts_per_reason() -> None:
    events = make_events(
        event_type=["page_ping", "page_ping", "content_view", "content_view", "content_view"],
        event_category=["engagement", "engagement", "telemetry", "engagement", "engagement"],
        duration_seconds=["30", "30", "30", "NaN", "30"],
    )

    result = invalid_counts(classify_events(events.lazy(), rules=RULES)).collect()

    expected = pl.DataFrame(
        {
            "invalid_reason": ["malformed_metadata", "unknown_category", "unknown_event_type"],
            "events": [1, 1, 2],
        },
        schema={"invalid_reason": pl.String, "events": pl.get_index_type()},
    )
    assert_frame_equal(result, expected)


def test_validation_keeps_every_input_row() -> None:
    events = make_events(event_category=["telemetry", "engagement"], duration_seconds=["x", "1"])

    result = classify_events(events.lazy(), rules=RULES).collect()

    assert_frame_equal(result.select(events.columns), events)
