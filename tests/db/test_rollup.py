"""``derive rollup`` against a real PostgreSQL: aggregation, cadence, idempotence, refresh, lock, RLS."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from derive.cli import app
from derive.errors import LockBusy
from derive.io.connect import connect
from derive.jobs.ingest_metrics import ingest_metrics
from derive.jobs.rollup import JOB, RollupResult, run_rollup
from derive.metrics_rules import load_metrics_rules
from tests.db.helpers import hold_lease

RULES = load_metrics_rules()
USER_A = "aaaaaaaa-0000-4000-8000-000000000001"
USER_B = "bbbbbbbb-0000-4000-8000-000000000002"
AS_OF = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
DAY_END = datetime(2026, 11, 22, tzinfo=UTC)  # window of the last day: ends 12 h before AS_OF


def row(
    kind: str, value: Any, *, end: datetime = DAY_END, days: int = 1, **extra: Any
) -> dict[str, Any]:
    return {
        "metric_kind": kind,
        "window_start": (end - timedelta(days=days)).isoformat(),
        "window_end": end.isoformat(),
        "value_numeric": value,
        **extra,
    }


def load(
    dsn: str,
    tmp_path: Path,
    surface: str,
    *rows: dict[str, Any],
    user: str = USER_A,
    fetched_at: datetime = AS_OF - timedelta(hours=1),
) -> None:
    path = tmp_path / f"{surface}-{fetched_at.timestamp()}-{user}.json"
    path.write_text(
        json.dumps(
            {
                "surface": surface,
                "rows": list(rows),
                "next_poll_after_ms": 900_000,
                "health_note": "ok",
            }
        )
    )
    with connect(dsn) as db:
        result = ingest_metrics(db, str(path), rules=RULES, user_id=user, fetched_at=fetched_at)
    assert result.rows_rejected == 0


def rollup(dsn: str, as_of: datetime = AS_OF) -> RollupResult:
    with connect(dsn) as db:
        return run_rollup(db, as_of=as_of, rules=RULES)


def aggregates(pg: psycopg.Connection) -> dict[str, tuple[Any, ...]]:
    rows = pg.execute(
        "SELECT metric_kind::text, value_numeric, currency, surfaces_included, surface_breakdown,"
        " computed_at, stale_after FROM metric_aggregates ORDER BY metric_kind"
    ).fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def versions(pg: psycopg.Connection) -> dict[str, str]:
    """metric_kind -> xmin of the stored row: changes whenever the row is rewritten."""
    return dict(
        pg.execute("SELECT metric_kind::text, xmin::text FROM metric_aggregate_rows").fetchall()
    )


def test_rollup_sums_two_surfaces_with_the_breakdown(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    load(dsn, tmp_path, "tryst", row("profile_view", 120), row("tip_amount", 10.5, currency="USD"))
    load(dsn, tmp_path, "onlyfans", row("profile_view", 30), row("tip_amount", 4, currency="USD"))

    result = rollup(dsn)

    assert aggregates(pg) == {
        "profile_view": (
            Decimal("150.0000"),
            None,
            ["onlyfans", "tryst"],
            {"onlyfans": 30, "tryst": 120},
            AS_OF,
            AS_OF + timedelta(minutes=15),
        ),
        "tip_amount": (
            Decimal("14.5000"),
            "USD",
            ["onlyfans", "tryst"],
            {"onlyfans": 4, "tryst": 10.5},
            AS_OF,
            AS_OF + timedelta(minutes=15),
        ),
    }
    assert result.counts["inserted"] == 2


def test_rate_and_rank_kinds_aggregate_as_the_rules_say(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    load(dsn, tmp_path, "a", row("reply_rate", 0.1), row("search_rank", 7, value_text="Top 10"))
    load(dsn, tmp_path, "b", row("reply_rate", 0.2), row("search_rank", 3))
    load(dsn, tmp_path, "c", row("reply_rate", 0.4))

    rollup(dsn)

    values = {k: v[0] for k, v in aggregates(pg).items()}
    assert values == {"reply_rate": Decimal("0.2333"), "search_rank": Decimal("3.0000")}


def test_mixed_currencies_are_reported_and_not_summed(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    load(dsn, tmp_path, "tryst", row("gross_revenue", 100, currency="USD"))
    load(dsn, tmp_path, "onlyfans", row("gross_revenue", 80, currency="EUR"))

    result = rollup(dsn)

    assert aggregates(pg) == {}
    assert result.counts["not_aggregated_mixed_currency"] == 1
    assert [(s["user_id"], s["status"], s["currencies"]) for s in result.skipped] == [
        (USER_A, "mixed_currency", ["EUR", "USD"]),
    ]


@pytest.mark.parametrize(
    ("end_before_as_of", "due_in"),
    [
        (timedelta(hours=24), timedelta(minutes=15)),
        (timedelta(hours=24, seconds=1), timedelta(hours=1)),
        (timedelta(days=7), timedelta(hours=1)),
        (timedelta(days=7, seconds=1), timedelta(days=1)),
        (timedelta(days=90), timedelta(days=1)),
    ],
)
def test_stale_after_follows_the_cadence_at_its_boundaries(
    dsn: str,
    pg: psycopg.Connection,
    tmp_path: Path,
    end_before_as_of: timedelta,
    due_in: timedelta,
) -> None:
    load(dsn, tmp_path, "tryst", row("dm_inbound", 4, end=AS_OF - end_before_as_of))

    rollup(dsn)

    assert aggregates(pg)["dm_inbound"][-1] == AS_OF + due_in


def test_windows_older_than_90_days_are_final_and_never_refreshed(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    load(dsn, tmp_path, "tryst", row("dm_inbound", 4, end=AS_OF - timedelta(days=90, seconds=1)))

    rollup(dsn)
    before = versions(pg)
    load(
        dsn,
        tmp_path,
        "tryst",
        row("dm_inbound", 9, end=AS_OF - timedelta(days=90, seconds=1)),
        fetched_at=AS_OF + timedelta(days=1),
    )
    later = rollup(dsn, AS_OF + timedelta(days=365))

    final = pg.execute("SELECT stale_after = 'infinity' FROM metric_aggregates").fetchone()
    assert final == (True,)
    assert versions(pg) == before
    assert later.counts["sources_read"] == 0


def test_a_second_rollup_at_the_same_as_of_rewrites_nothing(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    load(
        dsn,
        tmp_path,
        "tryst",
        row("profile_view", 120),
        row("dm_inbound", 3, end=AS_OF - timedelta(days=30)),
    )
    load(dsn, tmp_path, "x", row("profile_view", 5))
    rollup(dsn)
    before = versions(pg)

    second = rollup(dsn)

    assert versions(pg) == before
    assert second.counts["rows_written"] == second.counts["rows_removed"] == 0
    assert second.counts["sources_read"] == 0
    runs = pg.execute(
        "SELECT status, counts->>'inserted' FROM derivation_runs WHERE job = 'rollup'"
        " ORDER BY started_at"
    ).fetchall()
    assert runs == [("succeeded", "2"), ("succeeded", "0")]


def test_a_rollup_after_new_sources_refreshes_exactly_the_affected_aggregates(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    month_ago = AS_OF - timedelta(days=30)
    load(
        dsn,
        tmp_path,
        "tryst",
        row("profile_view", 120),
        row("dm_inbound", 3),
        row("dm_outbound", 1, end=month_ago),
    )
    load(dsn, tmp_path, "x", row("profile_view", 5), row("dm_inbound", 2))
    rollup(dsn)
    before = aggregates(pg)
    later = AS_OF + timedelta(hours=2)
    load(
        dsn,
        tmp_path,
        "x",
        row("profile_view", 9),
        row("dm_outbound", 6, end=month_ago),
        fetched_at=AS_OF + timedelta(hours=1),
    )

    result = rollup(dsn, later)

    after = aggregates(pg)
    assert after["profile_view"] == (
        Decimal("129.0000"),
        None,
        ["tryst", "x"],
        {"tryst": 120, "x": 9},
        later,
        later + timedelta(minutes=15),
    )
    assert after["dm_inbound"] == (*before["dm_inbound"][:-1], later + timedelta(minutes=15))
    assert after["dm_outbound"] == before["dm_outbound"]  # not due until a day after AS_OF
    assert (result.counts["recomputed"], result.counts["refreshed"], result.counts["inserted"]) == (
        1,
        1,
        0,
    )


def test_the_newest_fetch_wins_after_a_reingest(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    load(dsn, tmp_path, "tryst", row("profile_view", 100), fetched_at=AS_OF - timedelta(hours=2))
    load(dsn, tmp_path, "tryst", row("profile_view", 120), fetched_at=AS_OF - timedelta(hours=1))
    load(dsn, tmp_path, "tryst", row("profile_view", 999), fetched_at=AS_OF + timedelta(hours=1))

    result = rollup(dsn)

    assert aggregates(pg)["profile_view"][:2] == (Decimal("120.0000"), None)
    assert (result.counts["sources_read"], result.counts["sources_superseded"]) == (2, 1)


def test_an_overlapping_rollup_is_skipped(dsn: str, pg: psycopg.Connection) -> None:
    hold_lease(pg, JOB)

    with pytest.raises(LockBusy):
        rollup(dsn)

    statuses = pg.execute("SELECT status FROM derivation_runs ORDER BY started_at").fetchall()
    assert statuses == [("running",), ("skipped",)]


def test_tenant_sees_only_its_own_aggregates(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    load(dsn, tmp_path, "tryst", row("profile_view", 1), user=USER_A)
    load(dsn, tmp_path, "tryst", row("profile_view", 2), row("dm_inbound", 1), user=USER_B)
    rollup(dsn)

    with pg.transaction():
        pg.execute("SET LOCAL ROLE authenticated")
        pg.execute("SELECT set_config('app.user_id', %s, true)", (USER_A,))
        seen = pg.execute(
            "SELECT user_id::text, count(*) FROM metric_aggregates GROUP BY 1"
        ).fetchall()
        metrics = pg.execute("SELECT DISTINCT user_id::text FROM surface_metrics").fetchall()

    assert seen == [(USER_A, 1)]
    assert metrics == [(USER_A,)]


def test_cli_rollup_prints_json_counts(dsn: str, tmp_path: Path) -> None:
    load(dsn, tmp_path, "tryst", row("profile_view", 1))

    result = CliRunner().invoke(
        app, ["rollup", "--as-of", AS_OF.isoformat(), "--dsn", dsn, "--json"]
    )

    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"]["inserted"] == 1


def test_a_key_whose_sources_become_mixed_currency_loses_its_aggregate(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    load(dsn, tmp_path, "tryst", row("gross_revenue", 6681.05, currency="USD"))
    load(dsn, tmp_path, "x", row("gross_revenue", 100, currency="USD"))
    rollup(dsn)
    later = AS_OF + timedelta(hours=2)
    load(dsn, tmp_path, "x", row("gross_revenue", 90, currency="EUR"), fetched_at=later)

    result = rollup(dsn, later)

    assert aggregates(pg) == {}
    assert (result.counts["removed"], result.counts["rows_removed"]) == (1, 1)
    assert result.counts["not_aggregated_mixed_currency"] == 1
    assert [s["currencies"] for s in result.skipped] == [["EUR", "USD"]]


def ingest_file(dsn: str, path: Path, objects: list[dict[str, Any]]) -> None:
    path.write_text("\n".join(json.dumps(o) for o in objects))
    with connect(dsn) as db:
        ingest_metrics(
            db, str(path), rules=RULES, user_id=USER_A, fetched_at=AS_OF - timedelta(hours=1)
        )


@pytest.mark.parametrize("order", [(1, 2, 3, 4, 5, 6), (6, 5, 4, 3, 2, 1), (3, 1, 6, 2, 5, 4)])
def test_a_fetched_at_tie_in_one_file_goes_to_the_later_object(
    dsn: str, pg: psycopg.Connection, tmp_path: Path, order: tuple[int, ...]
) -> None:
    objects = [
        {
            "surface": "tryst",
            "rows": [row("profile_view", value)],
            "next_poll_after_ms": 0,
            "health_note": "ok",
        }
        for value in order
    ]
    ingest_file(dsn, tmp_path / "tie.jsonl", objects)

    rollup(dsn)

    # The ids follow the file (a random id would put them in file order once in 720 draws).
    by_id = pg.execute("SELECT value_numeric FROM surface_metrics ORDER BY id").fetchall()
    assert [int(v) for (v,) in by_id] == list(order)
    assert aggregates(pg)["profile_view"][0] == Decimal(order[-1])


def test_an_identical_refetch_is_counted_as_refreshed_and_refetched(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    load(dsn, tmp_path, "tryst", row("profile_view", 120))
    rollup(dsn)
    later = AS_OF + timedelta(hours=2)
    load(dsn, tmp_path, "tryst", row("profile_view", 120), fetched_at=AS_OF + timedelta(hours=1))

    result = rollup(dsn, later)

    assert (result.counts["refreshed"], result.counts["refreshed_refetched_identical"]) == (1, 1)
    assert result.counts["recomputed"] == 0


def test_steady_state_reads_no_source_rows(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    load(dsn, tmp_path, "tryst", row("profile_view", 120), row("gross_revenue", 5, currency="USD"))
    load(dsn, tmp_path, "x", row("gross_revenue", 5, currency="EUR"))  # never aggregated
    first = rollup(dsn)

    second = rollup(dsn)

    assert (first.counts["mode"], second.counts["mode"]) == ("full", "incremental")
    assert (second.counts["sources_read"], second.counts["aggregates_read"]) == (0, 0)


def test_rows_of_a_transaction_open_during_the_base_read_are_not_lost(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    load(dsn, tmp_path, "tryst", row("profile_view", 120))
    with psycopg.connect(dsn) as open_tx:
        # Inserted (and its xid taken) before the base rollup reads, committed after it: a cursor
        # on created_at or on a sequence would have moved past this row.
        open_tx.execute(
            "INSERT INTO surface_metrics (user_id, surface, metric_kind, window_start, window_end,"
            " value_numeric, source, fetched_at) VALUES (%s, 'x', 'profile_view', %s, %s, 5,"
            " 'manual', %s)",
            (USER_A, DAY_END - timedelta(days=1), DAY_END, AS_OF - timedelta(hours=3)),
        )
        rollup(dsn)
        open_tx.commit()
    assert aggregates(pg)["profile_view"][0] == Decimal(120)
    later = AS_OF + timedelta(hours=1)

    result = rollup(dsn, later)

    assert result.counts["mode"] == "incremental"
    assert aggregates(pg)["profile_view"][:3] == (Decimal(125), None, ["tryst", "x"])


def test_a_fresh_aggregate_keeps_its_new_sources_pending_until_due(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    month_ago = AS_OF - timedelta(days=30)
    load(dsn, tmp_path, "tryst", row("dm_outbound", 1, end=month_ago))
    rollup(dsn)  # due again a day later
    load(
        dsn,
        tmp_path,
        "x",
        row("dm_outbound", 6, end=month_ago),
        fetched_at=AS_OF + timedelta(hours=1),
    )

    early = rollup(dsn, AS_OF + timedelta(hours=2))
    due = rollup(dsn, AS_OF + timedelta(days=1, hours=1))

    assert (early.counts["recomputed"], early.counts["pending"]) == (0, 1)
    assert (due.counts["recomputed"], due.counts["pending"]) == (1, 0)
    assert aggregates(pg)["dm_outbound"][0] == Decimal(7)


def test_incremental_runs_end_where_a_full_run_does(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    steps = [
        ("tryst", [row("profile_view", 1), row("tip_amount", 2, currency="USD")], 0),
        ("x", [row("profile_view", 4), row("tip_amount", 3, currency="EUR")], 1),
        ("x", [row("tip_amount", 3, currency="USD"), row("dm_inbound", 9)], 30),
        ("tryst", [row("profile_view", 8, end=AS_OF - timedelta(days=40))], 90),
    ]
    t = AS_OF
    for surface, rows, minutes in steps:
        t = AS_OF + timedelta(minutes=minutes)
        load(dsn, tmp_path, surface, *rows, fetched_at=t - timedelta(minutes=1))
        rollup(dsn, t)
    incremental = {k: v[:5] for k, v in aggregates(pg).items()}

    with connect(dsn) as db:
        full = run_rollup(db, as_of=t, rules=RULES, full=True)

    assert full.counts["mode"] == "full"
    assert {k: v[:5] for k, v in aggregates(pg).items()} == incremental
    assert full.counts["rows_written"] == 0


def test_deleting_a_user_removes_its_aggregates(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    load(dsn, tmp_path, "tryst", row("profile_view", 1))
    load(dsn, tmp_path, "tryst", row("profile_view", 2), user=USER_B)
    rollup(dsn)

    pg.execute("DELETE FROM users WHERE id = %s", (USER_A,))

    owners = pg.execute("SELECT user_id::text FROM metric_aggregates").fetchall()
    assert owners == [(USER_B,)]


def stale_afters(pg: psycopg.Connection) -> dict[str, datetime]:
    return dict(
        pg.execute("SELECT metric_kind::text, stale_after FROM metric_aggregates").fetchall()
    )


def test_an_unchanged_due_aggregate_is_not_rewritten_and_shows_its_bands_next_tick(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    month_ago = AS_OF - timedelta(days=30)  # daily band: due a day after AS_OF (12:00)
    load(dsn, tmp_path, "tryst", row("dm_outbound", 1, end=month_ago), row("profile_view", 3))
    rollup(dsn)
    before = versions(pg)
    later = AS_OF + timedelta(days=1, hours=3)  # 15:00 the next day: both due, nothing new

    result = rollup(dsn, later)

    assert versions(pg) == before
    assert stale_afters(pg) == {
        "dm_outbound": datetime(2026, 11, 24, tzinfo=UTC),  # next midnight UTC
        "profile_view": later + timedelta(hours=1),  # the window is now 2 days old: hourly
    }
    assert (result.counts["refreshed"], result.counts["rows_written"]) == (2, 0)
    assert result.counts["aggregates_read"] == 0


def test_an_aggregate_not_due_keeps_its_stale_after_while_the_clock_advances(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    load(dsn, tmp_path, "tryst", row("dm_outbound", 1, end=AS_OF - timedelta(days=30)))
    rollup(dsn)
    first = stale_afters(pg)

    for minutes in (15, 30, 45, 23 * 60 + 59):
        rollup(dsn, AS_OF + timedelta(minutes=minutes))
        assert stale_afters(pg) == first == {"dm_outbound": AS_OF + timedelta(days=1)}


def test_a_window_becomes_final_only_when_a_rollup_was_due_to_look_at_it(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    end = AS_OF - timedelta(days=89, hours=13)  # 89.5 days old: due again in a day
    load(dsn, tmp_path, "tryst", row("dm_outbound", 1, end=end))
    rollup(dsn)
    load(dsn, tmp_path, "x", row("dm_outbound", 6, end=end), fetched_at=AS_OF + timedelta(hours=1))

    early = rollup(dsn, AS_OF + timedelta(hours=13))  # 90.05 days old, not due yet
    assert stale_afters(pg) == {"dm_outbound": AS_OF + timedelta(days=1)}
    due = rollup(dsn, AS_OF + timedelta(days=1, hours=1))

    assert (early.counts["pending"], due.counts["recomputed"], due.counts["final"]) == (1, 1, 1)
    final = pg.execute(
        "SELECT value_numeric, stale_after = 'infinity' FROM metric_aggregates"
    ).fetchone()
    assert final == (Decimal(7), True)


def _reset_rollup(pg: psycopg.Connection) -> None:
    pg.execute("TRUNCATE surface_metrics, metric_aggregate_rows, rollup_pending, rollup_clock")
    pg.execute("DELETE FROM derivation_runs WHERE job = 'rollup'")


def _contents(pg: psycopg.Connection) -> list[tuple[Any, ...]]:
    return pg.execute(
        "SELECT user_id::text, metric_kind::text, window_start, window_end, value_numeric,"
        " currency, surfaces_included, surface_breakdown FROM metric_aggregates ORDER BY 1, 2, 3, 4"
    ).fetchall()


_steps = st.lists(
    st.tuples(
        st.sampled_from(["tryst", "x", "onlyfans"]),
        st.sampled_from(["profile_view", "gross_revenue", "reply_rate"]),
        st.integers(0, 5),  # value
        st.sampled_from(["USD", "USD", "EUR"]),
        st.sampled_from([0, 1, 3, 9]),  # window end, days before AS_OF
        st.sampled_from([5, 20, 70, 60 * 26]),  # minutes after the previous step
    ),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=_steps)
def test_incremental_rollups_end_where_a_rollup_from_scratch_does(
    dsn: str, second_dsn: str, tmp_path_factory: pytest.TempPathFactory, steps: list[Any]
) -> None:
    tmp_path = tmp_path_factory.mktemp("steps")
    with (
        psycopg.connect(dsn, autocommit=True) as a,
        psycopg.connect(second_dsn, autocommit=True) as b,
    ):
        _reset_rollup(a)
        _reset_rollup(b)
        t = AS_OF
        for surface, kind, value, currency, days, minutes in steps:
            t += timedelta(minutes=minutes)
            extra = {"currency": currency} if kind == "gross_revenue" else {}
            value_numeric = value / 10 if kind == "reply_rate" else value
            source = row(kind, value_numeric, end=DAY_END - timedelta(days=days), **extra)
            for target in (dsn, second_dsn):
                load(target, tmp_path, surface, source, fetched_at=t - timedelta(minutes=1))
            rollup(dsn, t)  # incremental after the first
        end = t + timedelta(days=2)  # every aggregate is due again (no band is slower than 1 d)

        rollup(dsn, end)
        with connect(second_dsn) as db:
            run_rollup(db, as_of=end, rules=RULES, full=True)

        assert _contents(a) == _contents(b)
        shown_stale = a.execute(
            "SELECT count(*) FROM metric_aggregates WHERE stale_after <= %s", (end,)
        ).fetchone()
        assert shown_stale == (0,)
