"""SPEC §2.4 anchored dedupe: same user, type and session within 3 s of the last kept event."""

from __future__ import annotations

from datetime import timedelta

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from derive.transforms import dedupe
from derive.transforms.dedupe import dedupe_events, mark_duplicates
from tests.transforms.conftest import RULES, US, ago, eid, make_events, uid
from tests.transforms.reference import dedupe_kept

WINDOW = RULES.dedupe_window
T0 = ago(hours=2)


def kept_by_id(events: pl.DataFrame) -> pl.DataFrame:
    return mark_duplicates(events.lazy(), window=WINDOW).select("id", "kept").sort("id").collect()


def expected_kept(kept: list[bool]) -> pl.DataFrame:
    return pl.DataFrame({"id": [eid(i) for i in range(len(kept))], "kept": kept}).sort("id")


def test_dedupe_window_is_three_seconds() -> None:
    assert timedelta(seconds=3) == WINDOW


@pytest.mark.parametrize(
    ("gap", "second_kept"),
    [
        (timedelta(seconds=2.999), False),
        (timedelta(seconds=3) - US, False),
        (timedelta(seconds=3), True),
        (timedelta(seconds=3) + US, True),
        (timedelta(0), False),
    ],
)
def test_dedupe_boundary_at_exactly_three_seconds(gap: timedelta, second_kept: bool) -> None:
    events = make_events(created_at=[T0, T0 + gap])

    result = kept_by_id(events)

    assert_frame_equal(result, expected_kept([True, second_kept]))


def test_dedupe_burst_every_two_seconds_for_a_minute_keeps_one_every_four_seconds() -> None:
    times = [T0 + timedelta(seconds=s) for s in range(0, 61, 2)]
    events = make_events(created_at=times)

    result = kept_by_id(events)

    assert_frame_equal(result, expected_kept([s % 4 == 0 for s in range(0, 61, 2)]))
    assert result.get_column("kept").sum() == 16


def test_dedupe_is_anchored_on_the_last_kept_event_not_the_previous_one() -> None:
    # 0 kept; 2 dropped (2 s after 0); 4 kept (4 s after 0, though only 2 s after the dropped 2);
    # 5.5 dropped (1.5 s after 4); 7 kept (3 s after 4).
    seconds = [0, 2, 4, 5.5, 7]
    events = make_events(created_at=[T0 + timedelta(seconds=s) for s in seconds])

    result = kept_by_id(events)

    assert_frame_equal(result, expected_kept([True, False, True, False, True]))


def test_dedupe_null_session_is_its_own_group() -> None:
    # Rows 0 and 1 differ only by null vs 's1' session: both kept. Rows 2 and 3 are two null
    # sessions one second apart: one group, the second dropped.
    events = make_events(
        user_id=[uid(1), uid(1), uid(2), uid(2)],
        session_id=[None, "s1", None, None],
        created_at=[T0, T0 + timedelta(seconds=1), T0, T0 + timedelta(seconds=1)],
    )

    result = kept_by_id(events)

    assert_frame_equal(result, expected_kept([True, True, True, False]))


def test_dedupe_ties_in_created_at_are_broken_by_id() -> None:
    # Same instant; the smaller id is first and kept whatever the input order.
    events = make_events(id=[eid(1), eid(0)], created_at=T0)

    result = kept_by_id(events)

    assert_frame_equal(result, expected_kept([True, False]))


@pytest.mark.parametrize(
    "differs",
    [
        {"user_id": [uid(1), uid(2)]},
        {"event_type": ["content_view", "scroll_depth_75"]},
        {"session_id": ["s1", "s2"]},
    ],
)
def test_dedupe_groups_by_user_type_and_session(differs: dict[str, list[object]]) -> None:
    events = make_events(created_at=[T0, T0 + timedelta(seconds=1)], **differs)

    result = kept_by_id(events)

    assert_frame_equal(result, expected_kept([True, True]))


def test_dedupe_events_drops_only_the_duplicates() -> None:
    events = make_events(
        created_at=[T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=3)],
        session_id=["a", "a", "a"],
    )

    result = dedupe_events(events.lazy(), window=WINDOW).sort("id").collect()

    assert_frame_equal(result, events[[0, 2]])


def test_dedupe_of_an_empty_frame_is_empty() -> None:
    events = make_events(created_at=[T0]).clear()

    result = mark_duplicates(events.lazy(), window=WINDOW).collect()

    assert result.height == 0
    assert result.columns == [*events.columns, "kept"]


# Offsets on a half-second grid hit the 3 s boundary exactly and repeat timestamps often;
# arbitrary microsecond offsets cover everything in between.
_offset_us = st.one_of(
    st.integers(0, 40).map(lambda k: k * 500_000),
    st.integers(0, 20_000_000),
)
_event = st.tuples(
    st.sampled_from([1, 2]),
    st.sampled_from(["content_view", "scroll_depth_75"]),
    st.sampled_from([None, "s1", "s2"]),
    _offset_us,
)


@pytest.mark.parametrize(
    "hashing",
    ["polars", "every-group-collides", "two-buckets"],
)
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=st.lists(_event, min_size=0, max_size=60), data=st.data())
def test_dedupe_equals_the_reference_loop(
    rows: list[tuple[int, str, str | None, int]],
    data: st.DataObject,
    hashing: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The group key is a hash; collisions (forced here: one bucket for all, or two) must fall
    # back to sorting on the group columns and give the same answer.
    if hashing == "every-group-collides":
        monkeypatch.setattr(dedupe, "group_hash", lambda: pl.lit(0, dtype=pl.UInt64))
    elif hashing == "two-buckets":
        monkeypatch.setattr(
            dedupe, "group_hash", lambda: (pl.col("event_type") == "content_view").cast(pl.UInt64)
        )
    ids = data.draw(st.permutations(range(len(rows))))
    events = make_events(
        id=[eid(i) for i in ids],
        user_id=[uid(u) for u, _, _, _ in rows],
        event_type=[t for _, t, _, _ in rows],
        session_id=[s for _, _, s, _ in rows],
        created_at=[T0 + timedelta(microseconds=us) for _, _, _, us in rows],
    )

    result = mark_duplicates(events.lazy(), window=WINDOW).select("id", "kept").collect()

    reference = dedupe_kept(events.to_dicts(), window=WINDOW)
    expected = pl.DataFrame(
        {"id": list(reference), "kept": list(reference.values())},
        schema={"id": pl.Binary, "kept": pl.Boolean},
    )
    assert_frame_equal(result.sort("id"), expected.sort("id"))
