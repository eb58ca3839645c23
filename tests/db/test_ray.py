"""``--executor ray`` on a real local Ray (2 CPUs) against a real PostgreSQL.

The contract is equality with the local executor: a full run, ``--verify`` and a backfill write
the same tables whichever executor derives the shards, also when a Ray worker is killed in the
middle of a task (Ray runs the task again; tasks write nothing). A run whose task fails writes
nothing at all. One Ray instance serves the module (starting one costs seconds on 2 cores).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
import psutil
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from polars.testing import assert_frame_equal

from derive.config import load_rules
from derive.errors import UsageError
from derive.io.connect import connect
from derive.io.history import Backfill, ParquetHistory
from derive.jobs.backfill import run_backfill, step_points
from derive.jobs.derivation import verify_derivation
from derive.jobs.executor import LocalExecutor, RayExecutor
from tests.cli import derive
from tests.db.helpers import AS_OF, insert_events, run
from tests.db.test_incremental import SMALL_SPIKES, _reset, derived_tables
from tests.db.test_shards import USERS, _rows, histories

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")

LOOKBACK = timedelta(days=120)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray of 2 CPUs for the module, stopped at its end."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def executor(ray_cluster: None) -> RayExecutor:
    return RayExecutor()  # joins the module's Ray (already initialised)


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("rules") / "rules.toml"
    path.write_text(SMALL_SPIKES)
    return load_rules(path)


def _replay(dsn: str, pg: psycopg.Connection, history: list[Any], rules: Any, **how: Any) -> Any:
    """Reset, then insert and run each step of ``history`` fully; tables and verify per step."""
    _reset(pg)
    seen = []
    as_of = AS_OF
    for batch, advance in history:
        insert_events(pg, _rows(batch, as_of))
        as_of = as_of + advance
        run(dsn, as_of=as_of, rules=rules, full=True, **how)
        # A silent superuser edit for --verify to find (the same edit in both replays).
        with pg.transaction():
            pg.execute("SET LOCAL session_replication_role = replica")
            pg.execute(
                "UPDATE audience_state SET engagement_score = engagement_score + 1"
                " WHERE user_id = (SELECT user_id FROM audience_state ORDER BY user_id LIMIT 1)"
            )
        with connect(dsn) as db:
            verified = verify_derivation(db, lookback=LOOKBACK, rules=rules, as_of=as_of, **how)
        seen.append((derived_tables(pg), verified.users_compared, verified.differences))
    return seen


def _same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for (tables_a, users_a, diff_a), (tables_b, users_b, diff_b) in zip(a, b, strict=True):
        assert tables_a == tables_b
        assert users_a == users_b
        assert_frame_equal(diff_a, diff_b)


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=histories)
def test_ray_runs_and_verify_write_what_local_runs_write(
    dsn: str, executor: RayExecutor, rules: Any, history: list[Any]
) -> None:
    # The users sit exactly at, just below and just above the bounds of 7 shards (test_shards):
    # each task's user_id range read must hold each of them once.
    with psycopg.connect(dsn, autocommit=True) as pg:
        local = _replay(dsn, pg, history, rules, shards=1)
        _same(_replay(dsn, pg, history, rules, shards=7, executor=executor), local)
        # One shard is a Ray task too (the read moves to the task), same answer.
        _same(_replay(dsn, pg, history, rules, shards=1, executor=executor), local)


def _backfill(dsn: str, out: Path, rules: Any, **how: Any) -> list[pl.DataFrame]:
    start, end, step = AS_OF - timedelta(days=6), AS_OF + timedelta(days=2), timedelta(days=2)
    identity = Backfill(origin=start, step=step, lookback=LOOKBACK, rules_version=rules.tag)
    with connect(dsn) as db:
        store = ParquetHistory(out, identity)
        run_backfill(
            db, start=start, end=end, step=step, lookback=LOOKBACK, rules=rules, store=store, **how
        )
        return [store.load(p).sort("user_id") for p in step_points(start, end, step)]


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=histories)
def test_ray_backfill_stores_what_a_local_backfill_stores(
    dsn: str,
    executor: RayExecutor,
    rules: Any,
    tmp_path_factory: pytest.TempPathFactory,
    history: list[Any],
) -> None:
    with psycopg.connect(dsn, autocommit=True) as pg:
        _reset(pg)
        as_of = AS_OF - timedelta(days=8)
        # One engaged user in every example, so that each stored point has a row to compare even
        # when the drawn history holds only rows that derive nothing (an unknown category, say).
        insert_events(pg, _rows([(USERS[len(USERS) // 2], 0, -timedelta(days=2), "s1", 1)], as_of))
        for batch, advance in history:
            insert_events(pg, _rows(batch, as_of))
            as_of += advance
    local = _backfill(dsn, tmp_path_factory.mktemp("local"), rules)
    sharded = _backfill(dsn, tmp_path_factory.mktemp("ray"), rules, shards=7, executor=executor)
    assert len(local) == len(sharded) == 5
    for a, b in zip(local, sharded, strict=True):
        assert_frame_equal(a, b)
    assert any(frame.height for frame in local)


def _spread_users(count: int) -> list[dict[str, Any]]:
    """Engaged users spread over the uuid space (every shard of 4 gets some)."""
    rows = []
    for i in range(count):
        user = uuid.UUID(int=(i * (1 << 128)) // count + 12345)
        for k, event_type in enumerate(
            ("scroll_depth_75", "long_form_completion", "content_share")
        ):
            rows.append(
                {
                    "created_at": AS_OF - timedelta(days=k + 1, minutes=i),
                    "user_id": user,
                    "session_id": "s1",
                    "event_type": event_type,
                    "event_category": "advocacy" if event_type == "content_share" else "engagement",
                    "metadata": "{}",
                }
            )
    return rows


def _worker_reading_from(pg: psycopg.Connection, deadline: float) -> psutil.Process:
    """The Ray worker whose PostgreSQL connection waits on the test's table lock."""
    while time.monotonic() < deadline:
        ports = [
            port
            for (port,) in pg.execute(
                "SELECT client_port FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock' AND client_port IS NOT NULL"
            ).fetchall()
        ]
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.pid == os.getpid():
                continue
            try:
                conns = proc.net_connections(kind="tcp")
            except (psutil.AccessDenied, psutil.NoSuchProcess):
                continue
            if any(c.laddr and c.laddr.port in ports for c in conns):
                return proc
        time.sleep(0.1)
    raise AssertionError("no Ray task started reading within the deadline")


