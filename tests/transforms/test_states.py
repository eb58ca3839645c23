"""SPEC §2.6 state machine: gates at their thresholds, no skipping, the retention cascade."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from derive.config import STATES
from derive.transforms.audit import audit_rows
from derive.transforms.metrics import LAST_EVENT_TYPE, LATEST_EVENT_AT
from derive.transforms.states import evaluate
from tests.transforms.conftest import AS_OF, DAY, RULES, US, ago, make_stored, no_stored, uid
from tests.transforms.reference import state_path

METRICS = [m.name for m in RULES.metrics]
NOTHING = dict.fromkeys(METRICS, 0)


def make_metrics(users: list[dict[str, Any]]) -> pl.DataFrame:
    """A ``user_metrics`` frame: every metric 0 unless given, active an hour ago."""
    rows = [
        {
            "user_id": uid(i + 1),
            **NOTHING,
            LAST_EVENT_TYPE: "content_view",
            LATEST_EVENT_AT: ago(hours=1),
            **values,
        }
        for i, values in enumerate(users)
    ]
    schema = {
        "user_id": pl.Binary(),
        **{m: pl.Float64() if m == "score" else pl.Int64() for m in METRICS},
        LAST_EVENT_TYPE: pl.String(),
        LATEST_EVENT_AT: pl.Datetime("us", "UTC"),
    }
    return pl.DataFrame(rows, schema=schema)


def new_states(metrics: pl.DataFrame, stored: pl.DataFrame) -> pl.DataFrame:
    return (
        evaluate(metrics.lazy(), stored.lazy(), as_of=AS_OF, rules=RULES)
        .select("user_id", "prior_state", "new_state")
        .sort("user_id")
        .collect()
    )


def climb_from(prior: str, values: dict[str, Any]) -> str:
    """The new state of one user stored at ``prior`` with these metrics."""
    result = new_states(make_metrics([values]), make_stored(current_state=[prior]))
    return str(result.item(0, "new_state"))


def test_gates_come_in_order_s0_to_s5() -> None:
    assert [(g.id, g.from_state, g.to_state) for g in RULES.gates] == [
        ("G1", "S0", "S1"),
        ("G2", "S1", "S2"),
        ("G3", "S2", "S3"),
        ("G4", "S3", "S4"),
        ("G5", "S4", "S5"),
    ]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"deep_7d": 1}, "S1"),
        ({"score": 5, "active_7d": 1}, "S1"),
        ({"score": 4, "active_7d": 1}, "S0"),
        ({"score": 5, "active_7d": 0}, "S0"),
        ({"score": 11, "active_7d": 0}, "S0"),
        ({}, "S0"),
    ],
)
def test_gate_g1_deep_7d_or_score_5_and_active_7d(values: dict[str, Any], expected: str) -> None:
    assert climb_from("S0", values) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"repeat_30d": 1}, "S2"),
        ({"score": 12}, "S2"),
        ({"score": 11}, "S1"),
        ({"sessions_30d": 2, "qualified_views_30d": 3}, "S2"),
        ({"sessions_30d": 1, "qualified_views_30d": 3}, "S1"),
        ({"sessions_30d": 2, "qualified_views_30d": 2}, "S1"),
        ({}, "S1"),
    ],
)
def test_gate_g2_repeat_or_score_12_or_sessions_and_views(
    values: dict[str, Any], expected: str
) -> None:
    assert climb_from("S1", values) == expected


@pytest.mark.parametrize(
    ("values", "expected"), [({"consented_subscription": 1}, "S3"), ({}, "S2")]
)
def test_gate_g3_consented_subscription(values: dict[str, Any], expected: str) -> None:
    assert climb_from("S2", values) == expected


@pytest.mark.parametrize(("values", "expected"), [({"advocacy_60d": 1}, "S4"), ({}, "S3")])
def test_gate_g4_advocacy_60d(values: dict[str, Any], expected: str) -> None:
    assert climb_from("S3", values) == expected


_G5_MET = {"advocacy_60d": 3, "score": 35, "repeat_30d": 2, "long_form_30d": 1}
_G5_NEARLY = {"advocacy_60d": 2, "score": 34, "repeat_30d": 1, "long_form_30d": 0}


@pytest.mark.parametrize(
    "met",
    [
        ("advocacy_60d", "score"),
        ("advocacy_60d", "repeat_30d"),
        ("advocacy_60d", "long_form_30d"),
        ("score", "repeat_30d"),
        ("score", "long_form_30d"),
        ("repeat_30d", "long_form_30d"),
    ],
)
def test_gate_g5_passes_with_exactly_two_of_four(met: tuple[str, str]) -> None:
    values = {k: _G5_MET[k] if k in met else _G5_NEARLY[k] for k in _G5_MET}

    assert climb_from("S4", values) == "S5"


@pytest.mark.parametrize("met", list(_G5_MET))
def test_gate_g5_fails_with_one_of_four(met: str) -> None:
    values = {k: _G5_MET[k] if k == met else _G5_NEARLY[k] for k in _G5_MET}

    assert climb_from("S4", values) == "S4"


def test_s5_is_the_top() -> None:
    assert climb_from("S5", dict.fromkeys(METRICS, 100)) == "S5"


def test_no_skipping_a_gate_that_fails_stops_the_climb() -> None:
    # User 1 meets only G2 (and G3..G5), not G1; user 2 meets G1 but not G2; user 3 meets all.
    g1 = {"deep_7d": 1, "active_7d": 1}
    after_g1 = {
        "repeat_30d": 2,
        "consented_subscription": 1,
        "advocacy_60d": 3,
        "long_form_30d": 1,
    }
    metrics = make_metrics([after_g1, g1, {**g1, **after_g1}])

    result = new_states(metrics, no_stored())

    expected = pl.DataFrame(
        {
            "user_id": [uid(1), uid(2), uid(3)],
            "prior_state": [None, None, None],
            "new_state": ["S0", "S1", "S5"],
        },
        schema={"user_id": pl.Binary, "prior_state": pl.String, "new_state": pl.String},
    )
    assert_frame_equal(result, expected)


def test_climb_starts_at_the_stored_state() -> None:
    # Only G3 and G4 hold: a stored S2 climbs two levels, a stored S0 or S1 does not move.
    values = {"consented_subscription": 1, "advocacy_60d": 1}
    metrics = make_metrics([values, values, values])
    stored = make_stored(user_id=[uid(1), uid(2), uid(3)], current_state=["S0", "S1", "S2"])

    result = new_states(metrics, stored)

    assert result.get_column("new_state").to_list() == ["S0", "S1", "S4"]


# -- retention downgrades ---------------------------------------------------------------------------


def after_quiet(prior: str, last_activity: datetime) -> str:
    """New state of a stored user with no events in the window, last active at ``last_activity``."""
    stored = make_stored(current_state=[prior], last_activity_at=[last_activity])
    result = new_states(make_metrics([]), stored)
    return str(result.item(0, "new_state"))


@pytest.mark.parametrize(
    ("prior", "days", "expected"),
    [
        ("S3", 44, "S3"),
        ("S3", 45, "S2"),
        ("S4", 59, "S4"),
        ("S4", 60, "S2"),  # R2 to S3, then R1 (60 >= 45) to S2
        ("S5", 74, "S5"),
        ("S5", 75, "S2"),  # R3, R2, R1 in turn: the cascade runs to its fixed point
        ("S5", 999, "S2"),
        ("S2", 999, "S2"),
        ("S1", 999, "S1"),
        ("S0", 999, "S0"),
    ],
)
def test_retention_r1_r2_r3_cascade(prior: str, days: int, expected: str) -> None:
    assert after_quiet(prior, AS_OF - days * DAY) == expected


@pytest.mark.parametrize(("prior", "days"), [("S3", 45), ("S4", 60), ("S5", 75)])
def test_retention_boundary_is_whole_days(prior: str, days: int) -> None:
    # One microsecond short of the threshold is still (days - 1) whole days of inactivity.
    assert after_quiet(prior, AS_OF - days * DAY + US) == prior


def test_retention_unknown_last_activity_counts_as_999_days() -> None:
    assert after_quiet("S5", None) == "S2"  # type: ignore[arg-type]


def test_stored_state_persists_without_recent_events() -> None:
    # Quiet for 10 and then 44 days: no gate passes (no events) and no retention rule applies.
    for days in (8, 10, 30, 44):
        assert after_quiet("S3", AS_OF - days * DAY) == "S3"


def test_climb_then_cascade_in_one_run() -> None:
    # A stored S3 whose only activity is an advocacy event exactly 60 days ago: G4 passes
    # (advocacy_60d includes day 60), then R2 and R1 fire on 60 days of inactivity.
    metrics = make_metrics([{"advocacy_60d": 1, LATEST_EVENT_AT: ago(60)}])
    stored = make_stored(current_state=["S3"], last_activity_at=[ago(70)])

    result = (
        evaluate(metrics.lazy(), stored.lazy(), as_of=AS_OF, rules=RULES)
        .select("prior_state", "climbed_state", "new_state", "inactivity_days")
        .collect()
    )

    assert result.row(0) == ("S3", "S4", "S2", 60)


# -- property: the vectorised machine equals the one-user-at-a-time reference ----------------------

_metric_values = st.fixed_dictionaries(
    {
        "score": st.sampled_from([0.0, 4.0, 5.0, 11.0, 12.0, 34.0, 35.0, 50.0]),
        "deep_7d": st.integers(0, 1),
        "active_7d": st.integers(0, 1),
        "repeat_30d": st.integers(0, 2),
        "sessions_30d": st.integers(0, 2),
        "qualified_views_30d": st.integers(0, 3),
        "consented_subscription": st.integers(0, 1),
        "advocacy_60d": st.integers(0, 3),
        "long_form_30d": st.integers(0, 1),
    }
)
_user = st.tuples(
    _metric_values,
    st.sampled_from([None, *STATES]),
    st.sampled_from([0, 7, 44, 45, 59, 60, 74, 75, 120]),
)


@settings(max_examples=100, deadline=None)
@given(users=st.lists(_user, min_size=1, max_size=12))
def test_state_machine_equals_the_reference(
    users: list[tuple[dict[str, float], str | None, int]],
) -> None:
    assert set(METRICS) == set(users[0][0])
    metrics = make_metrics([{**values, LATEST_EVENT_AT: ago(days)} for values, _, days in users])
    with_prior = [(i, prior) for i, (_, prior, _) in enumerate(users) if prior is not None]
    stored = make_stored(
        user_id=[uid(i + 1) for i, _ in with_prior],
        current_state=[prior for _, prior in with_prior],
        last_activity_at=[ago(users[i][2]) for i, _ in with_prior],
    )
    evaluated = evaluate(metrics.lazy(), stored.lazy(), as_of=AS_OF, rules=RULES)

    result = audit_rows(evaluated, rules=RULES).collect()

    expected_rows = [
        (uid(i + 1), n + 1, step.prior_state, step.new_state, step.rule_id)
        for i, (values, prior, days) in enumerate(users)
        for n, step in enumerate(state_path(prior, values, days, RULES))
    ]
    expected = pl.DataFrame(
        expected_rows,
        schema={
            "user_id": pl.Binary,
            "step": pl.Int32,
            "prior_state": pl.String,
            "new_state": pl.String,
            "rule_id": pl.String,
        },
        orient="row",
    )
    assert_frame_equal(
        result.select(expected.columns).sort("user_id", "step"), expected.sort("user_id", "step")
    )
