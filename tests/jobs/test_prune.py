"""Retention cutoffs: never inside a lookback, counted back from the last full run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from derive.config import Retention
from derive.jobs.prune import cutoffs

NOW = datetime(2026, 12, 1, 3, 30, tzinfo=UTC)
DAY = timedelta(days=1)


def test_events_go_after_the_lookback_plus_the_margin() -> None:
    result = cutoffs(
        Retention(), now=NOW, lookback=120 * DAY, base_as_of=NOW - timedelta(minutes=5)
    )

    assert result["events"] == NOW - timedelta(minutes=5) - 150 * DAY
    assert result["system_events"] == NOW - 730 * DAY
    assert result["surface_metric_payloads"] == result["touchpoint_payloads"] == NOW - 90 * DAY
    assert result["state_history"] == NOW - 365 * DAY


def test_an_old_base_run_moves_the_events_cutoff_back() -> None:
    # The next incremental run must still see the events that left the window since its base.
    result = cutoffs(Retention(), now=NOW, lookback=120 * DAY, base_as_of=NOW - 40 * DAY)

    assert result["events"] == NOW - 190 * DAY


def test_a_base_in_the_future_does_not_move_the_cutoff_forward() -> None:
    result = cutoffs(Retention(), now=NOW, lookback=120 * DAY, base_as_of=NOW + 10 * DAY)

    assert result["events"] == NOW - 150 * DAY


def test_forever_means_no_cutoff() -> None:
    keep = Retention(events_margin_days=None, system_events_days=None, payload_days=None,
                     state_history_days=None)  # fmt: skip

    assert set(cutoffs(keep, now=NOW, lookback=120 * DAY, base_as_of=None).values()) == {None}
