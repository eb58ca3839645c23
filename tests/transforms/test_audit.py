"""SPEC §2.6 audit and write: one row per level step, rule_trigger evidence, write only changes."""

from __future__ import annotations

import json
from typing import Any

import polars as pl
from polars.testing import assert_frame_equal

from derive.transforms.audit import AUDIT_SCHEMA
from tests.transforms.conftest import (
    AS_OF,
    ago,
    audit_path,
    derive,
    make_events,
    make_stored,
    no_events,
    uid,
    user_row,
)

#: Eight events of one user within the last day that pass every gate (score 33).
EVERYTHING = {
    "event_type": [
        "scroll_depth_75",
        "repeat_session_30d",
        "repeat_session_30d",
        "email_subscribe",
        "content_share",
        "content_share",
        "content_share",
        "long_form_completion",
    ],
    "session_id": [f"s{i}" for i in range(8)],
    "created_at": [ago(hours=1 + i) for i in range(8)],
    "consent_recorded": True,
}


def triggers(result: Any, user: bytes) -> list[dict[str, Any]]:
    rows = result.audit.filter(pl.col("user_id") == user).sort("step")
    return [json.loads(t) for t in rows.get_column("rule_trigger")]


def test_audit_new_user_climbing_to_s5_logs_first_seen_and_every_gate() -> None:
    events = make_events(**EVERYTHING)

    result = derive(events)

    expected = pl.DataFrame(
        {
            "user_id": [uid(1)] * 6,
            "step": [1, 2, 3, 4, 5, 6],
            "steps": [6] * 6,
            "prior_state": [None, "S0", "S1", "S2", "S3", "S4"],
            "new_state": ["S0", "S1", "S2", "S3", "S4", "S5"],
            "rule_id": ["first_seen", "G1", "G2", "G3", "G4", "G5"],
        },
        schema={k: v for k, v in AUDIT_SCHEMA.items() if k != "rule_trigger"},
    )
    assert_frame_equal(result.audit.drop("rule_trigger"), expected)


def test_audit_rule_trigger_names_the_gate_and_its_metric_values() -> None:
    events = make_events(**EVERYTHING)

    result = derive(events)

    assert triggers(result, uid(1)) == [
        {"rule": "first_seen"},
        {
            "rule": "G1",
            "clauses_passed": 2,
            "clauses_needed": 1,
            "metrics": {"deep_7d": 2, "score": 33.0, "active_7d": 8},
        },
        {
            "rule": "G2",
            "clauses_passed": 2,
            "clauses_needed": 1,
            "metrics": {
                "repeat_30d": 2,
                "score": 33.0,
                "sessions_30d": 8,
                "qualified_views_30d": 0,
            },
        },
        {
            "rule": "G3",
            "clauses_passed": 1,
            "clauses_needed": 1,
            "metrics": {"consented_subscription": 1},
        },
        {"rule": "G4", "clauses_passed": 1, "clauses_needed": 1, "metrics": {"advocacy_60d": 3}},
        {
            "rule": "G5",
            "clauses_passed": 3,
            "clauses_needed": 2,
            "metrics": {"advocacy_60d": 3, "score": 33.0, "repeat_30d": 2, "long_form_30d": 1},
        },
    ]


def test_audit_new_user_without_any_gate_logs_first_seen_only() -> None:
    events = make_events(duration_seconds=["5"])

    result = derive(events)

    assert audit_path(result, uid(1)) == [(None, "S0", "first_seen")]


def test_audit_retention_cascade_logs_each_rule_with_inactivity() -> None:
    stored = make_stored(current_state=["S5"], last_activity_at=[ago(80)])

    result = derive(no_events(), stored)

    assert audit_path(result, uid(1)) == [
        ("S5", "S4", "R3"),
        ("S4", "S3", "R2"),
        ("S3", "S2", "R1"),
    ]
    evidence = {"inactivity_days": 80, "last_activity_at": "2026-09-03T08:00:00.000000Z"}
    assert triggers(result, uid(1)) == [
        {"rule": "R3", **evidence},
        {"rule": "R2", **evidence},
        {"rule": "R1", **evidence},
    ]


