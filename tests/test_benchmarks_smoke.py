"""Smoke tests of the benchmark harness pieces on a tiny dataset (timed runs: benchmarks/)."""

from __future__ import annotations

import csv
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from benchmarks import (
    child,
    harness,
    incremental,
    ingest,
    rayexec,
    report,
    userwindows,
    writepath,
)
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
    result.figures = {case: Figure(case, seconds=[1.0]) for case in harness.CASES}
    result.figures["c"].phases = [{"read": 0.25, "compute": 0.5}]
    result.agreement = Agreement(9_000, 9_000, 9_000, 0, 0)

    result.watch_latency = [1.5, 1.1, 1.2]
    result.user_reads = [
        {
            "users": 1_000,
            "events": 20_000,
            "read_s": 0.5,
            "read_min_s": 0.4,
            "read_max_s": 0.6,
            "dry_run_s": 0.9,
        }
    ]

    # Act
    text = report.render([result], _env(), command="python -m benchmarks run --scale S", repeat=1)

    # Assert
    assert "| S | 1,000 | 20,000 | 0.500 | 0.400 | 0.600 | 0.500 | 0.900 |" in text
    assert "| 3 | 1.200 | 1.100 | 1.500 |" in text
    for label in harness.CASES.values():
        assert label in text
    assert "| S | (c) | read 0.250, compute 0.500 |" in text
    assert "| S | 9,000 | 9,000 | 9,000 | 0 | 0 | agree |" in text
    assert "![time vs scale, log-log](scaling.png)" in text


# -- (b) psql floor, (f)/(g), write path, insert overhead -------------------------------------------


