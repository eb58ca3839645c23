"""Attribution models: worked examples at each rule's boundary, plus property tests."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from derive.schema import MODELS, STORED_CREDITS, TOUCHPOINTS, VALUE
from derive.transforms.attribution import attribute, diff_credits, surface_summary

CONVERTED_AT = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
DAY = timedelta(days=1)
US = timedelta(microseconds=1)
WINDOW = timedelta(days=30)
HALF_LIFE = timedelta(days=7)


def tid(n: int) -> bytes:
    """16-byte uuid of touchpoint ``n`` (byte order follows ``n``)."""
    return uuid.UUID(int=0xA000 + n).bytes


def user(n: int) -> bytes:
    return uuid.UUID(int=0xB000 + n).bytes


def prospect(n: int) -> bytes:
    return uuid.UUID(int=0xC000 + n).bytes


def tp(
    n: int,
    *,
    surface: str = "tryst",
    at: datetime = CONVERTED_AT,
    kind: str = "dm_inbound",
    amount: str | None = None,
    currency: str | None = None,
    user_n: int = 1,
    prospect_n: int | None = 1,
) -> dict[str, Any]:
    return {
        "id": tid(n),
        "user_id": user(user_n),
        "org_id": None,
        "prospect_id": None if prospect_n is None else prospect(prospect_n),
        "surface": surface,
        "touchpoint": kind,
        "occurred_at": at,
        "amount": amount,
        "currency": currency,
    }


def conversion(n: int, **fields: Any) -> dict[str, Any]:
    fields = {"kind": "tip", "amount": "100", "currency": "USD", **fields}
    return tp(n, **fields)


def run(
    rows: list[dict[str, Any]],
    *,
    models: tuple[str, ...] = MODELS,
    window: timedelta = WINDOW,
    half_life: timedelta = HALF_LIFE,
    **options: Any,
) -> pl.DataFrame:
    frame = pl.LazyFrame(rows, schema=TOUCHPOINTS)
    return attribute(frame, models=models, window=window, half_life=half_life, **options).collect()


def credits_of(result: pl.DataFrame, model: str, conversion_n: int = 0) -> list[tuple[Any, ...]]:
    """(touchpoint n or None, surface, weight) of one conversion under one model, oldest first."""
    rows = result.filter(pl.col("model") == model, pl.col("conversion_id") == tid(conversion_n))
    out = [
        (None if t is None else uuid.UUID(bytes=t).int - 0xA000, s, w)
        for t, s, w in rows.select("touchpoint_id", "surface", "weight").iter_rows()
    ]
    return sorted(out, key=lambda r: -1 if r[0] is None else r[0])


def chain(n: int) -> list[dict[str, Any]]:
    """``n`` touches, touch k (1-based) 5 * (n - k + 1) days before conversion 0, on surface sk."""
    touches = [
        tp(k, surface=f"s{k}", at=CONVERTED_AT - 5 * (n - k + 1) * DAY) for k in range(1, n + 1)
    ]
    return [*touches, conversion(0, surface="own")]


@pytest.mark.parametrize(
    ("model", "n", "expected"),
    [
        ("first_touch", 1, [1.0]),
        ("first_touch", 2, [1.0]),
        ("first_touch", 3, [1.0]),
        ("first_touch", 5, [1.0]),
        ("last_touch", 1, [1.0]),
        ("last_touch", 2, [1.0]),
        ("last_touch", 3, [1.0]),
        ("last_touch", 5, [1.0]),
        ("linear", 1, [1.0]),
        ("linear", 2, [0.5, 0.5]),
        ("linear", 3, [1 / 3, 1 / 3, 1 / 3]),
        ("linear", 5, [0.2] * 5),
        ("position_based", 1, [1.0]),
        ("position_based", 2, [0.5, 0.5]),
        ("position_based", 3, [0.4, 0.2, 0.4]),
        ("position_based", 5, [0.4, 0.2 / 3, 0.2 / 3, 0.2 / 3, 0.4]),
        # ages 5, 10, 15 ... days with a 5-day half-life: raw weights 1/2, 1/4, 1/8 ...
        ("time_decay", 1, [1.0]),
        ("time_decay", 2, [1 / 3, 2 / 3]),
        ("time_decay", 3, [1 / 7, 2 / 7, 4 / 7]),
        ("time_decay", 5, [1 / 31, 2 / 31, 4 / 31, 8 / 31, 16 / 31]),
    ],
)
def test_model_weights_worked_examples(model: str, n: int, expected: list[float]) -> None:
    result = run(chain(n), models=(model,), half_life=5 * DAY)

    credited = credits_of(result, model)

    if model == "first_touch":
        assert [(t, s) for t, s, _ in credited] == [(1, "s1")]
    elif model == "last_touch":
        assert [(t, s) for t, s, _ in credited] == [(n, f"s{n}")]
    else:
        assert [t for t, _, _ in credited] == list(range(1, n + 1))
    assert [w for _, _, w in credited] == pytest.approx(expected, rel=1e-12, abs=0)


def test_time_decay_is_continuous_not_bucketed_by_day() -> None:
    # 12 h and 36 h old: day buckets would give ages 0 and 1 day; the model uses exact hours.
    rows = [
        tp(1, surface="a", at=CONVERTED_AT - timedelta(hours=36)),
        tp(2, surface="b", at=CONVERTED_AT - timedelta(hours=12)),
        conversion(0),
    ]

    credited = credits_of(run(rows, models=("time_decay",)), "time_decay")

    raw = [2 ** (-1.5 / 7), 2 ** (-0.5 / 7)]
    assert [w for _, _, w in credited] == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)


def test_time_decay_follows_the_half_life_option() -> None:
    rows = [tp(1, at=CONVERTED_AT - 2 * DAY), tp(2, at=CONVERTED_AT - DAY), conversion(0)]

    credited = credits_of(run(rows, models=("time_decay",), half_life=DAY), "time_decay")

    assert [w for _, _, w in credited] == pytest.approx([1 / 3, 2 / 3], rel=1e-12)


def test_time_decay_short_half_life_over_a_long_window_does_not_underflow() -> None:
    rows = [tp(1, at=CONVERTED_AT - 29 * DAY), tp(2, at=CONVERTED_AT - DAY), conversion(0)]

    credited = credits_of(
        run(rows, models=("time_decay",), half_life=timedelta(seconds=1)), "time_decay"
    )

    assert credited == [(2, "tryst", 1.0)]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("first_touch", [(2, 1.0)]),
        ("last_touch", [(1, 1.0)]),
        ("position_based", [(1, 0.4), (2, 0.4), (3, 0.2)]),
    ],
)
def test_ties_in_occurred_at_are_ordered_by_id(
    model: str, expected: list[tuple[int, float]]
) -> None:
    # Sequence by (occurred_at, id): 2 and 3 share an instant (2 first), 1 is the latest.
    rows = [
        conversion(0),
        tp(1, at=CONVERTED_AT - DAY),
        tp(3, at=CONVERTED_AT - 2 * DAY),
        tp(2, at=CONVERTED_AT - 2 * DAY),
    ]

    credited = credits_of(run(rows, models=(model,)), model)

    assert [(t, w) for t, _, w in credited] == expected


def test_ties_at_one_instant_put_the_lower_id_first_and_the_higher_last() -> None:
    at = CONVERTED_AT - DAY
    rows = [conversion(0), tp(7, surface="b", at=at), tp(4, surface="a", at=at)]

    result = run(rows, models=("first_touch", "last_touch"))

    assert credits_of(result, "first_touch") == [(4, "a", 1.0)]
    assert credits_of(result, "last_touch") == [(7, "b", 1.0)]


def test_touch_exactly_at_the_window_start_is_in_and_just_before_is_out() -> None:
    rows = [
        tp(1, surface="out", at=CONVERTED_AT - WINDOW - US),
        tp(2, surface="edge", at=CONVERTED_AT - WINDOW),
        conversion(0),
    ]

    credited = credits_of(run(rows, models=("linear",)), "linear")

    assert credited == [(2, "edge", 1.0)]


def test_touch_at_the_conversion_instant_is_not_prior() -> None:
    rows = [tp(1, surface="same-instant", at=CONVERTED_AT), conversion(0, surface="own")]

    credited = credits_of(run(rows, models=("linear",)), "linear")

    assert credited == [(None, "own", 1.0)]


@pytest.mark.parametrize("model", MODELS)
def test_no_prior_touch_gives_full_credit_to_the_own_surface(model: str) -> None:
    rows = [conversion(0, surface="onlyfans", amount="25.50", currency="EUR")]

    result = run(rows, models=(model,))

    expected = pl.DataFrame(
        {
            "touchpoint_id": [None],
            "surface": ["onlyfans"],
            "weight": [1.0],
            "attributed_value": [Decimal("25.5")],
            "currency": ["EUR"],
        },
        schema={
            "touchpoint_id": pl.Binary,
            "surface": pl.String,
            "weight": pl.Float64,
            "attributed_value": VALUE,
            "currency": pl.String,
        },
    )
    assert_frame_equal(result.select(expected.columns), expected)


@pytest.mark.parametrize("kind", ["block", "unblock", "subscription_cancel"])
def test_block_unblock_and_cancel_are_never_credited(kind: str) -> None:
    rows = [
        tp(1, surface="x", at=CONVERTED_AT - 2 * DAY, kind=kind),
        tp(2, surface="y", at=CONVERTED_AT - DAY),
        conversion(0, surface="own"),
    ]

    result = run(rows)

    assert result["touchpoint_id"].to_list().count(tid(1)) == 0
    assert credits_of(result, "linear") == [(2, "y", 1.0)]


def test_only_never_credited_touches_fall_back_to_the_own_surface() -> None:
    rows = [tp(1, surface="x", at=CONVERTED_AT - DAY, kind="block"), conversion(0, surface="own")]

    assert credits_of(run(rows, models=("last_touch",)), "last_touch") == [(None, "own", 1.0)]


def test_a_prior_conversion_is_a_touch_on_its_surface() -> None:
    rows = [
        conversion(1, surface="tryst", at=CONVERTED_AT - 3 * DAY, kind="tip"),
        conversion(0, surface="x", kind="booking_confirmed"),
    ]

    result = run(rows, models=("last_touch",))

    assert credits_of(result, "last_touch", 0) == [(1, "tryst", 1.0)]
    assert credits_of(result, "last_touch", 1) == [(None, "tryst", 1.0)]


def test_two_conversions_at_one_instant_do_not_credit_each_other() -> None:
    rows = [conversion(1, surface="a"), conversion(0, surface="b")]

    result = run(rows, models=("linear",))

    assert credits_of(result, "linear", 0) == [(None, "b", 1.0)]
    assert credits_of(result, "linear", 1) == [(None, "a", 1.0)]


def test_anonymous_touchpoints_never_enter_per_prospect_attribution() -> None:
    rows = [
        tp(1, surface="anon", at=CONVERTED_AT - DAY, prospect_n=None),
        conversion(2, surface="anon", prospect_n=None),
        conversion(0, surface="own"),
    ]

    result = run(rows)

    assert result["conversion_id"].unique().to_list() == [tid(0)]
    assert result["touchpoint_id"].drop_nulls().to_list() == []


def test_touches_of_another_prospect_or_user_are_not_credited() -> None:
    rows = [
        tp(1, at=CONVERTED_AT - DAY, prospect_n=2),
        tp(2, at=CONVERTED_AT - DAY, user_n=2),
        tp(3, surface="mine", at=CONVERTED_AT - DAY),
        conversion(0),
    ]

    assert credits_of(run(rows, models=("linear",)), "linear") == [(3, "mine", 1.0)]


def test_since_and_as_of_select_conversions_but_older_touches_still_count() -> None:
    since = CONVERTED_AT - DAY
    rows = [
        tp(1, surface="early", at=CONVERTED_AT - 5 * DAY),
        conversion(2, at=CONVERTED_AT - 2 * DAY),
        conversion(0),
        conversion(3, at=CONVERTED_AT + DAY),
    ]

    result = run(rows, models=("first_touch",), since=since, as_of=CONVERTED_AT)

    assert result["conversion_id"].unique().to_list() == [tid(0)]
    assert credits_of(result, "first_touch") == [(1, "early", 1.0)]


def test_credited_values_sum_exactly_to_the_conversion_value() -> None:
    rows = [*chain(3)[:-1], conversion(0, amount="10", currency="USD")]

    result = run(rows, models=("linear",))

    values = result.sort("touchpoint_id")["attributed_value"].to_list()
    assert values == [Decimal("3.333333333"), Decimal("3.333333333"), Decimal("3.333333334")]
    assert sum(values) == Decimal("10")
    assert result["currency"].unique().to_list() == ["USD"]


def test_a_conversion_without_amount_is_worth_zero() -> None:
    rows = [tp(1, at=CONVERTED_AT - DAY), conversion(0, amount=None, currency=None)]

    result = run(rows, models=("linear",))

    assert result["attributed_value"].to_list() == [Decimal(0)]


def test_unknown_model_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown attribution models"):
        run([conversion(0)], models=("u_shaped",))


def test_surface_summary_sums_per_model_surface_and_currency() -> None:
    rows = [
        tp(1, surface="a", at=CONVERTED_AT - 2 * DAY),
        tp(2, surface="b", at=CONVERTED_AT - DAY),
        conversion(0, amount="30"),
        conversion(3, surface="c", amount="5", currency="EUR", prospect_n=2),
    ]

    result = surface_summary(run(rows, models=("linear",)).lazy()).collect()

    expected = pl.DataFrame(
        {
            "model": ["linear", "linear", "linear"],
            "surface": ["a", "b", "c"],
            "currency": ["USD", "USD", "EUR"],
            "conversions": [1, 1, 1],
            "credits": [1, 1, 1],
            "attributed_value": [Decimal(15), Decimal(15), Decimal(5)],
        },
        schema={
            "model": pl.String,
            "surface": pl.String,
            "currency": pl.String,
            "conversions": pl.UInt32,
            "credits": pl.UInt32,
            "attributed_value": VALUE,
        },
    )
    assert_frame_equal(result, expected)


# -- properties --------------------------------------------------------------------------------------

KINDS = (
    "dm_inbound",
    "reply",
    "profile_view",
    "tip",
    "subscription_new",
    "block",
    "unblock",
    "booking_completed",
)


@st.composite
def touchpoint_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(min_value=1, max_value=25))
    offsets = st.sampled_from([0, 1, 3600, 86400, 7 * 86400, 30 * 86400]) | st.integers(
        min_value=0, max_value=45 * 86400
    )
    rows = []
    for i in range(n):
        cents = draw(st.none() | st.integers(min_value=0, max_value=10**9))
        rows.append(
            tp(
                i,
                surface=draw(st.sampled_from(["a", "b", "c"])),
                at=CONVERTED_AT - timedelta(seconds=draw(offsets)),
                kind=draw(st.sampled_from(KINDS)),
                amount=None if cents is None else str(Decimal(cents) / 100),
                currency="USD",
                prospect_n=draw(st.sampled_from([1, 2, None])),
            )
        )
    return rows


@settings(max_examples=150, deadline=None)
@given(rows=touchpoint_sets())
def test_property_weights_sum_to_one_and_values_to_the_conversion_value(
    rows: list[dict[str, Any]],
) -> None:
    result = run(rows)

    conversions = pl.DataFrame(rows, schema=TOUCHPOINTS).filter(
        pl.col("touchpoint").is_in(["tip", "subscription_new", "booking_completed"]),
        pl.col("prospect_id").is_not_null(),
    )
    totals = result.group_by("conversion_id", "model").agg(
        pl.col("weight").sum(), pl.col("attributed_value").sum()
    )
    assert totals.height == conversions.height * len(MODELS)
    assert all(abs(w - 1.0) <= 1e-9 for w in totals["weight"])
    expected_value = {r["id"]: Decimal(r["amount"] or 0) for r in conversions.iter_rows(named=True)}
    for conversion_id, _, _, value in totals.iter_rows():
        assert value == expected_value[conversion_id]
    assert (result["weight"] > 0).all()


@settings(max_examples=100, deadline=None)
@given(rows=touchpoint_sets(), data=st.data())
def test_property_results_do_not_depend_on_row_order(
    rows: list[dict[str, Any]], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(rows))
    key = ["conversion_id", "model", "touchpoint_id"]

    result = run(shuffled).sort(key, nulls_last=True)

    expected = run(rows).sort(key, nulls_last=True)
    assert_frame_equal(result, expected, check_exact=True)


def test_time_decay_matches_the_formula_for_arbitrary_ages() -> None:
    ages = [0.25, 1.75, 9.5, 29.999]
    rows = [
        *[tp(k, at=CONVERTED_AT - timedelta(days=a)) for k, a in enumerate(ages, start=1)],
        conversion(0),
    ]

    credited = credits_of(run(rows, models=("time_decay",)), "time_decay")

    raw = [math.pow(2, -a / 7) for a in ages]
    assert [w for _, _, w in credited] == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)


# -- diff against stored credits ---------------------------------------------------------------------


def stored_from(computed: pl.DataFrame) -> pl.DataFrame:
    ids = [uuid.UUID(int=0xF000 + i).bytes for i in range(computed.height)]
    return computed.with_columns(id=pl.Series(ids, dtype=pl.Binary)).select(STORED_CREDITS.names())


def test_diff_of_unchanged_credits_is_empty() -> None:
    computed = run([tp(1, at=CONVERTED_AT - DAY), conversion(0), conversion(2, prospect_n=2)])

    inserts, updates, deletes = (
        part.collect() for part in diff_credits(computed.lazy(), stored_from(computed).lazy())
    )

    assert (inserts.height, updates.height, deletes.height) == (0, 0, 0)


def test_diff_inserts_updates_and_deletes_by_key_with_null_touchpoint() -> None:
    before = run([tp(1, at=CONVERTED_AT - DAY), conversion(0)], models=("linear",))
    after = run(
        [
            tp(1, at=CONVERTED_AT - DAY),
            tp(2, at=CONVERTED_AT - 2 * DAY),
            conversion(0),
            conversion(3, prospect_n=2),
        ],
        models=("linear",),
    )
    stored = stored_from(before)

    inserts, updates, deletes = (
        part.collect() for part in diff_credits(after.lazy(), stored.lazy())
    )

    # touch 2 and conversion 3's own-surface credit are new; touch 1 drops from 1.0 to 0.5
    assert sorted(inserts["touchpoint_id"].to_list(), key=lambda b: b or b"") == [None, tid(2)]
    assert updates.select("id", "touchpoint_id", "weight").rows() == [
        (stored["id"][0], tid(1), 0.5)
    ]
    assert deletes.height == 0


def test_diff_deletes_credits_no_longer_computed() -> None:
    before = run([tp(1, at=CONVERTED_AT - DAY), conversion(0)], models=("linear",))
    after = run([conversion(0)], models=("linear",))
    stored = stored_from(before)

    inserts, updates, deletes = (
        part.collect() for part in diff_credits(after.lazy(), stored.lazy())
    )

    assert inserts.select("touchpoint_id", "surface").rows() == [(None, "tryst")]
    assert updates.height == 0
    assert deletes["id"].to_list() == stored["id"].to_list()


def test_diff_sees_a_changed_window_as_an_update() -> None:
    before = run([tp(1, at=CONVERTED_AT - DAY), conversion(0)], models=("time_decay",))
    after = run(
        [tp(1, at=CONVERTED_AT - DAY), conversion(0)], models=("time_decay",), window=10 * DAY
    )

    _, updates, _ = (
        part.collect() for part in diff_credits(after.lazy(), stored_from(before).lazy())
    )

    assert updates.select("window_days", "half_life_days").rows() == [(10.0, 7.0)]
