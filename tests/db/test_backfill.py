"""``derive backfill``: state history from an empty start, equal to successive ``derive run``s."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import psycopg
import pytest
from polars.testing import assert_frame_equal

from derive.config import Rules, load_rules
from derive.errors import UsageError
from derive.io.connect import connect
from derive.io.history import HISTORY, Backfill, ParquetHistory, TableHistory
from derive.jobs.backfill import BackfillReport, StepResult, run_backfill, step_points
from derive.jobs.demo import load_demo_data
from derive.jobs.derivation import run_derivation
from tests.cli import derive

AS_OF = datetime(2026, 6, 30, tzinfo=UTC)
START = AS_OF - timedelta(days=29)
DAY = timedelta(days=1)
LOOKBACK = timedelta(days=120)
POINTS = step_points(START, AS_OF, DAY)

STATE_SQL = """
SELECT user_id, current_state, state_updated_at, engagement_score::float8 AS engagement_score,
       last_event_type, last_activity_at
  FROM audience_state
"""


@pytest.fixture
def rules() -> Rules:
    return load_rules()


@pytest.fixture
def demo_dsn(dsn: str, rules: Rules) -> str:
    """Demo data with dirt (rejections) and bursts, 120 days up to AS_OF."""
    with connect(dsn) as db:
        load_demo_data(db, users=300, as_of=AS_OF, rules=rules, seed=11, dirty=True)
    return dsn


def backfill(
    dsn: str,
    rules: Rules,
    *,
    out: Path | None = None,
    progress: Callable[[StepResult], None] = lambda _s: None,
) -> BackfillReport:
    identity = Backfill(origin=START, step=DAY, lookback=LOOKBACK, rules_version=rules.tag)
    with connect(dsn) as db:
        store = ParquetHistory(out, identity) if out is not None else TableHistory(db, identity)
        return run_backfill(
            db,
            start=START,
            end=AS_OF,
            step=DAY,
            lookback=LOOKBACK,
            rules=rules,
            store=store,
            progress=progress,
        )


def stored_steps(dsn: str, rules: Rules, *, out: Path | None = None) -> list[pl.DataFrame]:
    identity = Backfill(origin=START, step=DAY, lookback=LOOKBACK, rules_version=rules.tag)
    with connect(dsn) as db:
        store = ParquetHistory(out, identity) if out is not None else TableHistory(db, identity)
        return [store.load(p).sort("user_id") for p in POINTS]


def stop_after(steps: int) -> Callable[[StepResult], None]:
    def progress(step: StepResult) -> None:
        if not step.skipped and step.index + 1 == steps:
            raise KeyboardInterrupt

    return progress


def test_step_points_include_both_ends() -> None:
    assert len(POINTS) == 30
    assert POINTS[0] == START
    assert POINTS[-1] == AS_OF
    assert step_points(START, START + timedelta(hours=47), DAY) == [START, START + DAY]


@pytest.mark.parametrize(
    ("end", "step"), [(START - timedelta(seconds=1), DAY), (AS_OF, timedelta(0))]
)
def test_step_points_refuse_an_empty_range_or_step(end: datetime, step: timedelta) -> None:
    with pytest.raises(UsageError):
        step_points(START, end, step)


def test_backfill_equals_thirty_successive_runs_on_an_empty_audience_state(
    demo_dsn: str, rules: Rules, tmp_path: Path
) -> None:
    report = backfill(demo_dsn, rules, out=tmp_path / "history")
    history = stored_steps(demo_dsn, rules, out=tmp_path / "history")

    expected = []
    with connect(demo_dsn) as db:
        assert db.fetch_value("SELECT count(*) FROM audience_state") == 0
        db.rollback()
        for point in POINTS:
            run_derivation(db, as_of=point, lookback=LOOKBACK, rules=rules)
            snapshot = db.fetch_df(STATE_SQL)
            db.rollback()
            expected.append(snapshot.select([pl.col(n).cast(t) for n, t in HISTORY.items()]))

    assert report.as_dict()["steps_written"] == 30
    for point, result, want in zip(POINTS, history, expected, strict=True):
        assert result.height > 0, point
        assert_frame_equal(result, want.sort("user_id"), check_exact=True)
    assert history[0].height < history[-1].height


def test_backfill_into_the_table_equals_the_parquet_history(
    demo_dsn: str, rules: Rules, tmp_path: Path
) -> None:
    backfill(demo_dsn, rules, out=tmp_path / "history")
    backfill(demo_dsn, rules)

    files = stored_steps(demo_dsn, rules, out=tmp_path / "history")
    table = stored_steps(demo_dsn, rules)

    for from_files, from_table in zip(files, table, strict=True):
        assert_frame_equal(from_table, from_files, check_exact=True)


def test_backfill_leaves_audience_state_and_the_event_log_alone(
    demo_dsn: str, rules: Rules, tmp_path: Path, pg: psycopg.Connection
) -> None:
    events_before = pg.execute("SELECT count(*) FROM audience_events").fetchone()

    backfill(demo_dsn, rules, out=tmp_path / "history")

    assert pg.execute("SELECT count(*) FROM audience_state").fetchone() == (0,)
    assert pg.execute("SELECT count(*) FROM audience_events").fetchone() == events_before
    assert pg.execute("SELECT job, status, counts ->> 'steps' FROM derivation_runs").fetchall() == [
        ("backfill", "succeeded", "30")
    ]


def test_interrupted_parquet_backfill_resumes_with_the_same_result(
    demo_dsn: str, rules: Rules, tmp_path: Path, pg: psycopg.Connection
) -> None:
    backfill(demo_dsn, rules, out=tmp_path / "whole")
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        backfill(demo_dsn, rules, out=resumed, progress=stop_after(12))
    (resumed / ".as_of=2026-06-13T00-00-00Z.parquet.999.tmp").write_bytes(b"half a file")
    steps_written_before = len(list(resumed.glob("as_of=*.parquet")))

    report = backfill(demo_dsn, rules, out=resumed)

    assert steps_written_before == 12
    assert report.as_dict()["steps_skipped"] == 12
    assert len(list(resumed.glob("as_of=*.parquet"))) == 30
    for whole, again in zip(
        stored_steps(demo_dsn, rules, out=tmp_path / "whole"),
        stored_steps(demo_dsn, rules, out=resumed),
        strict=True,
    ):
        assert_frame_equal(again, whole, check_exact=True)
    statuses = [
        r[0]
        for r in pg.execute(
            "SELECT status FROM derivation_runs WHERE job = 'backfill' ORDER BY started_at"
        ).fetchall()
    ]
    assert statuses == ["succeeded", "failed", "succeeded"]


def test_interrupted_table_backfill_resumes_with_the_same_result(
    demo_dsn: str, rules: Rules, tmp_path: Path, pg: psycopg.Connection
) -> None:
    backfill(demo_dsn, rules, out=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        backfill(demo_dsn, rules, progress=stop_after(7))
    marked = pg.execute("SELECT count(*) FROM audience_state_history_steps").fetchone()

    report = backfill(demo_dsn, rules)

    assert marked == (7,)
    assert report.as_dict()["steps_skipped"] == 7
    for whole, again in zip(
        stored_steps(demo_dsn, rules, out=tmp_path / "whole"),
        stored_steps(demo_dsn, rules),
        strict=True,
    ):
        assert_frame_equal(again, whole, check_exact=True)


def test_a_directory_of_another_backfill_is_refused(
    demo_dsn: str, rules: Rules, tmp_path: Path
) -> None:
    out = tmp_path / "history"
    other = Backfill(origin=START, step=timedelta(hours=12), lookback=LOOKBACK, rules_version="x")
    ParquetHistory(out, other).open()

    with pytest.raises(UsageError, match="holds a backfill with other parameters"):
        backfill(demo_dsn, rules, out=out)


def test_backfill_command_writes_one_file_per_step(demo_dsn: str, tmp_path: Path) -> None:
    out = tmp_path / "cli"

    result = derive(
        "backfill", "--from", "2026-06-21", "--to", "2026-06-30", "--step", "1d",
        "--out", str(out), "--dsn", demo_dsn, "--json",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["steps_written"] == 10
    assert sum(payload["final_states"].values()) > 0
    assert len(list(out.glob("as_of=*.parquet"))) == 10
    assert json.loads((out / "backfill.json").read_text())["origin"] == "2026-06-21T00:00:00+00:00"


@pytest.mark.parametrize(
    "target",
    [(), ("--out", "x", "--table", "audience_state_history"), ("--table", "audience_state")],
)
def test_backfill_command_needs_exactly_one_known_target(dsn: str, target: tuple[str, ...]) -> None:
    result = derive("backfill", "--from", "2026-06-01", "--to", "2026-06-02", "--dsn", dsn, *target)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
