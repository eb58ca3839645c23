"""The whole derivation (SPEC §2): composition, counts, and the properties of a second run."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from derive.config import STATES
from derive.schema import STORED_STATES
from derive.transforms.pipeline import Derivation
from tests.transforms.conftest import (
    AS_OF,
    RULES,
    ago,
    derive,
    eid,
    make_events,
    make_rejections,
    make_stored,
    no_events,
    no_stored,
    uid,
    user_row,
)


def metric(result: Derivation, user: bytes, name: str) -> Any:
    return user_row(result.evaluated, user)[name]


# -- system and anonymous rows ----------------------------------------------------------------------


def test_system_rows_never_score_never_count_as_activity_and_never_reject() -> None:
    # The read leaves system rows out; handed to the transforms anyway, they must change nothing.
    quiet = make_events(event_type=["scroll_depth_75"], created_at=[ago(10)])
    system = make_events(
        id=[eid(1), eid(2), eid(3)],
        event_type=["state_change_logged", "validation_fail", "content_view"],
        event_category="system",
        created_at=ago(hours=1),
    )

    result = derive(pl.concat([quiet, system]))
    without = derive(quiet)

    assert result.rejected.height == 0
    assert result.invalid == {}
    assert_frame_equal(result.evaluated, without.evaluated)
    assert_frame_equal(result.writes, without.writes)
    assert_frame_equal(result.audit, without.audit)
    assert metric(result, uid(1), "score") == 2.0
    assert metric(result, uid(1), "active_7d") == 0
    assert metric(result, uid(1), "last_event_type") == "scroll_depth_75"
    assert metric(result, uid(1), "last_activity_at") == ago(10)


def test_user_with_only_system_rows_is_not_evaluated() -> None:
    events = make_events(event_type=["state_change_logged"], event_category=["system"])

    result = derive(events)

    assert result.users_evaluated == 0
    assert result.writes.height == 0
    assert result.audit.height == 0


def test_anonymous_events_are_not_derived() -> None:
    events = make_events(user_id=[None, uid(1)], event_type=["scroll_depth_75", "content_view"])

    result = derive(events)

    assert result.writes.get_column("user_id").to_list() == [uid(1)]
    assert result.audit.get_column("user_id").unique().to_list() == [uid(1)]
    assert result.users_evaluated == 1


# -- composition ------------------------------------------------------------------------------------


def test_metrics_are_computed_after_dedupe() -> None:
    # Two scroll_depth_75 one second apart in one session: one counts (score 2, not 4).
    events = make_events(
        event_type="scroll_depth_75", created_at=[ago(1), ago(1) + timedelta(seconds=1)]
    )

    result = derive(events)

    assert result.deduplicated == 1
    assert metric(result, uid(1), "score") == 2.0
    assert metric(result, uid(1), "deep_7d") == 1


def test_invalid_events_neither_score_nor_anchor_dedupe() -> None:
    # The malformed event comes first; the valid one a second later is still the first kept.
    events = make_events(
        event_type="scroll_depth_75",
        created_at=[ago(1), ago(1) + timedelta(seconds=1)],
        duration_seconds=["abc", None],
    )

    result = derive(events)

    assert result.invalid == {"malformed_metadata": 1}
    assert result.deduplicated == 0
    assert metric(result, uid(1), "score") == 2.0


def test_counts_and_distributions() -> None:
    events = make_events(
        user_id=[uid(1), uid(1), uid(2), uid(3), uid(3)],
        event_type=[
            "scroll_depth_75",
            "scroll_depth_75",
            "page_ping",
            "content_view",
            "content_view",
        ],
        event_category=["engagement", "engagement", "engagement", "telemetry", "engagement"],
        created_at=[ago(1), ago(1), ago(2), ago(3), ago(3)],
        id=[eid(1), eid(2), eid(3), eid(4), eid(5)],
    )
    stored = make_stored(
        user_id=[uid(3), uid(4)], current_state=["S2", "S4"], last_activity_at=[ago(3), ago(61)]
    )

    result = derive(events, stored)

    assert result.events_read == 5
    assert result.invalid == {"unknown_category": 1, "unknown_event_type": 1}
    assert result.deduplicated == 1
    # user 1 (events), user 3 (rejected), user 4 (stored only); user 2's only event was discarded
    assert result.users_evaluated == 3
    assert result.rejected_by_reason == {"unknown_event_category": 1}
    assert result.before == {"S0": 0, "S1": 0, "S2": 1, "S3": 0, "S4": 1, "S5": 0}
    # user 1: new, G1 to S1; user 3: stays S2 (rejected); user 4: S4 -> S2 (R2, R1 at 61 days)
    assert result.after == {"S0": 0, "S1": 1, "S2": 2, "S3": 0, "S4": 0, "S5": 0}
    assert result.state_changes == 2


@pytest.mark.parametrize(("days", "expected"), [(8, "S3"), (44, "S3"), (45, "S2")])
def test_stored_state_persists_until_a_retention_rule_applies(days: int, expected: str) -> None:
    # No event within 7 days, so G1's checks would fail; the stored S3 is kept, not recomputed.
    events = make_events(event_type=["content_view"], created_at=[ago(days)])
    stored = make_stored(current_state=["S3"], last_activity_at=[ago(days)])

    result = derive(events, stored)

    assert metric(result, uid(1), "active_7d") == 0
    assert metric(result, uid(1), "new_state") == expected
    assert result.audit.height == (0 if expected == "S3" else 1)


def test_empty_inputs_derive_nothing() -> None:
    result = derive(no_events(), no_stored())

    assert (result.events_read, result.users_evaluated, result.writes.height) == (0, 0, 0)
    assert result.audit.height == 0
    assert result.after == dict.fromkeys(STATES, 0)


# -- properties -------------------------------------------------------------------------------------

_TYPES = [
    ("content_view", "engagement"),
    ("scroll_depth_75", "engagement"),
    ("long_form_completion", "engagement"),
    ("repeat_session_30d", "retention"),
    ("email_subscribe", "subscription"),
    ("asset_download", "subscription"),
    ("content_share", "advocacy"),
    ("comment_repeat", "advocacy"),
    ("utm_landing", "attribution"),
    ("content_view", "advocacy"),  # wrong category
    ("page_ping", "engagement"),  # unknown type
    ("content_view", "telemetry"),  # unknown category: rejects the user
]
_DAYS = [0, 1, 6, 7, 8, 29, 30, 44, 45, 59, 60, 61, 74, 75, 100, 119]

_event = st.fixed_dictionaries(
    {
        "user": st.integers(1, 4),
        "kind": st.integers(0, len(_TYPES) - 1),
        "days": st.sampled_from(_DAYS),
        "seconds": st.integers(0, 8),
        "session_id": st.sampled_from([None, "a", "b"]),
        "duration_seconds": st.sampled_from([None, "5", "20", "abc"]),
        "consent_recorded": st.sampled_from([None, True, True, False]),
    }
)
_stored = st.dictionaries(
    st.integers(1, 5),
    st.tuples(st.sampled_from(STATES), st.sampled_from([*_DAYS, 200])),
    max_size=4,
)


def events_from(draws: list[dict[str, Any]]) -> pl.DataFrame:
    return make_events(
        id=[eid(i) for i in range(len(draws))],
        user_id=[uid(d["user"]) for d in draws],
        event_type=[_TYPES[d["kind"]][0] for d in draws],
        event_category=[_TYPES[d["kind"]][1] for d in draws],
        created_at=[ago(d["days"], seconds=d["seconds"]) for d in draws],
        session_id=[d["session_id"] for d in draws],
        duration_seconds=[d["duration_seconds"] for d in draws],
        consent_recorded=[d["consent_recorded"] for d in draws],
    )


def stored_from(states: dict[int, tuple[str, int]]) -> pl.DataFrame:
    users = sorted(states)
    return make_stored(
        user_id=[uid(u) for u in users],
        current_state=[states[u][0] for u in users],
        last_activity_at=[ago(states[u][1]) for u in users],
        engagement_score=[1.0] * len(users),
        state_updated_at=[ago(200)] * len(users),
    )


def apply_writes(stored: pl.DataFrame, result: Derivation) -> pl.DataFrame:
    """What ``audience_state`` holds after the write of ``result`` (the upsert and audit pointer)."""
    last_audit = result.audit.filter(pl.col("step") == pl.col("steps")).select(
        "user_id",
        last_audit_id=pl.col("user_id").bin.encode("hex") + ":" + pl.col("steps").cast(pl.String),
        audit_new_state="new_state",
    )
    written = (
        result.writes.join(last_audit, on="user_id", how="left")
        .join(
            stored.select("user_id", "last_audit_id", "audit_new_state"), on="user_id", how="left"
        )
        .select(
            "user_id",
            "current_state",
            "state_updated_at",
            "engagement_score",
            "last_event_type",
            "last_activity_at",
            # A write without a state change keeps the stored audit pointer.
            last_audit_id=pl.coalesce("last_audit_id", "last_audit_id_right"),
            audit_new_state=pl.coalesce("audit_new_state", "audit_new_state_right"),
            audit_user_matches=pl.lit(True),
        )
    )
    untouched = stored.join(written, on="user_id", how="anti")
    return pl.concat([untouched, written.cast(STORED_STATES)]).sort("user_id")


@settings(max_examples=60, deadline=None)
@given(draws=st.lists(_event, max_size=40), states=_stored)
def test_second_run_over_the_same_data_writes_and_logs_nothing(
    draws: list[dict[str, Any]], states: dict[int, tuple[str, int]]
) -> None:
    events = events_from(draws)
    stored = stored_from(states)
    first = derive(events, stored)
    stored_after = apply_writes(stored, first)
    logged = make_rejections(
        first.to_log.get_column("user_id").to_list(),
        first.to_log.get_column("reasons_key").to_list(),
    )

    second = derive(events, stored_after, logged, as_of=AS_OF)

    assert second.writes.height == 0
    assert second.audit.height == 0
    assert second.to_log.height == 0
    assert second.after == first.after


def _sorted(frame: pl.DataFrame, *by: str) -> pl.DataFrame:
    return frame.sort(list(by))


@settings(max_examples=60, deadline=None)
@given(draws=st.lists(_event, max_size=40), states=_stored, data=st.data())
def test_row_order_of_the_inputs_does_not_matter(
    draws: list[dict[str, Any]], states: dict[int, tuple[str, int]], data: st.DataObject
) -> None:
    events = events_from(draws)
    stored = stored_from(states)
    event_order = data.draw(st.permutations(range(events.height)))
    stored_order = data.draw(st.permutations(range(stored.height)))

    result = derive(events[list(event_order)], stored[list(stored_order)])
    expected = derive(events, stored)

    assert_frame_equal(_sorted(result.evaluated, "user_id"), _sorted(expected.evaluated, "user_id"))
    assert_frame_equal(
        _sorted(result.audit, "user_id", "step"), _sorted(expected.audit, "user_id", "step")
    )
    assert_frame_equal(_sorted(result.writes, "user_id"), _sorted(expected.writes, "user_id"))
    assert_frame_equal(_sorted(result.rejected, "user_id"), _sorted(expected.rejected, "user_id"))
    assert_frame_equal(_sorted(result.to_log, "user_id"), _sorted(expected.to_log, "user_id"))
    assert (result.events_read, result.invalid, result.deduplicated) == (
        expected.events_read,
        expected.invalid,
        expected.deduplicated,
    )
    assert (result.users_evaluated, result.before, result.after) == (
        expected.users_evaluated,
        expected.before,
        expected.after,
    )


def test_rules_are_the_canonical_ones() -> None:
    # The figures the boundary tests above are written against.
    assert (RULES.min_duration_seconds, RULES.min_scroll_depth_percent) == (20, 30)
    assert [(r.id, r.from_state, r.to_state, r.inactivity_days) for r in RULES.downgrades] == [
        ("R3", "S5", "S4", 75),
        ("R2", "S4", "S3", 60),
        ("R1", "S3", "S2", 45),
    ]
