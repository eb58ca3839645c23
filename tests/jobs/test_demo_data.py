"""The synthetic event generator: shape, determinism, coverage of the catalog, bursts and dirt."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from functools import cache

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from derive.config import SYSTEM_CATEGORY, Rules, load_rules
from derive.jobs.demo_data import (
    EVENT_COLUMNS,
    UNKNOWN_CATEGORY,
    demo_users,
    generate_events,
    user_ids,
)

AS_OF = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
GROUP = ["user_id", "event_type", "session_id"]


@cache
def rules() -> Rules:
    return load_rules()


@cache
def sample(
    users: int = 2000, *, dirty: bool = False, bursts: bool = True, seed: int = 7
) -> pl.DataFrame:
    return generate_events(users, as_of=AS_OF, rules=rules(), seed=seed, dirty=dirty, bursts=bursts)


def gaps_within_groups(events: pl.DataFrame) -> pl.Series:
    """Seconds between consecutive events of one (user_id, event_type, session_id) group."""
    return (
        events.sort([*GROUP, "created_at"], nulls_last=True)
        .select(gap=pl.col("created_at").diff().dt.total_microseconds().over(GROUP) / 1e6)["gap"]
        .drop_nulls()
    )


def test_columns_and_dtypes_match_the_schema() -> None:
    result = sample()

    assert result.schema == pl.Schema(EVENT_COLUMNS)


def test_about_23_events_per_user() -> None:
    result = sample()

    per_user = result.height / result["user_id"].n_unique()
    assert 17 <= per_user <= 30


def test_same_seed_same_frame_other_seed_other_frame() -> None:
    first = generate_events(300, as_of=AS_OF, rules=rules(), seed=3, dirty=True)
    second = generate_events(300, as_of=AS_OF, rules=rules(), seed=3, dirty=True)
    other = generate_events(300, as_of=AS_OF, rules=rules(), seed=4, dirty=True)

    assert_frame_equal(first, second)
    assert not first.equals(other)


def test_every_scored_catalog_event_type_occurs() -> None:
    expected = {
        et for cat, types in rules().catalog.items() if cat != SYSTEM_CATEGORY for et in types
    }

    result = set(sample()["event_type"].unique())

    assert result == expected


def test_categories_match_the_catalog_in_clean_data() -> None:
    category_of = rules().event_category

    result = sample().select("event_type", "event_category").unique()

    assert all(category_of[et] == cat for et, cat in result.iter_rows())


def test_about_five_percent_of_rows_are_anonymous() -> None:
    result = sample()["user_id"].null_count() / sample().height

    assert 0.03 <= result <= 0.07


def test_some_sessions_have_no_id_and_sessions_hold_several_events() -> None:
    events = sample()

    per_session = events.drop_nulls("session_id").group_by("session_id").len()["len"]
    assert events["session_id"].null_count() > 0
    assert per_session.mean() >= 2.5  # type: ignore[operator]


def test_activity_per_user_is_heavy_tailed() -> None:
    per_user = sample(5000).drop_nulls("user_id").group_by("user_id").len()["len"]

    assert per_user.median() <= per_user.mean()  # type: ignore[operator]
    assert per_user.max() >= 10 * per_user.median()  # type: ignore[operator]


@pytest.mark.parametrize(("dirty", "bursts"), [(False, True), (True, False), (True, True)])
def test_timestamps_lie_within_the_window(dirty: bool, bursts: bool) -> None:
    events = sample(dirty=dirty, bursts=bursts)

    assert events["created_at"].max() <= AS_OF  # type: ignore[operator]
    assert events["created_at"].min() > AS_OF - timedelta(days=120)  # type: ignore[operator]


def test_a_shorter_span_stays_within_its_window() -> None:
    events = generate_events(500, as_of=AS_OF, rules=rules(), days=3, dirty=True)

    assert events["created_at"].min() > AS_OF - timedelta(days=3)  # type: ignore[operator]
    assert events["created_at"].max() <= AS_OF  # type: ignore[operator]


def test_recency_covers_recent_and_long_quiet_users() -> None:
    last_seen = (
        sample()
        .drop_nulls("user_id")
        .group_by("user_id")
        .agg(quiet_days=(pl.lit(AS_OF) - pl.col("created_at").max()).dt.total_days())["quiet_days"]
    )

    assert (last_seen < 7).mean() >= 0.3  # type: ignore[operator]
    assert ((last_seen >= 45) & (last_seen < 75)).sum() > 0
    assert (last_seen >= 75).sum() > 0


def test_content_views_straddle_the_qualification_thresholds() -> None:
    views = (
        sample()
        .filter(pl.col("event_type") == "content_view")
        .select(
            duration=pl.col("metadata").str.json_path_match("$.duration_seconds").cast(pl.Float64),
            depth=pl.col("metadata").str.json_path_match("$.scroll_depth_percent").cast(pl.Float64),
        )
    )

    assert (views["duration"] < 20).any()
    assert (views["duration"] >= 20).any()
    assert (views["depth"] < 30).any()
    assert (views["depth"] >= 30).any()


def test_clean_subscription_events_carry_a_boolean_consent_mostly_true() -> None:
    metadata = sample().filter(pl.col("event_category") == "subscription")["metadata"]

    consent = metadata.str.extract(r'"consent_recorded": (\w+)')

    assert consent.is_in(["true", "false"]).all()
    assert 0.8 <= (consent == "true").mean() < 1.0  # type: ignore[operator]


def test_every_metadata_is_valid_json() -> None:
    for text in sample(500, dirty=True)["metadata"]:
        json.loads(text)


def test_bursts_repeat_an_event_several_times_within_three_seconds() -> None:
    events = sample()

    close = (gaps_within_groups(events) < 3).sum()
    runs = (
        events.drop_nulls("user_id")
        .sort([*GROUP, "created_at"], nulls_last=True)
        .with_columns(
            close=(pl.col("created_at").diff().dt.total_microseconds().over(GROUP) < 3_000_000)
        )
        .filter(pl.col("close") & pl.col("close").shift(1) & pl.col("close").shift(2))
    )
    assert close > 0
    assert runs.height > 0  # at least one group with 4+ events each < 3 s after the previous


@pytest.mark.parametrize("dirty", [False, True])
def test_without_bursts_no_group_has_events_within_three_seconds(dirty: bool) -> None:
    events = sample(dirty=dirty, bursts=False)

    assert gaps_within_groups(events).min() >= 3  # type: ignore[operator]
    assert events.select(*GROUP, pl.col("created_at").dt.truncate("1s")).is_duplicated().sum() == 0


def test_dirty_data_holds_every_kind_of_invalid_row() -> None:
    events = sample(dirty=True)
    category_of = rules().event_category
    known = set(rules().catalog)
    metadata = pl.col("metadata")

    malformed = events.filter(
        metadata.str.starts_with("[")
        | metadata.str.starts_with('"')
        | metadata.str.contains('"duration_seconds": "')
        | metadata.str.contains('"duration_seconds": true')
    )
    unknown_category = events.filter(~pl.col("event_category").is_in(known))
    wrong_category = events.filter(
        pl.col("event_type").is_in(list(category_of))
        & (
            pl.col("event_type").replace_strict(category_of, default=None)
            != pl.col("event_category")
        )
    )
    unknown_type = events.filter(
        pl.col("event_category").is_in(known) & ~pl.col("event_type").is_in(list(category_of))
    )
    no_consent = events.filter(
        (pl.col("event_category") == "subscription")
        & ~metadata.str.contains('"consent_recorded": (true|false)')
    )
    assert malformed.height >= 3
    assert set(unknown_category["event_category"]) == {UNKNOWN_CATEGORY}
    assert wrong_category.height >= 3
    assert unknown_type.height >= 3
    assert no_consent.height >= 3


def test_dirty_data_has_spam_users_over_500_events_in_an_hour() -> None:
    events = sample(dirty=True).drop_nulls("user_id").sort("created_at")

    per_hour = events.rolling("created_at", period="1h", group_by="user_id").agg(n=pl.len())

    assert per_hour.filter(pl.col("n") > 500)["user_id"].n_unique() >= 1


def test_clean_data_has_no_spam_user() -> None:
    events = sample().drop_nulls("user_id").sort("created_at")

    per_hour = events.rolling("created_at", period="1h", group_by="user_id").agg(n=pl.len())

    assert per_hour["n"].max() <= 500  # type: ignore[operator]


def test_tier_milestones_make_a_full_funnel_reachable() -> None:
    # A user active in the last 7 days with a deep event, a consented subscription and three
    # advocacy events within 60 days has the evidence of every gate up to S5.
    recent = sample().filter(pl.col("created_at") > AS_OF - timedelta(days=7)).drop_nulls("user_id")
    deep = recent.filter(pl.col("event_type") == "scroll_depth_75")["user_id"]
    subscribed = sample().filter(
        pl.col("event_type") == "email_subscribe",
        pl.col("metadata").str.contains('"consent_recorded": true'),
    )["user_id"]
    advocates = (
        recent.filter(pl.col("event_category") == "advocacy")
        .group_by("user_id")
        .len()
        .filter(pl.col("len") >= 3)["user_id"]
    )

    result = set(deep) & set(subscribed) & set(advocates)

    assert len(result) >= 5


def test_user_ids_are_deterministic_distinct_version_4_uuids() -> None:
    ids = user_ids(1000, seed=11)

    assert ids.equals(user_ids(1000, seed=11))
    assert not ids.equals(user_ids(1000, seed=12))
    assert ids.n_unique() == 1000
    assert ids.str.contains(
        r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
    ).all()


def test_generated_users_are_the_demo_users() -> None:
    events = generate_events(200, as_of=AS_OF, rules=rules(), seed=5)

    people = demo_users(200, seed=5)

    assert set(events["user_id"].drop_nulls()) == set(people["id"])
    assert people["attribution_salt"].bin.size().eq(32).all()


def test_zero_users_give_an_empty_frame_of_the_schema() -> None:
    result = generate_events(0, as_of=AS_OF, rules=rules())

    assert result.height == 0
    assert result.schema == pl.Schema(EVENT_COLUMNS)


@settings(max_examples=15, deadline=None)
@given(
    users=st.integers(min_value=1, max_value=60),
    seed=st.integers(min_value=0, max_value=2**32),
    days=st.integers(min_value=1, max_value=200),
    dirty=st.booleans(),
)
def test_no_burst_data_is_clean_for_any_seed(users: int, seed: int, days: int, dirty: bool) -> None:
    events = generate_events(
        users, as_of=AS_OF, rules=rules(), seed=seed, days=days, dirty=dirty, bursts=False
    )

    gaps = gaps_within_groups(events)
    assert gaps.is_empty() or gaps.min() >= 3  # type: ignore[operator]
    assert events["created_at"].min() > AS_OF - timedelta(days=days)  # type: ignore[operator]
    assert events["created_at"].max() <= AS_OF  # type: ignore[operator]
    assert events["user_id"].drop_nulls().n_unique() <= users


@settings(max_examples=10, deadline=None)
@given(users=st.integers(min_value=1, max_value=40), seed=st.integers(min_value=0, max_value=2**32))
def test_generation_is_a_function_of_its_arguments(users: int, seed: int) -> None:
    first = generate_events(users, as_of=AS_OF, rules=rules(), seed=seed, dirty=True)
    second = generate_events(users, as_of=AS_OF, rules=rules(), seed=seed, dirty=True)

    assert_frame_equal(first, second)
