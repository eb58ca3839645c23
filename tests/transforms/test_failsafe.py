"""SPEC §2.3 fail-safes: a suspicious user is rejected with reasons and evidence, others go on."""

from __future__ import annotations

import json
from datetime import timedelta

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from derive.schema import REJECT_REASONS
from derive.transforms.failsafe import REJECTIONS_SCHEMA, to_log
from derive.transforms.pipeline import Derivation
from tests.transforms.conftest import (
    RULES,
    US,
    ago,
    derive,
    eid,
    make_events,
    make_rejections,
    make_stored,
    no_events,
    uid,
)

HOUR = timedelta(hours=1)
LIMIT = RULES.spike_max_events_per_hour


def rejected_users(result: Derivation) -> dict[bytes, list[str]]:
    return dict(result.rejected.select("user_id", "reasons").iter_rows())


def written_users(result: Derivation) -> list[bytes]:
    return sorted(result.writes.get_column("user_id").to_list())


def evidence(result: Derivation, user: bytes) -> dict[str, object]:
    row = result.rejected.filter(pl.col("user_id") == user)
    parsed: dict[str, object] = json.loads(row.item(0, "evidence"))
    return parsed


def with_bystander(events: pl.DataFrame) -> pl.DataFrame:
    """Add one ordinary event of user 2, who must be derived whatever happens to user 1."""
    bystander = make_events(id=[eid(99_999)], user_id=[uid(2)], event_type=["scroll_depth_75"])
    return pl.concat([events, bystander])


def test_reject_reasons_are_the_four_of_the_spec() -> None:
    assert REJECT_REASONS == (
        "unknown_event_category",
        "consent_missing",
        "volume_spike",
        "state_jump",
    )


def test_unknown_event_category_rejects_only_that_user() -> None:
    events = with_bystander(
        make_events(event_category=["telemetry", "engagement", "telemetry"], duration_seconds="30")
    )

    result = derive(events)

    assert rejected_users(result) == {uid(1): ["unknown_event_category"]}
    assert evidence(result, uid(1)) == {
        "unknown_event_category": {"categories": ["telemetry"], "events": 2}
    }
    assert written_users(result) == [uid(2)]
    assert result.audit.get_column("user_id").unique().to_list() == [uid(2)]


@pytest.mark.parametrize("event_type", ["email_subscribe", "asset_download"])
def test_consent_missing_rejects_a_subscription_without_boolean_consent(event_type: str) -> None:
    events = with_bystander(
        make_events(event_type=[event_type], consent_recorded=[None], created_at=[ago(3)])
    )

    result = derive(events)

    assert rejected_users(result) == {uid(1): ["consent_missing"]}
    assert evidence(result, uid(1)) == {
        "consent_missing": {
            "event_types": [event_type],
            "events": 1,
            "first_at": "2026-11-19T08:00:00.000000Z",
        }
    }
    assert written_users(result) == [uid(2)]


@pytest.mark.parametrize("consent", [True, False])
def test_consent_missing_accepts_a_boolean_consent_either_way(consent: bool) -> None:
    events = make_events(event_type=["email_subscribe"], consent_recorded=[consent])

    result = derive(events)

    assert result.rejected.height == 0
    assert written_users(result) == [uid(1)]


def test_consent_missing_ignores_other_categories() -> None:
    events = make_events(event_type=["content_share", "utm_landing"], consent_recorded=None)

    result = derive(events)

    assert result.rejected.height == 0


def spike(count: int, span: timedelta, *, user: int = 1, spread: bool = False) -> pl.DataFrame:
    """``count`` events of one user: the first ``span`` before the last.

    The others sit at the last instant, or with ``spread`` evenly between the two.
    """
    last = ago(2)
    step = span // (count - 1)
    times = [last - span] + [
        last - (count - 1 - i) * step if spread else last for i in range(1, count)
    ]
    return make_events(
        id=[eid(user * 10_000 + i) for i in range(count)], user_id=uid(user), created_at=times
    )


def test_volume_spike_limit_is_500() -> None:
    assert LIMIT == 500


@pytest.mark.parametrize(
    ("count", "span", "spread", "is_spike"),
    [
        (LIMIT, timedelta(minutes=10), False, False),
        (LIMIT + 1, timedelta(minutes=10), False, True),
        (LIMIT + 1, HOUR - US, False, True),
        # Rolling windows are (t - 1 h, t]: an event exactly one hour earlier is not in the hour.
        (LIMIT + 1, HOUR, False, False),
        # 501 events spread evenly over 3 hours: about 167 in any hour.
        (LIMIT + 1, timedelta(hours=3), True, False),
        (LIMIT + 1, HOUR + US, True, False),
    ],
)
def test_volume_spike_over_500_events_in_one_rolling_hour(
    count: int, span: timedelta, spread: bool, is_spike: bool
) -> None:
    events = with_bystander(spike(count, span, spread=spread))

    result = derive(events)

    assert rejected_users(result) == ({uid(1): ["volume_spike"]} if is_spike else {})
    assert written_users(result) == ([uid(2)] if is_spike else [uid(1), uid(2)])