def test_a_worker_killed_mid_task_still_gives_the_local_tables(
    dsn: str, second_dsn: str, executor: RayExecutor, rules: Any
) -> None:
    rows = _spread_users(40)
    with psycopg.connect(second_dsn, autocommit=True) as pg:
        insert_events(pg, rows)
    run(second_dsn, rules=rules, full=True, shards=1, executor=LocalExecutor())
    with psycopg.connect(second_dsn, autocommit=True) as pg:
        expected = derived_tables(pg)

    with psycopg.connect(dsn, autocommit=True) as pg:
        insert_events(pg, rows)
    outcome: list[Any] = []
    with psycopg.connect(dsn) as locker, psycopg.connect(dsn, autocommit=True) as watch:
        # Every task blocks on its read of audience_state until the lock goes.
        locker.execute("LOCK TABLE audience_state IN ACCESS EXCLUSIVE MODE")

        def go() -> None:
            try:
                outcome.append(run(dsn, rules=rules, full=True, shards=4, executor=executor))
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=go)
        worker.start()
        victim = _worker_reading_from(watch, time.monotonic() + 120)
        # A Ray worker process (named after its task while it runs one), not the driver.
        described = " ".join(victim.info["cmdline"] or [])
        assert "ray::" in described or "default_worker" in described, described
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(30)
        locker.rollback()
        worker.join(300)
        assert not worker.is_alive()
        assert not isinstance(outcome[0], BaseException), outcome[0]
        assert derived_tables(watch) == expected
        assert outcome[0].counts["shards"]["executor"] == "ray"


def test_a_failing_task_leaves_every_table_as_it_was(
    dsn: str, executor: RayExecutor, rules: Any
) -> None:
    with psycopg.connect(dsn, autocommit=True) as pg:
        insert_events(pg, _spread_users(20))
        run(dsn, rules=rules, full=True, shards=1)
        before = derived_tables(pg)
        # New events for every user, and one user too heavy for the limit in one shard only.
        insert_events(pg, _spread_users(20))
        heavy = uuid.UUID(int=(3 << 126) + 7)
        insert_events(
            pg,
            [
                {
                    "created_at": AS_OF - timedelta(minutes=m),
                    "user_id": heavy,
                    "session_id": None,
                    "event_type": "scroll_depth_75",
                    "event_category": "engagement",
                    "metadata": "{}",
                }
                for m in range(200)
            ],
        )
        with pytest.raises(UsageError, match="one user has 200 events"):
            run(dsn, rules=rules, full=True, shards=4, executor=executor, memory_limit=100_000)
        assert derived_tables(pg) == before
        status = pg.execute(
            "SELECT status FROM derivation_runs WHERE job = 'derive' ORDER BY started_at DESC"
            " LIMIT 1"
        ).fetchone()
        assert status is not None
        assert status[0] == "failed"


def test_an_unreachable_ray_address_exits_2_naming_it(dsn: str) -> None:
    result = derive(
        "run", "--full", "--executor", "ray", "--ray-address", "127.0.0.1:1", "--dsn", dsn
    )
    assert result.returncode == 2, result.stderr
    assert "--ray-address '127.0.0.1:1'" in result.stderr
    assert "ray start --head" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_cli_runs_a_full_run_and_a_backfill_on_ray(dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as pg:
        insert_events(pg, _spread_users(12))
    result = derive(
        "run", "--full", "--executor", "ray", "--shards", "2", "--dsn", dsn, "--json",
        "--as-of", AS_OF.isoformat(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"executor": "ray"' in result.stdout
    assert '"executor_start"' in result.stdout  # the run started a local Ray for its tasks
    # An incremental run has no shard tasks: it starts no Ray.
    with psycopg.connect(dsn, autocommit=True) as pg:
        insert_events(pg, _spread_users(1))
    result = derive(
        "run", "--executor", "ray", "--dsn", dsn, "--json", "--as-of", AS_OF.isoformat()
    )
    assert result.returncode == 0, result.stderr
    assert '"mode": "incremental"' in result.stdout
    assert '"executor_start"' not in result.stdout
    result = derive(
        "backfill", "--from", (AS_OF - timedelta(days=2)).isoformat(), "--to",
        AS_OF.isoformat(), "--out", str(tmp_path), "--executor", "ray", "--shards", "2",
        "--dsn", dsn, "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert '"steps": 3' in result.stdout