def _database(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


def _derive_once(dsn: str, pg: psycopg.Connection) -> harness.DeriveRun:
    _load(pg)
    return harness.run_derive(dsn, as_of=AS_OF)


def test_psql_floor_streams_the_same_window_bytes_as_the_client(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    # Arrange
    _load(pg)
    sql = harness.window_sql()
    streamed = bytearray()
    with psycopg.connect(dsn, autocommit=True) as conn:
        harness._set_window(conn, AS_OF, harness.LOOKBACK)
        with conn.cursor() as cur, cur.copy(f"COPY ({sql}) TO STDOUT (FORMAT binary)") as copy:
            for block in copy:
                streamed += block
    out = tmp_path / "floor.copy"

    # Act
    seconds = harness.psql_floor(dsn, sql, as_of=AS_OF, output=str(out))

    # Assert: the same 7 rows as test_read_floor_streams_exactly_the_window, byte for byte
    assert out.read_bytes() == bytes(streamed)
    assert seconds > 0


def test_psql_floor_failure_names_the_step(dsn: str) -> None:
    # Act / Assert
    with pytest.raises(harness.BenchError, match="psql read floor failed"):
        harness.psql_floor(dsn, "SELECT * FROM no_such_table", as_of=AS_OF, output=os.devnull)


def _ensure_watermark(dsn: str, pg: psycopg.Connection) -> None:
    """Migration 0007's watermark objects, created here when this checkout predates it."""
    if len(ingest.watermark_objects(dsn)) == 4:
        return
    pg.execute(
        "ALTER TABLE audience_events"
        " ADD COLUMN IF NOT EXISTS ingest_xid xid8 NOT NULL DEFAULT pg_current_xact_id()"
    )
    pg.execute(
        "CREATE INDEX IF NOT EXISTS audience_events_ingest_xid_idx ON audience_events (ingest_xid)"
        " WHERE user_id IS NOT NULL"
    )
    pg.execute(
        "CREATE OR REPLACE FUNCTION bench_test_changes() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN RETURN NULL; END $$"
    )
    for name, op in (("upd", "UPDATE"), ("del", "DELETE")):
        pg.execute(
            f"CREATE OR REPLACE TRIGGER audience_events_changes_{name} AFTER {op}"
            " ON audience_events FOR EACH STATEMENT EXECUTE FUNCTION bench_test_changes()"
        )


def _other_objects(pg: psycopg.Connection) -> list[str]:
    rows = pg.execute(
        "SELECT relname FROM pg_class WHERE relkind = 'i' AND relname LIKE 'audience_events%'"
        " AND relname <> 'audience_events_ingest_xid_idx'"
        " UNION ALL SELECT tgname FROM pg_trigger WHERE tgrelid = 'audience_events'::regclass"
        " AND NOT tgisinternal AND tgname NOT LIKE 'audience_events_changes_%' ORDER BY 1"
    ).fetchall()
    return [r[0] for r in rows]


def test_drop_watermark_removes_exactly_its_objects_and_tolerates_their_absence(
    dsn: str, pg: psycopg.Connection
) -> None:
    # Arrange
    _ensure_watermark(dsn, pg)
    others = _other_objects(pg)

    # Act
    before = ingest.watermark_objects(dsn)
    ingest.drop_watermark(dsn)
    after = ingest.watermark_objects(dsn)
    ingest.drop_watermark(dsn)  # again: nothing left to drop, no error

    # Assert
    assert before == [
        "column ingest_xid",
        "index audience_events_ingest_xid_idx",
        "trigger audience_events_changes_upd",
        "trigger audience_events_changes_del",
    ]
    assert after == []
    assert _other_objects(pg) == others
    assert others  # the notify trigger and the window's indexes are still there


def test_drop_window_indexes_removes_exactly_them(dsn: str, pg: psycopg.Connection) -> None:
    # Arrange
    indexes = (
        "SELECT relname FROM pg_class WHERE relkind = 'i' AND relname LIKE 'audience_events%'"
        " ORDER BY 1"
    )
    everything = [r[0] for r in pg.execute(indexes).fetchall()]

    # Act
    before = ingest.WINDOW_INDEX.objects(dsn)
    ingest.WINDOW_INDEX.drop(dsn)
    after = ingest.WINDOW_INDEX.objects(dsn)
    ingest.WINDOW_INDEX.drop(dsn)  # again: nothing left to drop, no error

    # Assert
    assert before == [
        "index audience_events_user_window_idx",
        "index audience_events_user_window_rest_idx",
    ]
    assert after == []
    left = [r[0] for r in pg.execute(indexes).fetchall()]
    assert left == [name for name in everything if name not in ingest.WINDOW_INDEXES]


def test_insert_overhead_runs_both_shapes_on_both_copies(
    dsn: str, second_dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    # Arrange
    _ensure_watermark(dsn, pg)

    # Act
    result = ingest.measure(
        dsn,
        second_dsn,
        workdir=tmp_path,
        repeat=2,
        transactions=16,
        copy_rows=30,
        until=AS_OF,
        seed=1,
    )

    # Assert: 2 x (4 rounds of 4 single inserts + 30 copied rows) landed in each copy
    for target in (dsn, second_dsn):
        with psycopg.connect(target) as conn:
            assert conn.execute("SELECT count(*) FROM audience_events").fetchone() == (92,)
    assert len(result.present) == 4
    assert ingest.watermark_objects(second_dsn) == []
    for shape, rows in (("single", 16), ("copy", 30)):
        pair = result.pair(shape)
        assert pair is not None
        for figure in pair:
            assert figure.rows == rows
            assert len(figure.rows_per_s) == 2
            assert figure.median_rate > 0


def test_copy_file_holds_valid_events_in_the_day_before(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "events.csv"

    # Act
    ingest.write_copy_file(path, 200, until=AS_OF, seed=3)

    # Assert
    with path.open() as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 200
    times = [datetime.fromisoformat(r[0]) for r in rows]
    assert all(AS_OF - timedelta(days=1) <= t <= AS_OF for t in times)
    assert {r[4] for r in rows} <= {"engagement", "retention", "advocacy", "subscription"}
    assert all(isinstance(json.loads(r[6]), dict) for r in rows)


def test_active_users_is_one_percent_rounded_up_and_never_more_than_stored() -> None:
    assert incremental.active_users(0) == 0
    assert incremental.active_users(3) == 1
    assert incremental.active_users(100) == 1
    assert incremental.active_users(101) == 2
    assert incremental.active_users(100_000) == 1_000
    assert incremental.active_users(2, share=1.0) == 2


def test_append_recent_events_lands_in_the_tick_for_stored_users(
    dsn: str, pg: psycopg.Connection
) -> None:
    # Arrange
    _derive_once(dsn, pg)
    until = AS_OF + incremental.TICK

    # Act
    appended = incremental.append_recent_events(dsn, since=AS_OF, until=until, seed=6, share=1.0)

    # Assert: every stored user got its 2 latest kinds of non-system event again, inside the tick
    rows = pg.execute(
        "SELECT e.user_id::text, e.created_at, e.event_category, s.user_id IS NOT NULL"
        " FROM audience_events e LEFT JOIN audience_state s USING (user_id)"
        " WHERE e.session_id LIKE 'tick-%'"
    ).fetchall()
    assert appended == {"users": 3, "events": len(rows)}
    per_user = {u: sum(1 for r in rows if r[0] == u) for u, *_ in rows}
    assert per_user == {CLIMBER: 2, IDLE_VIEWER: 1, DOUBLE_SCROLLER: 2}
    assert all(AS_OF < r[1] <= until and r[2] != "system" and r[3] for r in rows)


def test_ticks_measure_f_and_g_on_copies_of_the_base(dsn: str, pg: psycopg.Connection) -> None:
    # Arrange: the test database is the base (a run at AS_OF over every user)
    _derive_once(dsn, pg)
    pg.close()
    server = dsn.rsplit("/", 1)[0] + "/postgres"
    result = ScaleResult(scale="S", users=3)

    # Act
    harness.measure_ticks(server, result, harness.Names(_database(dsn)), repeat=1)

    # Assert
    f, g = result.figures["f"], result.figures["g"]
    assert result.tick_appended == {"users": 1, "events": 2}
    assert "2 events of 1 users appended in (00:00, 00:15]" in f.note
    for figure in (f, g):
        assert len(figure.seconds) == len(figure.job_seconds) == 1
        assert figure.modes == ["incremental"]
    assert f.counts["users_evaluated"] >= 1  # the user with new events
    assert sum(f.counts["candidates"].values()) >= 1
    assert g.counts["users_evaluated"] == 0  # nothing new, no retention crossing in 15 minutes
    with psycopg.connect(dsn) as conn:
        names = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (_database(dsn) + "_%",)
        ).fetchall()
        runs = conn.execute("SELECT count(*) FROM derivation_runs").fetchone()
    assert names == []  # the base and tick copies are dropped
    assert runs == (1,)  # the base itself is untouched


def test_write_path_exports_the_runs_rows_and_copies_them_back_rolled_back(
    dsn: str, second_dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    # Arrange
    run = _derive_once(dsn, pg)
    assert run.run_id is not None

    # Act
    exports = writepath.export(dsn, run.run_id, tmp_path)
    figures = writepath.measure(second_dsn, exports, run.phases, repeat=2)

    # Assert
    by_step = {f.step: f for f in figures}
    assert by_step["audit rows"].rows == run.counts["audit_rows"] > 0
    assert by_step["states"].rows == 3
    assert by_step["validation_fail rows"].rows == 0
    assert by_step["validation_fail rows"].indexed_seconds == []
    assert by_step["states"].timing == "write_states"
    assert by_step["audit rows"].timing == "write_audit"
    assert len(by_step["audit rows"].indexed_seconds) == len(by_step["states"].bare_seconds) == 2
    with psycopg.connect(second_dsn) as conn:  # rolled back: nothing stays, indexes are back
        assert conn.execute("SELECT count(*) FROM audience_events").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM audience_state").fetchone() == (0,)
        indexes = conn.execute(
            "SELECT count(*) FROM pg_index WHERE indrelid = 'audience_state'::regclass"
        ).fetchone()
    assert indexes is not None
    assert indexes[0] >= 1


def test_step_shared_by_two_writes_counts_both_writes_rows() -> None:
    # Arrange
    audit, fail, states = writepath.STEPS
    exports = [
        writepath.Export(audit, Path("a"), 300, []),
        writepath.Export(fail, Path("f"), 100, []),
        writepath.Export(states, Path("s"), 50, []),
    ]

    # Act: zero repeats, so nothing is copied
    figures = writepath.measure(
        "unused", exports, {"write_audit": 2.0, "write_states": 0.5}, repeat=0
    )

    # Assert
    assert [(f.timing, f.step_rows, f.shared) for f in figures] == [
        ("write_audit", 400, True),
        ("write_audit", 400, True),
        ("write_states", 50, False),
    ]
    assert figures[0].job_rate == 200.0
    assert figures[2].job_rate == 100.0


def _env() -> report.Environment:
    return report.Environment(
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


def test_incremental_targets_are_judged_at_their_boundary() -> None:
    # Arrange: (b) 10 s; (f) exactly 0.1x in-job, 0.3x wall, 300 MiB, (a) 30x; (g) just over
    result = ScaleResult(scale="M", users=100_000)
    result.figures = {
        "a": Figure("a", seconds=[90.0]),
        "b": Figure("b", seconds=[10.0]),
        "f": Figure(
            "f",
            seconds=[3.0],
            job_seconds=[1.0],
            peak_rss_mb=[300.0],
            modes=["incremental"],
            counts={"candidates": {"new_rows": 1_000, "entered": 12}},
        ),
        "g": Figure("g", seconds=[3.01], job_seconds=[1.01], peak_rss_mb=[301.0], modes=[None]),
    }

    # Act
    table = report.incremental_table([result])

    # Assert
    assert (
        "| M | (f) | incremental | 1.00 | 3.00 | 0.100 (met) | 0.300 (met) | 30.0 (met)"
        " | 300 (met) | new_rows=1,000, entered=12 |" in table
    )
    assert "| 0.101 (missed) | 0.301 (missed) | 29.9 (missed) | 301 (missed) |" in table
    assert "not recorded (a full run" in table


def test_incremental_target_at_l_is_tighter() -> None:
    # Arrange
    result = ScaleResult(scale="L", users=1_000_000)
    result.figures = {
        "b": Figure("b", seconds=[10.0]),
        "f": Figure("f", seconds=[2.0], job_seconds=[0.6], modes=["full"], full_reason="no base"),
    }

    # Act
    table = report.incremental_table([result])

    # Assert
    assert "| L | (f) | full (no base) | 0.60 | 2.00 | 0.060 (missed) | 0.200 |" in table


def test_readme_renders_the_new_sections() -> None:
    # Arrange
    result = ScaleResult(scale="S", users=10_000)
    result.figures = {case: Figure(case, seconds=[1.0]) for case in harness.CASES}
    result.writes = [
        writepath.WriteFigure("audit rows", "audience_events", 1_000, 0.5, "write_audit", 1_000),
        writepath.WriteFigure(
            "validation_fail rows", "audience_events", 0, 0.5, "write_audit", 1_000
        ),
    ]
    result.writes[0].indexed_seconds = [0.1]
    result.writes[0].bare_seconds = [0.05]
    result.write_staging = (1_000, 0.2)
    result.inserts = ingest.IngestResult(
        figures=[
            ingest.InsertFigure("single", "with", 4_000, [4.0], [900.0]),
            ingest.InsertFigure("single", "without", 4_000, [4.0], [1_000.0]),
        ],
        present=["column ingest_xid"],
        clients=2,
        transactions=4_000,
        synchronous_commit="on",
    )
    result.index_inserts = ingest.IngestResult(
        figures=[
            ingest.InsertFigure("copy", "with", 100_000, [2.0], [50_000.0]),
            ingest.InsertFigure("copy", "without", 100_000, [1.0], [100_000.0]),
        ],
        present=["index audience_events_user_window_idx"],
        clients=2,
        transactions=4_000,
        synchronous_commit="on",
        subject="window_index",
    )
    result.relation_sizes = {
        "audience_events": 400 * 2**20,
        "audience_events_user_window_idx": 300 * 2**20,
        "audience_events_user_window_rest_idx": 2**19,
        "audience_events_pkey": 100 * 2**20,
    }

    # Act
    text = report.render([result], _env(), command="python -m benchmarks run --scale S", repeat=1)

    # Assert
    for label in harness.CASES.values():
        assert label in text
    assert (
        "| S | audit rows | audience_events | 1,000 | 0.500 (write_audit) | 2,000 | 0.100"
        " | 10,000 | 0.050 | 20,000 | 5.00x |" in text
    )
    assert "| S | validation_fail rows | audience_events | 0 | — |" in text
    assert "| S | staging of all three (temp tables) | — | 1,000 | 0.200 (write_copy) |" in text
    assert (
        "| S | single-row INSERT, 1 per transaction | 4,000 | 900 | 1,000 | 0.90 (+11 % time per row)"
        " | column ingest_xid |" in text
    )
    assert (
        "| S | COPY, 1 transaction | 100,000 | 50,000 | 100,000 | 0.50 (+100 % time per row)"
        " | index audience_events_user_window_idx |" in text
    )
    assert (
        "at S, 300 MiB (rest index 0.5 MiB) beside 400 MiB of table and 100 MiB of its other"
        " indexes (75% of the table)." in text
    )
    assert "## Incremental runs: (f) and (g)" in text


def test_write_path_runs_on_a_dirty_dataset_of_its_own_and_drops_it(
    dsn: str, tmp_path: Path
) -> None:
    # Arrange: the test database only lends its name to the scratch copies
    server = dsn.rsplit("/", 1)[0] + "/postgres"
    result = ScaleResult(scale="S", users=300)

    # Act
    harness.measure_writes(
        server, result, harness.Names(_database(dsn)), repeat=1, scratch=tmp_path
    )

    # Assert: all three writes have rows, counted as the run counted them
    by_step = {f.step: f for f in result.writes}
    counts = result.write_counts
    assert by_step["audit rows"].rows == counts["audit_rows"] > 0
    assert by_step["validation_fail rows"].rows == counts["rejections_logged"] > 0
    assert by_step["states"].rows == counts["users_changed"] > 0
    assert all(len(f.indexed_seconds) == len(f.bare_seconds) == 1 for f in result.writes)
    assert result.write_staging is not None
    assert result.write_staging[0] == sum(f.rows for f in result.writes)
    with psycopg.connect(dsn) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (_database(dsn) + "_%",)
        ).fetchall()
    assert left == []


def test_child_peak_rss_is_its_own_not_the_harness_memory(tmp_path: Path) -> None:
    # Arrange: this process holds 300 MiB; the child touches 20 MiB
    held = bytearray(300 * 2**20)
    held[::4096] = b"\x01" * len(held[::4096])
    script = "x = bytearray(20 * 2**20)\nx[::4096] = b'1' * len(x[::4096])"

    # Act
    with (tmp_path / "out").open("wb") as out, (tmp_path / "err").open("wb") as err:
        run = child.spawn([sys.executable, "-c", script], stdout=out, stderr=err, env=None)

    # Assert: a fork of this process would report >= 300 MiB
    assert run.exit_code == 0
    assert 20 < run.peak_rss_mb < 150
    assert len(held) == 300 * 2**20


def test_child_that_cannot_start_is_a_failure_with_the_reason() -> None:
    # Act / Assert
    with pytest.raises(RuntimeError, match="no-such-program-for-bench"):
        child.timed(["no-such-program-for-bench"])


def test_user_window_reads_read_exactly_the_listed_users(dsn: str, pg: psycopg.Connection) -> None:
    # Arrange: the stored users of one derive run (CLIMBER, IDLE_VIEWER, DOUBLE_SCROLLER)
    _derive_once(dsn, pg)
    stored = pg.execute("SELECT count(*) FROM audience_state").fetchone()
    assert stored is not None
    assert stored[0] >= 2

    # Act: sizes above the stored count are skipped, not padded
    rows = userwindows.measure(
        dsn, as_of=AS_OF, lookback=harness.LOOKBACK, users=10, repeat=2, sizes=(1, 2, 50)
    )

    # Assert
    assert [row["users"] for row in rows] == [1, 2]
    for row in rows:
        assert row["events"] >= row["users"]  # every stored user has events in the window
        assert row["read_min_s"] <= row["read_s"] <= row["read_max_s"]
    one, two = rows
    assert one["events"] < two["events"] <= len(EVENTS)


def _ray_result() -> rayexec.RayResult:
    result = rayexec.RayResult(installed=True, shards=8, cpus=2)
    result.local.seconds, result.local.job_seconds = [3.0], [2.0]
    result.local.phases = [{"read": 1.2, "compute": 0.6}]
    result.ray.seconds, result.ray.job_seconds = [9.0], [7.8]
    result.ray.phases = [
        {
            "executor_start": 5.0,
            "shards": 2.4,
            "task_read": 1.6,
            "task_compute": 0.8,
            "task_wall": 3.2,
        }
    ]
    return result


def test_ray_section_reports_overhead_per_task_and_labels_the_estimate() -> None:
    result = _ray_result()
    # (7.8 - 5.0 - 2.0) / 8 tasks; estimate: (7.8 - 2.4 - 5.0) + (3.2 + 0.1 * 8) / (4 x 2 CPUs)
    assert result.overhead_per_task() == pytest.approx(0.1)
    assert result.estimate_nodes() == pytest.approx(0.4 + 4.0 / 8)
    scale = ScaleResult(scale="S", users=10_000)
    scale.figures = {case: Figure(case, seconds=[1.0]) for case in harness.CASES}
    scale.ray = result

    text = report.render([scale], _env(), command="python -m benchmarks run --scale S", repeat=1)

    assert "## Scale-out on Ray (`--executor ray`)" in text
    assert "| S | local | 8 | 3.00 | 2.00 | — | — | 1.20 | 0.60 | — |" in text
    assert "| S | ray | 8 | 9.00 | 7.80 | 5.00 | 2.40 | 1.60 | 0.80 | 0.100 |" in text
    assert "- S: **estimate**, not a measurement: 0.90 s in-job on 4 nodes of 2 CPUs" in text


def test_ray_section_says_when_ray_is_not_installed() -> None:
    scale = ScaleResult(scale="S", users=10_000)
    scale.figures = {case: Figure(case, seconds=[1.0]) for case in harness.CASES}
    scale.ray = rayexec.RayResult(installed=False)
    text = report.render([scale], _env(), command="python -m benchmarks run --scale S", repeat=1)
    assert "ray is not installed (`pip install -e '.[ray]'`): not measured" in text


@pytest.mark.ray
def test_ray_section_measures_both_executors_on_a_tiny_dataset(
    dsn: str, pg: psycopg.Connection
) -> None:
    _load(pg)
    pg.close()
    lines: list[str] = []

    result = rayexec.measure(dsn, run=harness.run_derive, repeat=1, log=lines.append, shards=2)

    assert result.installed
    for figure in (result.local, result.ray):
        assert len(figure.seconds) == len(figure.job_seconds) == 1
    assert result.tasks == 2  # one task per shard
    # The tasks' own timings, recorded in the Ray run's timings only.
    assert result.ray.phase("task_read") is not None
    assert result.local.phase("task_read") is None
    assert result.overhead_per_task() is not None
    assert len(lines) == 2
