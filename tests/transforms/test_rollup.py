"""Cross-surface rollup transforms (SPEC §3): dedupe, per-kind aggregation, currency, cadence, diff."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from derive.errors import ConfigError
from derive.metrics_rules import KindRule, load_metrics_rules
from derive.transforms.rollup import (
    KEY,
    PARTS,
    SOURCES,
    STORED,
    STORED_PARTS,
    TS,
    aggregate_across_surfaces,
    checked_stale_after,
    decimal_text,
    due_window_end,
    latest_per_surface,
    next_tick,
    plan_rollup,
    rollup_clock,
    skipped,
    stale_after,
    surface_values,
)

RULES = load_metrics_rules()
AS_OF = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
U1 = b"\x01" * 16
W0 = datetime(2026, 11, 21, tzinfo=UTC)
W1 = datetime(2026, 11, 22, tzinfo=UTC)


def e4(value: float) -> int:
    return round(value * 10_000)


def source(
    surface: str,
    kind: str,
    value: float | None,
    *,
    fetched: int = 0,
    currency: str | None = None,
    n: int = 0,
    window: tuple[datetime, datetime] = (W0, W1),
) -> dict[str, Any]:
    return {
        "id": bytes([n]) * 16,
        "user_id": U1,
        "org_id": None,
        "surface": surface,
        "metric_kind": kind,
        "window_start": window[0],
        "window_end": window[1],
        "value_e4": None if value is None else e4(value),
        "currency": currency,
        "fetched_at": W1 + timedelta(hours=fetched),
        "created_at": W1 + timedelta(hours=fetched),
    }


def sources(*rows: dict[str, Any]) -> pl.LazyFrame:
    return pl.LazyFrame(list(rows), schema=SOURCES)


def aggregate(*rows: dict[str, Any], rules: Any = RULES) -> tuple[pl.DataFrame, pl.DataFrame]:
    latest = latest_per_surface(sources(*rows))
    aggs = aggregate_across_surfaces(latest, rules=rules)
    return (
        aggs.collect().sort("metric_kind"),
        surface_values(latest).collect().sort("metric_kind", "surface"),
    )


def test_latest_per_surface_keeps_the_newest_fetch() -> None:
    rows = sources(
        source("tryst", "profile_view", 100, fetched=0, n=1),
        source("tryst", "profile_view", 120, fetched=2, n=2),
        source("tryst", "profile_view", 110, fetched=1, n=3),
        source("x", "profile_view", 5, fetched=0, n=4),
    )

    result = latest_per_surface(rows).collect().sort("surface").select("surface", "value_e4")

    expected = pl.DataFrame({"surface": ["tryst", "x"], "value_e4": [e4(120), e4(5)]})
    assert_frame_equal(result, expected)


def test_latest_per_surface_breaks_a_fetched_at_tie_by_created_at_then_id() -> None:
    older = {**source("tryst", "profile_view", 1, n=9), "created_at": W0}
    newer = source("tryst", "profile_view", 2, n=1)
    same_time_bigger_id = {**source("tryst", "dm_inbound", 3, n=9)}
    same_time_smaller_id = {**source("tryst", "dm_inbound", 4, n=1)}

    result = (
        latest_per_surface(sources(older, newer, same_time_smaller_id, same_time_bigger_id))
        .collect()
        .sort("metric_kind")
    )

    assert result["value_e4"].to_list() == [e4(3), e4(2)]


def test_additive_kind_sums_across_two_surfaces_with_the_breakdown() -> None:
    aggs, parts = aggregate(
        source("tryst", "profile_view", 120), source("onlyfans", "profile_view", 30.5)
    )

    assert aggs.select(
        "value_e4", "currency", "surfaces_included", "surface_breakdown", "status"
    ).row(0) == (e4(150.5), None, ["onlyfans", "tryst"], '{"onlyfans": 30.5, "tryst": 120}', "ok")
    expected_parts = pl.DataFrame(
        {
            "user_id": [U1, U1],
            "metric_kind": ["profile_view"] * 2,
            "window_start": [W0, W0],
            "window_end": [W1, W1],
            "surface": ["onlyfans", "tryst"],
            "value_e4": [e4(30.5), e4(120)],
        },
        schema=PARTS,
    )
    assert_frame_equal(parts, expected_parts)


def test_only_the_newest_fetch_of_each_surface_is_summed() -> None:
    aggs, _ = aggregate(
        source("tryst", "profile_view", 100, fetched=0, n=1),
        source("tryst", "profile_view", 120, fetched=1, n=2),
        source("x", "profile_view", 10, n=3),
    )

    assert aggs["value_e4"].to_list() == [e4(130)]


def test_rate_kind_is_the_mean_of_the_surfaces_rounded_to_four_decimals() -> None:
    aggs, _ = aggregate(
        source("a", "reply_rate", 0.1),
        source("b", "reply_rate", 0.2),
        source("c", "reply_rate", 0.4),
    )

    assert aggs["value_e4"].to_list() == [2333]


def test_rate_mean_rounds_half_away_from_zero() -> None:
    aggs, _ = aggregate(source("a", "reply_rate", 0.0001), source("b", "reply_rate", 0.0002))

    assert aggs["value_e4"].to_list() == [2]


def test_rank_kind_takes_the_best_rank() -> None:
    aggs, parts = aggregate(source("a", "search_rank", 7), source("b", "search_rank", 3))

    assert aggs["value_e4"].to_list() == [e4(3)]
    assert parts["value_e4"].to_list() == [e4(7), e4(3)]


def test_aggregation_comes_from_the_rules_not_the_code() -> None:
    rules = replace(RULES, kinds=(KindRule("search_rank", "max"),))

    aggs, _ = aggregate(source("a", "search_rank", 7), source("b", "search_rank", 3), rules=rules)

    assert aggs["value_e4"].to_list() == [e4(7)]


def test_a_kind_missing_from_the_rules_is_not_aggregated() -> None:
    rules = replace(RULES, kinds=(KindRule("search_rank", "min"),))

    aggs, _ = aggregate(source("a", "profile_view", 7), rules=rules)

    assert aggs.select("value_e4", "surface_breakdown", "status").row(0) == (None, None, "no_rule")


def test_monetary_kind_in_one_currency_is_summed_with_its_currency() -> None:
    aggs, _ = aggregate(
        source("a", "tip_amount", 10.25, currency="USD"),
        source("b", "tip_amount", 5, currency="USD"),
    )

    assert aggs.select("value_e4", "currency", "status").row(0) == (e4(15.25), "USD", "ok")


def test_mixed_currencies_are_reported_and_not_summed() -> None:
    aggs, _ = aggregate(
        source("a", "gross_revenue", 10, currency="USD"),
        source("b", "gross_revenue", 5, currency="EUR"),
    )

    assert aggs.select("value_e4", "currency", "status").row(0) == (None, None, "mixed_currency")
    assert skipped(aggs.lazy()).collect()["currencies"].to_list() == [["EUR", "USD"]]
    assert aggs["surface_breakdown"].to_list() == [None]


def test_currency_is_ignored_for_non_monetary_kinds() -> None:
    aggs, _ = aggregate(
        source("a", "tip_count", 1, currency="USD"), source("b", "tip_count", 2, currency="EUR")
    )

    assert aggs.select("value_e4", "currency", "status").row(0) == (e4(3), None, "ok")


def test_text_only_values_do_not_contribute() -> None:
    aggs, _ = aggregate(source("a", "search_rank", None), source("b", "search_rank", 4))
    only_text, _ = aggregate(source("a", "search_rank", None))

    assert aggs.select("value_e4", "surfaces_included").row(0) == (e4(4), ["b"])
    assert only_text.select("value_e4", "status").row(0) == (None, "no_numeric_value")


def test_a_sum_beyond_numeric_18_4_is_out_of_range() -> None:
    aggs, _ = aggregate(
        source("a", "profile_view", 99_999_999_999_999), source("b", "profile_view", 1)
    )

    assert aggs["status"].to_list() == ["out_of_range"]


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (-timedelta(hours=3), timedelta(minutes=15)),
        (timedelta(0), timedelta(minutes=15)),
        (timedelta(hours=24), timedelta(minutes=15)),
        (timedelta(hours=24, microseconds=1), timedelta(hours=1)),
        (timedelta(days=7), timedelta(hours=1)),
        (timedelta(days=7, microseconds=1), timedelta(days=1)),
        (timedelta(days=90), timedelta(days=1)),
        (timedelta(days=90, microseconds=1), None),
        (timedelta(days=400), None),
    ],
)
def test_stale_after_follows_the_cadence_bands(age: timedelta, expected: timedelta | None) -> None:
    frame = pl.DataFrame({"window_end": [AS_OF - age]}, schema={"window_end": TS})

    result = frame.select(stale_after(pl.col("window_end"), as_of=AS_OF, rules=RULES)).item()

    assert result == (None if expected is None else AS_OF + expected)


def stored(
    kind: str, value: float, surfaces: dict[str, float]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    header = {
        "user_id": U1,
        "org_id": None,
        "metric_kind": kind,
        "window_start": W0,
        "window_end": W1,
        "value_e4": e4(value),
        "currency": None,
        "surfaces_included": sorted(surfaces),
    }
    parts = [
        {
            "user_id": U1,
            "metric_kind": kind,
            "window_start": W0,
            "window_end": W1,
            "surface": s,
            "value_e4": e4(v),
        }
        for s, v in surfaces.items()
    ]
    return header, parts


def plan(
    rows: list[dict[str, Any]], stored_rows: list[tuple[dict[str, Any], list[dict[str, Any]]]]
) -> pl.DataFrame:
    latest = latest_per_surface(sources(*rows))
    aggs = aggregate_across_surfaces(latest, rules=RULES)
    parts = surface_values(latest)
    headers = pl.LazyFrame([h for h, _ in stored_rows], schema=STORED)
    stored_parts = pl.LazyFrame([p for _, ps in stored_rows for p in ps], schema=STORED_PARTS)
    result = plan_rollup(aggs, parts, headers, stored_parts, as_of=AS_OF, rules=RULES)
    return result.collect().sort("metric_kind")


def test_plan_inserts_missing_and_recomputes_or_refreshes_due_aggregates() -> None:
    rows = [
        source("a", "profile_view", 10),
        source("b", "profile_view", 5),  # missing
        source("a", "dm_inbound", 3),
        source("b", "dm_inbound", 4),  # due, unchanged
        source("a", "tip_count", 2),
        source("b", "tip_count", 9),  # due, b advanced 1 -> 9
    ]
    due = [
        stored("dm_inbound", 7, {"a": 3, "b": 4}),
        stored("tip_count", 3, {"a": 2, "b": 1}),
        stored("click_through", 1, {"a": 1}),  # due, sources gone
    ]

    result = plan(rows, due)

    assert result.select("metric_kind", "outcome", "action").rows() == [
        ("click_through", "refreshed", "touch"),
        ("dm_inbound", "refreshed", "touch"),
        ("profile_view", "inserted", "write"),
        ("tip_count", "recomputed", "write"),
    ]
    assert result["stale_after"].to_list() == [AS_OF + timedelta(minutes=15)] * 4
    assert result["computed_at"].to_list() == [AS_OF] * 4


def test_plan_recomputes_when_only_the_total_differs() -> None:
    result = plan([source("a", "dm_inbound", 3)], [stored("dm_inbound", 4, {"a": 3})])

    assert result["outcome"].to_list() == ["recomputed"]


def test_plan_removes_a_stored_aggregate_whose_sources_now_mix_currencies() -> None:
    rows = [
        source("a", "net_revenue", 3, currency="USD"),
        source("b", "net_revenue", 4, currency="EUR"),
    ]

    result = plan(rows, [stored("net_revenue", 3, {"a": 3})])
    nothing = plan(rows, [])

    assert result.select("outcome", "action").rows() == [("removed", "delete")]
    assert nothing.is_empty()


def test_plan_marks_an_identical_refetch_as_refreshed_and_refetched() -> None:
    header, parts = stored("dm_inbound", 3, {"a": 3})
    header["computed_at"] = W1 + timedelta(hours=1)

    again = plan([source("a", "dm_inbound", 3, fetched=2)], [(header, parts)])
    unchanged = plan([source("a", "dm_inbound", 3, fetched=1)], [(header, parts)])

    assert again.select("outcome", "refetched").rows() == [("refreshed", True)]
    assert unchanged.select("outcome", "refetched").rows() == [("refreshed", False)]


def test_plan_marks_windows_older_than_90_days_final() -> None:
    old = (AS_OF - timedelta(days=100), AS_OF - timedelta(days=91))

    result = plan([source("a", "dm_inbound", 3, window=old)], [])

    assert result.select("final", "stale_after").row(0) == (True, None)


def test_rules_file_rejects_an_unknown_aggregate(tmp_path: Path) -> None:
    bad = tmp_path / "metrics.toml"
    bad.write_text(
        'version = "x"\n[kinds]\nprofile_view = { aggregate = "median" }\n'
        '[[cadence]]\nmax_age = "24h"\nrefresh_every = "15m"\n'
    )

    with pytest.raises(ConfigError, match=r"kinds\.profile_view\.aggregate"):
        load_metrics_rules(bad)


def test_rules_file_rejects_cadence_bands_out_of_order(tmp_path: Path) -> None:
    bad = tmp_path / "metrics.toml"
    bad.write_text(
        'version = "x"\n[kinds]\nprofile_view = { aggregate = "sum" }\n'
        '[[cadence]]\nmax_age = "7d"\nrefresh_every = "1h"\n'
        '[[cadence]]\nmax_age = "24h"\nrefresh_every = "15m"\n'
    )

    with pytest.raises(ConfigError, match=r"cadence\[1\]\.max_age"):
        load_metrics_rules(bad)


def test_rules_file_rejects_refresh_intervals_whose_ticks_do_not_nest(tmp_path: Path) -> None:
    bad = tmp_path / "metrics.toml"
    bad.write_text(
        'version = "x"\n[kinds]\nprofile_view = { aggregate = "sum" }\n'
        '[[cadence]]\nmax_age = "24h"\nrefresh_every = "15m"\n'
        '[[cadence]]\nmax_age = "7d"\nrefresh_every = "40m"\n'
    )

    with pytest.raises(ConfigError, match=r"cadence\[1\]\.refresh_every.*multiple.*15m"):
        load_metrics_rules(bad)


@pytest.mark.parametrize(
    ("value_e4", "text"),
    [(1_200_000, "120"), (1_234_500, "123.45"), (1, "0.0001"), (-25_000, "-2.5"), (0, "0")],
)
def test_decimal_text_is_exact_and_short(value_e4: int, text: str) -> None:
    result = pl.select(decimal_text(pl.lit(value_e4, pl.Int64))).item()

    assert result == text


def test_breakdown_json_escapes_surface_names_and_sorts_them() -> None:
    aggs, _ = aggregate(
        source('we"ird\\', "dm_inbound", 1.5),
        source("a", "dm_inbound", 1),
        source("B", "dm_inbound", -0.0001),
    )

    result = aggs["surface_breakdown"].item()

    assert json.loads(result) == {'we"ird\\': 1.5, "a": 1, "B": -0.0001}
    assert list(json.loads(result)) == ["B", "a", 'we"ird\\']


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["profile_view", "reply_rate", "search_rank", "tip_amount"]),
            st.integers(-5, 5),
            st.sampled_from(["USD", "EUR"]),
            st.integers(0, 3),
        ),
        max_size=12,
    )
)
def test_a_plan_against_its_own_result_writes_nothing(
    rows: list[tuple[str, str, int, str, int]],
) -> None:
    frame = sources(
        *[
            source(s, k, v, currency=c if k == "tip_amount" else None, fetched=f, n=i)
            for i, (s, k, v, c, f) in enumerate(rows)
        ]
    )
    latest = latest_per_surface(frame)
    aggs = aggregate_across_surfaces(latest, rules=RULES)
    parts = surface_values(latest)
    written = plan_rollup(
        aggs, parts, STORED.to_frame().lazy(), PARTS.to_frame().lazy(), as_of=AS_OF, rules=RULES
    ).collect()
    stored = written.select(list(STORED)).lazy()
    stored_parts = parts.join(stored.select(KEY), on=KEY, how="semi")

    again = plan_rollup(aggs, parts, stored, stored_parts, as_of=AS_OF, rules=RULES).collect()

    assert set(written["outcome"]) <= {"inserted"}
    assert set(again["outcome"]) <= {"refreshed"}
    assert again.height == written.height


@pytest.mark.parametrize(
    ("at", "every", "expected"),
    [
        (datetime(2026, 11, 22, 12, 0, tzinfo=UTC), timedelta(minutes=15), "2026-11-22T12:15"),
        (datetime(2026, 11, 22, 12, 14, 59, tzinfo=UTC), timedelta(minutes=15), "2026-11-22T12:15"),
        (datetime(2026, 11, 22, 12, 7, tzinfo=UTC), timedelta(hours=1), "2026-11-22T13:00"),
        (datetime(2026, 11, 22, 0, 0, tzinfo=UTC), timedelta(days=1), "2026-11-23T00:00"),
        (datetime(2026, 11, 22, 23, 59, tzinfo=UTC), timedelta(days=1), "2026-11-23T00:00"),
    ],
)
def test_next_tick_is_strictly_after_on_the_bands_utc_grid(
    at: datetime, every: timedelta, expected: str
) -> None:
    assert next_tick(at, every) == datetime.fromisoformat(expected + "+00:00")


@pytest.mark.parametrize(
    ("end_before_as_of", "expected"),
    [
        (timedelta(hours=24), "2026-11-22T12:15"),
        (timedelta(hours=24, seconds=1), "2026-11-22T13:00"),
        (timedelta(days=7), "2026-11-22T13:00"),
        (timedelta(days=7, seconds=1), "2026-11-23T00:00"),
        (timedelta(days=90), "2026-11-23T00:00"),
        # Older than 90 d at as_of, but not yet at the daily band's latest tick (midnight):
        # one more check at the next tick decides finality.
        (timedelta(days=90, hours=12), "2026-11-23T00:00"),
        (timedelta(days=90, hours=12, seconds=1), None),
    ],
)
def test_an_unchanged_aggregate_gets_the_next_tick_of_its_band(
    end_before_as_of: timedelta, expected: str | None
) -> None:
    frame = pl.DataFrame({"window_end": [AS_OF - end_before_as_of]})

    result = frame.select(checked_stale_after(pl.col("window_end"), as_of=AS_OF, rules=RULES))

    assert result.item() == (
        None if expected is None else datetime.fromisoformat(expected + "+00:00")
    )


def test_rollup_clock_thresholds_ascend_with_one_tick_per_band() -> None:
    band_from, band_next = rollup_clock(as_of=AS_OF, rules=RULES)

    assert band_from == sorted(band_from)
    assert len(band_from) == len(band_next) == len(RULES.cadence)


def test_due_window_end_is_the_youngest_bands_whose_tick_passed() -> None:
    band_from, band_next = rollup_clock(as_of=AS_OF, rules=RULES)  # ticks 00:00, 13:00, 12:15

    assert due_window_end(band_from, band_next, as_of=AS_OF) is None
    assert due_window_end(band_from, band_next, as_of=AS_OF + timedelta(minutes=15)) == band_from[2]
    assert due_window_end(band_from, band_next, as_of=AS_OF + timedelta(hours=1)) == band_from[1]
    assert due_window_end(band_from, band_next, as_of=AS_OF + timedelta(hours=12)) == band_from[0]