def test_audit_path_is_climb_then_cascade() -> None:
    # Stored S3, one advocacy event exactly 60 days ago: G4 to S4, then R2 and R1 on 60 days.
    events = make_events(event_type=["content_share"], created_at=[ago(60)])
    stored = make_stored(current_state=["S3"], last_activity_at=[ago(70)])

    result = derive(events, stored)

    assert audit_path(result, uid(1)) == [
        ("S3", "S4", "G4"),
        ("S4", "S3", "R2"),
        ("S3", "S2", "R1"),
    ]
    assert result.audit.get_column("step").to_list() == [1, 2, 3]
    assert result.audit.get_column("steps").to_list() == [3, 3, 3]


def test_audit_no_net_change_no_audit_row() -> None:
    # Stored S2 with a consented subscription 45 days ago: G3 lifts it to S3 and R1 (45 days)
    # lowers it back; prior == new, so nothing is logged and the state is not touched.
    events = make_events(
        event_type=["email_subscribe"], created_at=[ago(45)], consent_recorded=True
    )
    stored = make_stored(current_state=["S2"], last_activity_at=[ago(50)], engagement_score=0.0)

    result = derive(events, stored)

    assert result.audit.height == 0
    write = user_row(result.writes, uid(1))
    assert (write["current_state"], write["state_changed"], write["audit_steps"]) == (
        "S2",
        False,
        0,
    )
    assert write["state_updated_at"] == ago(10)


def test_audit_rows_per_user_are_independent() -> None:
    events = make_events(
        user_id=[uid(1), uid(2)],
        event_type=["scroll_depth_75", "content_view"],
        duration_seconds="1",
    )
    stored = make_stored(user_id=[uid(2)], current_state=["S0"])

    result = derive(events, stored)

    assert audit_path(result, uid(1)) == [(None, "S0", "first_seen"), ("S0", "S1", "G1")]
    assert audit_path(result, uid(2)) == []


# -- state writes ---------------------------------------------------------------------------------


def test_write_new_user_points_at_its_last_audit_step() -> None:
    events = make_events(**EVERYTHING)

    result = derive(events)

    write = user_row(result.writes, uid(1))
    assert write["current_state"] == "S5"
    assert write["state_changed"] is True
    assert write["state_updated_at"] == AS_OF
    assert write["engagement_score"] == 33.0
    assert write["last_event_type"] == "scroll_depth_75"
    assert write["last_activity_at"] == ago(hours=1)
    assert write["audit_steps"] == 6
    assert json.loads(write["last_rule_trigger"])["rule"] == "G5"
    assert json.loads(write["metrics"])["advocacy_60d"] == 3


def test_write_skips_users_whose_state_score_and_last_type_are_unchanged() -> None:
    events = make_events(event_type=["scroll_depth_75"], created_at=[ago(2)])
    stored = make_stored(
        current_state=["S1"],
        engagement_score=[2.0],
        last_event_type=["scroll_depth_75"],
        last_activity_at=[ago(2)],
    )

    result = derive(events, stored)

    assert result.writes.height == 0
    assert result.audit.height == 0


def test_write_score_change_alone_keeps_state_updated_at() -> None:
    events = make_events(event_type=["scroll_depth_75"], created_at=[ago(2)])
    stored = make_stored(
        current_state=["S1"], engagement_score=[9.0], last_event_type=["scroll_depth_75"]
    )

    result = derive(events, stored)

    write = user_row(result.writes, uid(1))
    assert (write["current_state"], write["state_changed"], write["engagement_score"]) == (
        "S1",
        False,
        2.0,
    )
    assert write["state_updated_at"] == ago(10)
    assert write["audit_steps"] == 0
    assert write["last_rule_trigger"] is None


def test_write_last_event_type_change_alone_is_written() -> None:
    events = make_events(event_type=["scroll_depth_75"], created_at=[ago(2)])
    stored = make_stored(
        current_state=["S1"], engagement_score=[2.0], last_event_type=["content_view"]
    )

    result = derive(events, stored)

    assert user_row(result.writes, uid(1))["last_event_type"] == "scroll_depth_75"


def test_write_stored_user_without_events_keeps_its_last_event_type() -> None:
    stored = make_stored(
        current_state=["S1"], engagement_score=[4.0], last_event_type=["content_share"]
    )

    result = derive(no_events(), stored)

    write = user_row(result.writes, uid(1))
    assert (write["engagement_score"], write["last_event_type"]) == (0.0, "content_share")
