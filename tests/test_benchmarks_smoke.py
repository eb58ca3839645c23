"""Smoke tests of the benchmark harness pieces on a tiny dataset (timed runs: benchmarks/)."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg

from benchmarks import harness, report
from benchmarks.harness import Agreement, Figure, ScaleResult

AS_OF = datetime(2026, 6, 1, tzinfo=UTC)
CLIMBER = "11111111-1111-1111-1111-111111111111"
IDLE_VIEWER = "22222222-2222-2222-2222-222222222222"
DOUBLE_SCROLLER = "33333333-3333-3333-3333-333333333333"
LAPSED = "44444444-4444-4444-4444-444444444444"

# (created_at, user_id, session_id, event_type, event_category, metadata)
EVENTS = [
    # S0 -> S1 (deep_7d) -> S2 (repeat) -> S3 (consented subscribe) -> S4 (advocacy); 2+3+6+5 = 16
    ("2026-05-30T12:00:00Z", CLIMBER, "s1", "scroll_depth_75", "engagement", "{}"),
    ("2026-05-20T12:00:00Z", CLIMBER, "s1", "repeat_session_30d", "retention", "{}"),
    (
        "2026-05-20T13:00:00Z",
        CLIMBER,
        "s2",
        "email_subscribe",
        "subscription",
        '{"consent_recorded": true}',
    ),
    ("2026-05-21T12:00:00Z", CLIMBER, "s2", "content_share", "advocacy", "{}"),
    # after as_of: must not count (score would be 21)
    ("2026-06-05T12:00:00Z", CLIMBER, "s3", "content_share", "advocacy", "{}"),
    # a system row: never in the window query
    ("2026-05-01T12:00:00Z", CLIMBER, "system", "state_change_logged", "system", "{}"),
    # 19 s view: unqualified, scores 0, stays S0
    (
        "2026-05-25T12:00:00Z",
        IDLE_VIEWER,
        "s4",
        "content_view",
        "engagement",
        '{"duration_seconds": 19}',
    ),
    # two scrolls in the same second of one session: the second is a duplicate
    ("2026-05-31T10:00:00.100Z", DOUBLE_SCROLLER, "s5", "scroll_depth_75", "engagement", "{}"),
    ("2026-05-31T10:00:00.600Z", DOUBLE_SCROLLER, "s5", "scroll_depth_75", "engagement", "{}"),
    # before the 120-day window: the user is not derived
    ("2026-01-31T23:59:59Z", LAPSED, "s6", "content_share", "advocacy", "{}"),
    # anonymous: never derived
    ("2026-05-30T12:00:00Z", None, "s7", "content_view", "engagement", "{}"),
]


def _load(pg: psycopg.Connection) -> None:
    with pg.cursor() as cur:
        cur.executemany(
            "INSERT INTO audience_events"
            " (created_at, user_id, session_id, event_type, event_category, metadata)"
            " VALUES (%s, %s, %s, %s, %s, %s::jsonb)",
            EVENTS,
        )


def test_baseline_derives_hand_computed_states(dsn: str, pg: psycopg.Connection) -> None:
    # Arrange
    _load(pg)
    harness.install_baseline(dsn)

    # Act
    _, users = harness.run_baseline(dsn, as_of=AS_OF)
    result = harness.baseline_states(dsn)

    # Assert
    expected = {CLIMBER: ("S4", 16.0), IDLE_VIEWER: ("S0", 0.0), DOUBLE_SCROLLER: ("S1", 2.0)}
    assert users == 3
    assert result == expected
    logged = pg.execute(
        "SELECT user_id::text, metadata ->> 'new_state' FROM bench_baseline.state_log ORDER BY 1"
    ).fetchall()
    assert logged == [(CLIMBER, "S4"), (IDLE_VIEWER, "S0"), (DOUBLE_SCROLLER, "S1")]
    assert pg.execute("SELECT count(*) FROM audience_state").fetchone() == (0,)


def test_baseline_rerun_resets_its_own_tables_and_logs_again(
    dsn: str, pg: psycopg.Connection
) -> None:
    # Arrange
    _load(pg)
    harness.install_baseline(dsn)
    harness.run_baseline(dsn, as_of=AS_OF)

    # Act
    _, users = harness.run_baseline(dsn, as_of=AS_OF, limit=1)

    # Assert
    assert users == 1
    assert pg.execute("SELECT count(*) FROM bench_baseline.audience_state").fetchone() == (1,)
    assert pg.execute("SELECT count(*) FROM bench_baseline.state_log").fetchone() == (1,)


def test_read_floor_streams_exactly_the_window(dsn: str, pg: psycopg.Connection) -> None:
    # Arrange
    _load(pg)
    sql = harness.window_sql()

    # Act
    seconds, received = harness.read_floor(dsn, sql, as_of=AS_OF)
    rows = harness.window_rows(dsn, sql, as_of=AS_OF)

    # Assert: 4 + 1 + 2 user events in [as_of - 120 d, as_of], no system, anonymous or late rows
    assert rows == 7
    assert harness.window_users(dsn, as_of=AS_OF) == 3
    assert received > 0
    assert seconds >= 0


def test_compare_states_counts_rejected_users_apart_from_disagreements() -> None:
    # Arrange
    baseline = {"u1": ("S2", 12.0), "u2": ("S1", 5.0), "u3": ("S3", 20.0)}
    derived = {"u1": ("S2", 12.0), "u2": ("S0", 5.0), "u4": ("S0", 0.0)}

    # Act
    result = harness.compare_states(baseline, derived)

    # Assert
    expected = Agreement(
        compared=2,
        states_equal=1,
        scores_equal=2,
        only_baseline=1,
        only_derive=1,
        examples=["u2: baseline S1, derive S0"],
    )
    assert result == expected
    assert not result.ok


def test_ratios_use_medians_and_targets_are_judged_at_their_boundary() -> None:
    # Arrange: (c) exactly 2x (b), (d) 1.6x (b), (a) exactly 10x (c)
    result = ScaleResult(scale="M", users=100_000)
    result.figures = {
        "a": Figure("a", seconds=[40.0, 20.0, 30.0]),
        "b": Figure("b", seconds=[1.0, 1.5, 1.5]),
        "c": Figure("c", seconds=[3.0, 2.0, 4.0], peak_rss_mb=[900.0, 1000.0, 950.0]),
        "d": Figure("d", seconds=[2.4, 2.4, 2.4]),
    }

    # Act
    table = report.ratios_table([result])

    # Assert
    assert result.ratio("c", "b") == 2.0
    assert result.ratio("a", "c") == 10.0
    assert (
        "| M | wall clock | 2.00 (met) | 1.60 (missed) | 10.00 (met) | 1,000 MiB (met) |" in table
    )


def test_readme_renders_every_case_and_the_agreement() -> None:
    # Arrange
    result = ScaleResult(scale="S", users=10_000, window_rows=230_000, users_in_window=9_000)
    result.figures = {case: Figure(case, seconds=[1.0]) for case in "abcde"}
    result.figures["c"].phases = [{"read": 0.25, "compute": 0.5}]
    result.agreement = Agreement(9_000, 9_000, 9_000, 0, 0)
    env = report.Environment(
        date="2026-11-22 00:00 UTC",
        cpu="cpu",
        cores=2,
        ram_gib=24.0,
        system="Linux",
        postgres="15.20",
        pg_settings="",
        python="3.11",
        packages={"polars": "2.1.0"},
    )

    # Act
    text = report.render([result], env, command="python -m benchmarks run --scale S", repeat=1)

    # Assert
    for label in harness.CASES.values():
        assert label in text
    assert "| S | (c) | read 0.250, compute 0.500 |" in text
    assert "| S | 9,000 | 9,000 | 9,000 | 0 | 0 | agree |" in text
    assert "![time vs scale, log-log](scaling.png)" in text
