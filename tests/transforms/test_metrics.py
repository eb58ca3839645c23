"""SPEC §2.1 qualification and §2.5 metrics: windows at their exact edges, one row per user."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from derive.transforms.metrics import user_metrics
from derive.transforms.states import NEVER_ACTIVE_DAYS, evaluate
from derive.transforms.validate import classify_events, valid_events
from tests.transforms.conftest import (
    AS_OF,
    DAY,
    RULES,
    US,
    ago,
    eid,
    make_events,
    make_stored,
    no_events,
    no_stored,
    uid,
)


def metrics_of(events: pl.DataFrame, *columns: str) -> pl.DataFrame:
    """The named metric columns per user (valid events only), sorted by user."""
    valid = valid_events(classify_events(events.lazy(), rules=RULES))
    return (
        user_metrics(valid, as_of=AS_OF, rules=RULES)
        .select("user_id", *columns)
        .sort("user_id")
        .collect()
    )


def one_user(**values: Any) -> pl.DataFrame:
    """Expected metric row of user 1 (counts are Int64, the score Float64)."""
    schema = {"user_id": pl.Binary(), **{k: _dtype(k) for k in values}}
    return pl.DataFrame({"user_id": [uid(1)], **{k: [v] for k, v in values.items()}}, schema=schema)


def _dtype(name: str) -> pl.DataType:
    if name == "score":
        return pl.Float64()
    if name == "last_event_type":
        return pl.String()
    if name == "latest_event_at":
        return pl.Datetime("us", "UTC")
    return pl.Int64()


# -- qualification (SPEC §2.1) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "scroll", "qualified"),
    [
        ("19", None, False),
        ("19.999", None, False),
        ("20", None, True),
        ("20.0", None, True),
        (None, "29", False),
        (None, "29.999", False),
        (None, "30", True),
        ("19", "29", False),
        ("19", "30", True),
        ("20", "29", True),
        (None, None, False),
    ],
)
def test_qualified_content_view_by_duration_or_scroll_depth(
    duration: str | None, scroll: str | None, qualified: bool
) -> None:
    events = make_events(
        event_type=["content_view"], duration_seconds=[duration], scroll_depth_percent=[scroll]
    )

    result = metrics_of(events, "score", "qualified_views_30d")

    expected = one_user(score=1.0 if qualified else 0.0, qualified_views_30d=int(qualified))
    assert_frame_equal(result, expected)


def test_unqualified_content_view_still_counts_as_activity() -> None:
    events = make_events(event_type=["content_view"], duration_seconds=["5"])

    result = metrics_of(events, "score", "active_7d", "qualified_views_30d", "last_event_type")

    expected = one_user(
        score=0.0, active_7d=1, qualified_views_30d=0, last_event_type="content_view"
    )
    assert_frame_equal(result, expected)


def test_qualification_applies_to_content_view_only() -> None:
    events = make_events(
        event_type=["scroll_depth_75", "long_form_completion"],
        duration_seconds=None,
        scroll_depth_percent=None,
    )

    result = metrics_of(events, "score")

    assert_frame_equal(result, one_user(score=6.0))


def test_score_sums_catalog_weights() -> None:
    types = [t for c, ts in RULES.catalog.items() if c != "system" for t in ts]
    events = make_events(
        event_type=types,
        session_id=[f"s{i}" for i in range(len(types))],
        consent_recorded=True,
    )

    result = metrics_of(events, "score")

    # 1+2+3+2+4 engagement, 3+3 retention, 6+4 subscription, 5+4+3+3+3 advocacy, 0+0 attribution
    assert_frame_equal(result, one_user(score=46.0))


# -- windows (SPEC §2: within N days = created_at >= as_of - N days and <= as_of) ---------------------

_WINDOWED = [
    ("deep_7d", "scroll_depth_75", 7),
    ("deep_7d", "video_completion_75", 7),
    ("deep_7d", "long_form_completion", 7),
    ("active_7d", "content_view", 7),
    ("active_7d", "utm_landing", 7),
    ("repeat_30d", "repeat_session_30d", 30),
    ("sessions_30d", "content_view", 30),
    ("qualified_views_30d", "content_view", 30),
    ("advocacy_60d", "content_share", 60),
    ("advocacy_60d", "advocacy_repeat", 60),
    ("long_form_30d", "long_form_completion", 30),
]


@pytest.mark.parametrize(("metric", "event_type", "days"), _WINDOWED)
@pytest.mark.parametrize(
    ("offset", "inside"),
    [(timedelta(0), True), (US, False), (-US, True)],
    ids=["exactly-N-days", "1us-earlier", "1us-later"],
)
def test_metric_window_edges(
    metric: str, event_type: str, days: int, offset: timedelta, inside: bool
) -> None:
    events = make_events(event_type=[event_type], created_at=[AS_OF - days * DAY - offset])

    result = metrics_of(events, metric)

    assert_frame_equal(result, one_user(**{metric: int(inside)}))


@pytest.mark.parametrize(("metric", "event_type", "_days"), _WINDOWED)
def test_metric_window_includes_as_of_itself(metric: str, event_type: str, _days: int) -> None:
    events = make_events(event_type=[event_type], created_at=[AS_OF])

    result = metrics_of(events, metric)

    assert_frame_equal(result, one_user(**{metric: 1}))


def test_lookback_metrics_have_no_inner_window() -> None:
    # The read bounds the lookback; score and consented_subscription use all of it.
    events = make_events(
        event_type=["email_subscribe", "content_share"],
        created_at=[ago(120), ago(119)],
        consent_recorded=True,
    )

    result = metrics_of(events, "score", "consented_subscription", "advocacy_60d")

    assert_frame_equal(result, one_user(score=11.0, consented_subscription=1, advocacy_60d=0))


def test_sessions_30d_counts_distinct_non_null_sessions() -> None:
    events = make_events(
        session_id=["a", "a", "b", None, None, "c"],
        created_at=[ago(1), ago(2), ago(3), ago(4), ago(5), ago(30) - US],
        event_type=[
            "content_view",
            "scroll_depth_75",
            "content_view",
            "content_view",
            "content_share",
            "content_view",
        ],
    )

    result = metrics_of(events, "sessions_30d")

    assert_frame_equal(result, one_user(sessions_30d=2))


@pytest.mark.parametrize(
    ("event_type", "consent", "expected"),
    [
        ("email_subscribe", True, 1),
        ("asset_download", True, 1),
        ("email_subscribe", False, 0),
        ("asset_download", False, 0),
        ("email_subscribe", None, 0),
    ],
)
def test_consented_subscription_needs_consent_recorded_true(
    event_type: str, consent: bool | None, expected: int
) -> None:
    events = make_events(event_type=[event_type], consent_recorded=[consent])

    result = metrics_of(events, "consented_subscription")

    assert_frame_equal(result, one_user(consented_subscription=expected))


def test_advocacy_60d_counts_every_advocacy_type() -> None:
    types = list(RULES.catalog["advocacy"])
    events = make_events(event_type=[*types, "email_subscribe"], consent_recorded=True)

    result = metrics_of(events, "advocacy_60d")

    assert_frame_equal(result, one_user(advocacy_60d=len(types)))


@pytest.mark.parametrize(
    ("ids", "expected"),
    [((1, 2), "content_share"), ((2, 1), "scroll_depth_75")],
)
def test_last_event_type_is_the_latest_event_ties_broken_by_id(
    ids: tuple[int, int], expected: str
) -> None:
    events = make_events(
        id=[eid(ids[0]), eid(ids[1]), eid(0)],
        event_type=["scroll_depth_75", "content_share", "long_form_completion"],
        created_at=[ago(1), ago(1), ago(2)],
    )

    result = metrics_of(events, "last_event_type", "latest_event_at")

    assert_frame_equal(result, one_user(last_event_type=expected, latest_event_at=ago(1)))


def test_metrics_are_per_user() -> None:
    events = make_events(
        user_id=[uid(2), uid(1), uid(2)],
        event_type=["scroll_depth_75", "content_share", "scroll_depth_75"],
        session_id=["x", "y", "z"],
    )

    result = metrics_of(events, "score", "sessions_30d")

    expected = pl.DataFrame(
        {"user_id": [uid(1), uid(2)], "score": [5.0, 4.0], "sessions_30d": [1, 2]},
        schema={"user_id": pl.Binary, "score": pl.Float64, "sessions_30d": pl.Int64},
    )
    assert_frame_equal(result, expected)


# -- last activity and inactivity (SPEC §2.5) ---------------------------------------------------------


def activity_of(events: pl.DataFrame, stored: pl.DataFrame) -> pl.DataFrame:
    valid = valid_events(classify_events(events.lazy(), rules=RULES))
    per_user = user_metrics(valid, as_of=AS_OF, rules=RULES)
    return (
        evaluate(per_user, stored.lazy(), as_of=AS_OF, rules=RULES)
        .select("user_id", "last_activity_at", "inactivity_days")
        .sort("user_id")
        .collect()
    )


def expected_activity(last: datetime | None, days: int) -> pl.DataFrame:
    return pl.DataFrame(
        {"user_id": [uid(1)], "last_activity_at": [last], "inactivity_days": [days]},
        schema={
            "user_id": pl.Binary,
            "last_activity_at": pl.Datetime("us", "UTC"),
            "inactivity_days": pl.Int64,
        },
    )


@pytest.mark.parametrize(
    ("stored_at", "event_at", "expected"),
    [
        (ago(50), ago(3), ago(3)),
        (ago(3), ago(50), ago(3)),
        (None, ago(3), ago(3)),
    ],
)
def test_last_activity_at_is_the_later_of_stored_and_latest_event(
    stored_at: datetime | None, event_at: datetime, expected: datetime
) -> None:
    events = make_events(created_at=[event_at])
    stored = make_stored(last_activity_at=[stored_at])

    result = activity_of(events, stored)

    assert_frame_equal(result, expected_activity(expected, 3))


@pytest.mark.parametrize(
    ("last", "days"),
    [
        (ago(45), 45),
        (ago(45) + US, 44),
        (ago(45) - US, 45),
        (ago(0), 0),
        (ago(hours=23, seconds=3599), 0),
        (ago(1), 1),
    ],
)
def test_inactivity_days_are_whole_days_rounded_down(last: datetime, days: int) -> None:
    stored = make_stored(last_activity_at=[last])

    result = activity_of(no_events(), stored)

    assert_frame_equal(result, expected_activity(last, days))


def test_inactivity_is_999_when_last_activity_is_unknown() -> None:
    stored = make_stored(last_activity_at=[None])

    result = activity_of(no_events(), stored)

    assert NEVER_ACTIVE_DAYS == 999
    assert_frame_equal(result, expected_activity(None, 999))


def test_inactivity_of_a_new_user_counts_from_its_latest_event() -> None:
    events = make_events(created_at=[ago(10), ago(2, hours=5)])

    result = activity_of(events, no_stored())

    assert_frame_equal(result, expected_activity(ago(2, hours=5), 2))
