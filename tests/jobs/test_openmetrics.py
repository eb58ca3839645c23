"""The OpenMetrics writer: names, escaping, values, and what both Prometheus parsers accept."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_prom

from derive.jobs.openmetrics import Gauge, render


def test_render_writes_help_type_unit_samples_and_eof() -> None:
    gauge = Gauge("derive_lag_seconds", "Seconds since", "seconds").add(12.5, job="derive")

    result = render([gauge])

    assert result == (
        "# HELP derive_lag_seconds Seconds since\n"
        "# TYPE derive_lag_seconds gauge\n"
        "# UNIT derive_lag_seconds seconds\n"
        'derive_lag_seconds{job="derive"} 12.5\n'
        "# EOF\n"
    )


def test_label_values_are_escaped_and_parse_back() -> None:
    nasty = 'a "quoted"\\ reason\nwith a newline'
    text = render([Gauge("derive_rejections", "per reason").add(3, reason=nasty)])

    (family,) = parse_om(text)

    assert family.samples[0].labels == {"reason": nasty}
    assert family.samples[0].value == 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.0, "1"), (0.25, "0.25"), (1764633600.123456, "1764633600.123456"), (math.inf, "+Inf")],
)
def test_values_are_written_exactly(value: float, expected: str) -> None:
    text = render([Gauge("derive_x", "x").add(value)])

    assert f"derive_x {expected}\n" in text


def test_unknown_values_leave_the_series_out_and_empty_families_are_skipped() -> None:
    text = render([Gauge("derive_a", "a").add(None, job="derive"), Gauge("derive_b", "b").add(1)])

    assert "derive_a" not in text
    assert [f.name for f in parse_om(text)] == ["derive_b"]


def test_the_same_text_parses_as_prometheus_text_too() -> None:
    text = render(
        [
            Gauge("derive_lag_seconds", "lag", "seconds").add(3, job="derive").add(4, job="prune"),
            Gauge("derive_users", "users").add(7, state="S1"),
        ]
    )

    families = {f.name: f for f in parse_prom(text)}

    assert [s.value for s in families["derive_lag_seconds"].samples] == [3, 4]
    assert families["derive_users"].samples[0].labels == {"state": "S1"}


@pytest.mark.parametrize(
    ("name", "unit"), [("derive-lag", ""), ("derive_lag", "seconds"), ("9lives", "")]
)
def test_invalid_names_are_refused(name: str, unit: str) -> None:
    with pytest.raises(ValueError, match="metric"):
        Gauge(name, "help", unit)


@settings(max_examples=200, deadline=None)
@given(
    reasons=st.dictionaries(
        st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30),
        st.integers(min_value=0, max_value=10**12),
        max_size=8,
    )
)
def test_any_label_value_round_trips_through_both_parsers(reasons: dict[str, int]) -> None:
    gauge = Gauge("derive_rejections", "per reason")
    for reason, count in reasons.items():
        gauge.add(count, reason=reason)

    text = render([gauge])

    for parse in (parse_om, parse_prom):
        parsed = {s.labels["reason"]: s.value for f in parse(text) for s in f.samples}
        assert parsed == reasons