def test_volume_spike_counts_before_dedupe_and_validation() -> None:
    # 501 events at one instant: dedupe would keep one, and half of them are invalid.
    events = make_events(
        id=[eid(i) for i in range(LIMIT + 1)],
        created_at=ago(1),
        duration_seconds=["abc" if i % 2 else "30" for i in range(LIMIT + 1)],
    )

    result = derive(events)

    assert rejected_users(result) == {uid(1): ["volume_spike"]}
    assert evidence(result, uid(1)) == {
        "volume_spike": {
            "max_events_in_one_hour": LIMIT + 1,
            "limit": LIMIT,
            "hour_ending_at": "2026-11-21T08:00:00.000000Z",
        }
    }


def test_volume_spike_is_per_user() -> None:
    events = pl.concat(
        [spike(300, timedelta(minutes=5), user=1), spike(300, timedelta(minutes=5), user=2)]
    )

    result = derive(events)

    assert result.rejected.height == 0


@pytest.mark.parametrize(
    ("audit_new_state", "audit_user_matches", "last_audit_id"),
    [
        (None, None, None),  # a stored state without any audit row
        ("S2", True, "a1"),  # the last audit row says another state
        ("S3", False, "a1"),  # the pointed-at audit row belongs to another user
        (None, None, "a1"),  # the pointer leads nowhere
    ],
    ids=["no-audit", "audit-differs", "audit-of-another-user", "dangling-pointer"],
)
def test_state_jump_rejects_a_stored_state_the_audit_trail_disagrees_with(
    audit_new_state: str | None, audit_user_matches: bool | None, last_audit_id: str | None
) -> None:
    stored = make_stored(
        user_id=[uid(1), uid(2)],
        current_state=["S3", "S3"],
        audit_new_state=[audit_new_state, "S3"],
        audit_user_matches=[audit_user_matches, True],
        last_audit_id=[last_audit_id, "a2"],
        last_activity_at=ago(50),
    )

    result = derive(no_events(), stored)

    assert rejected_users(result) == {uid(1): ["state_jump"]}
    assert evidence(result, uid(1)) == {
        "state_jump": {
            "stored_state": "S3",
            "audited_state": audit_new_state,
            "last_audit_id": last_audit_id,
        }
    }
    # User 2 (stored S3, 50 days quiet) is derived: R1 takes it to S2. User 1 is left alone.
    assert written_users(result) == [uid(2)]
    assert result.audit.get_column("user_id").unique().to_list() == [uid(2)]
    assert result.after["S3"] == 1
    assert result.after["S2"] == 1


def test_rejected_user_has_every_reason_in_spec_order() -> None:
    events = make_events(
        event_type=["content_view", "email_subscribe"],
        event_category=["telemetry", "subscription"],
        consent_recorded=None,
    )
    stored = make_stored(current_state=["S1"], audit_new_state=["S0"])

    result = derive(events, stored)

    expected = pl.DataFrame(
        {
            "user_id": [uid(1)],
            "reasons": [["unknown_event_category", "consent_missing", "state_jump"]],
            "reasons_key": ["unknown_event_category,consent_missing,state_jump"],
        },
        schema={k: v for k, v in REJECTIONS_SCHEMA.items() if k != "evidence"},
    )
    assert_frame_equal(result.rejected.drop("evidence"), expected)
    assert set(evidence(result, uid(1))) == {
        "unknown_event_category",
        "consent_missing",
        "state_jump",
    }
    assert result.writes.height == 0
    assert result.audit.height == 0
    assert result.rejected_by_reason == {
        "consent_missing": 1,
        "state_jump": 1,
        "unknown_event_category": 1,
    }


def test_to_log_drops_rejections_already_logged_with_the_same_reasons() -> None:
    events = make_events(
        user_id=[uid(1), uid(2), uid(3)],
        event_type="email_subscribe",
        consent_recorded=None,
    )
    recent = make_rejections(
        user_id=[uid(1), uid(2), uid(4)],
        reasons_key=["consent_missing", "volume_spike", "consent_missing"],
    )

    result = derive(events, recent=recent)

    assert sorted(rejected_users(result)) == [uid(1), uid(2), uid(3)]
    assert sorted(result.to_log.get_column("user_id").to_list()) == [uid(2), uid(3)]


def test_to_log_keeps_the_rejection_columns() -> None:
    rejected = pl.DataFrame(
        {
            "user_id": [uid(1)],
            "reasons": [["state_jump"]],
            "reasons_key": ["state_jump"],
            "evidence": ["{}"],
        },
        schema=REJECTIONS_SCHEMA,
    )

    result = to_log(rejected.lazy(), make_rejections().lazy()).collect()

    assert_frame_equal(result, rejected)
