"""``--read-dsn`` against a real streaming replica: a private primary and its hot standby.

The module starts its own primary (initdb, a free port, a temp dir) and a standby made with
``pg_basebackup -R`` that streams from it, both as the ``postgres`` OS user, and stops both at
the end. A run reading from the standby writes what a run reading from the primary writes; a
standby whose replay is paused (``pg_wal_replay_pause``: a replica lagging the primary) is
waited for, then refused with nothing written, and read once it has caught up.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from derive.io import migrate as migrations
from derive.io.connect import connect
from tests.cli import derive
from tests.db.helpers import AS_OF, engaged_user, insert_events
from tests.db.test_incremental import _reset, derived_tables

pytestmark = pytest.mark.replica

WHEN = AS_OF.isoformat()


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(f"{name} not found: install the PostgreSQL server package")
    return found[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(*args: str) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)


def _start(data: Path, port: int, root: Path) -> None:
    _as_postgres(
        _bin("pg_ctl"), "-D", str(data), "-w", "-l", str(root / f"{data.name}.log"),
        "-o", f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root}"
        " -c shared_buffers=16MB -c max_connections=40 -c fsync=off",
        "start",
    )  # fmt: skip


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str]]:
    """(primary DSN, standby DSN) of a migrated database streamed to a hot standby."""
    root = Path(tempfile.mkdtemp(prefix="derive-replica-"))
    os.chmod(root, 0o777)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    primary, standby = root / "primary", root / "standby"
    p1, p2 = _free_port(), _free_port()
    started: list[Path] = []
    try:
        _as_postgres(_bin("initdb"), "-D", str(primary), "-U", "postgres", "--auth=trust")
        _start(primary, p1, root)
        started.append(primary)
        admin = f"postgresql://postgres@127.0.0.1:{p1}/postgres"
        with psycopg.connect(admin, autocommit=True) as pg:
            pg.execute("CREATE DATABASE derive_replica")
        dsn = f"postgresql://postgres@127.0.0.1:{p1}/derive_replica"
        with connect(dsn) as db:
            migrations.migrate(db)
        _as_postgres(
            _bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(p1), "-U", "postgres",
            "-D", str(standby), "-R", "-X", "stream", "--checkpoint=fast",
        )  # fmt: skip
        _start(standby, p2, root)
        started.append(standby)
        yield dsn, f"postgresql://postgres@127.0.0.1:{p2}/derive_replica"
    finally:
        for data in reversed(started):
            _as_postgres(_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _caught_up(primary: str, standby: str) -> None:
    with psycopg.connect(primary, autocommit=True) as p, psycopg.connect(standby) as s:
        (lsn,) = p.execute("SELECT pg_current_wal_lsn()").fetchone() or ("",)
        for _ in range(300):
            row = s.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()
            s.rollback()
            if row and row[0]:
                return
            time.sleep(0.1)
    raise AssertionError("the standby did not catch up")


def _spread(n: int) -> list[dict[str, Any]]:
    return [r for i in range(n) for r in engaged_user(((i * (1 << 128)) // n) + 99)]


def _state(primary: str) -> Any:
    with psycopg.connect(primary) as pg:
        return derived_tables(pg)


def _fresh(primary: str, rows: list[dict[str, Any]]) -> None:
    with psycopg.connect(primary, autocommit=True) as pg:
        _reset(pg)
        insert_events(pg, rows)


def test_runs_reading_the_standby_write_what_runs_reading_the_primary_write(
    servers: tuple[str, str],
) -> None:
    primary, standby = servers
    rows = _spread(9)
    _fresh(primary, rows)
    result = derive("run", "--full", "--shards", "3", "--as-of", WHEN, "--dsn", primary)
    assert result.returncode == 0, result.stderr
    expected = _state(primary)
    assert len(expected["states"]) == 9

    _fresh(primary, rows)
    result = derive(
        "run", "--full", "--shards", "3", "--as-of", WHEN, "--dsn", primary, "--read-dsn", standby
    )
    assert result.returncode == 0, result.stderr
    assert _state(primary) == expected
    # --verify reads the standby too, once it has replayed that run's write.
    result = derive("run", "--verify", "--as-of", WHEN, "--dsn", primary, "--read-dsn", standby)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_lagging_standby_is_waited_for_then_refused_and_read_once_caught_up(
    servers: tuple[str, str],
) -> None:
    primary, standby = servers
    rows = _spread(6)
    _fresh(primary, rows)
    assert derive("run", "--full", "--as-of", WHEN, "--dsn", primary).returncode == 0
    expected_first = _state(primary)
    _caught_up(primary, standby)

    with psycopg.connect(standby, autocommit=True) as s:
        s.execute("SELECT pg_wal_replay_pause()")
        try:
            # The primary moves on: a second full run's write the standby has not replayed.
            later = engaged_user(uuid.uuid4().int)
            with psycopg.connect(primary, autocommit=True) as pg:
                insert_events(pg, later)
            assert derive("run", "--full", "--as-of", WHEN, "--dsn", primary).returncode == 0
            after_second = _state(primary)
            assert after_second != expected_first

            refused = derive(
                "run", "--full", "--shards", "2", "--as-of", WHEN, "--dsn", primary,
                "--read-dsn", standby, env={"DERIVE_REPLICA_WAIT": "1"},
            )  # fmt: skip
            assert refused.returncode == 1, refused.stderr
            assert "did not catch up within 1 s" in refused.stderr
            assert f"127.0.0.1:{standby.split(':')[-1].split('/')[0]}" in refused.stderr
            assert "nothing was read or written" in refused.stderr
            assert _state(primary) == after_second

            # Replay resumes while derive waits: the run then reads the caught-up standby.
            threading.Timer(1.5, lambda: _resume(standby)).start()
            waited = derive(
                "run", "--full", "--shards", "2", "--as-of", WHEN, "--dsn", primary,
                "--read-dsn", standby, "--json", env={"DERIVE_REPLICA_WAIT": "60"},
            )  # fmt: skip
            assert waited.returncode == 0, waited.stderr
            # Nothing changed since the second run: a full run from caught-up reads writes nothing.
            assert '"users_changed": 0' in waited.stdout
            assert _state(primary) == after_second
        finally:
            _resume(standby)


def _resume(standby: str) -> None:
    with psycopg.connect(standby, autocommit=True) as s:
        s.execute("SELECT pg_wal_replay_resume()")


@pytest.mark.ray
def test_ray_tasks_read_the_standby_in_one_snapshot(servers: tuple[str, str]) -> None:
    pytest.importorskip("ray")
    primary, standby = servers
    rows = _spread(8)
    _fresh(primary, rows)
    assert (
        derive("run", "--full", "--shards", "4", "--as-of", WHEN, "--dsn", primary).returncode == 0
    )
    expected = _state(primary)
    _fresh(primary, rows)
    result = derive(
        "run", "--full", "--shards", "4", "--as-of", WHEN, "--dsn", primary,
        "--read-dsn", standby, "--executor", "ray",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _state(primary) == expected


def test_the_watermark_of_a_run_that_read_the_standby_serves_the_next_incremental_run(
    servers: tuple[str, str],
) -> None:
    primary, standby = servers
    rows = _spread(5)
    _fresh(primary, rows)
    result = derive(
        "run", "--full", "--shards", "2", "--as-of", WHEN, "--dsn", primary, "--read-dsn", standby
    )
    assert result.returncode == 0, result.stderr
    # Events committed after that run's snapshot (taken on the standby, in the primary's xids).
    newcomer = engaged_user(12345)
    with psycopg.connect(primary, autocommit=True) as pg:
        insert_events(pg, newcomer)
    result = derive("run", "--as-of", WHEN, "--dsn", primary, "--json")
    assert result.returncode == 0, result.stderr
    assert '"mode": "incremental"' in result.stdout
    incremental_state = _state(primary)
    assert len(incremental_state["states"]) == 6
    # The same as a full run from scratch over everything.
    _fresh(primary, rows + newcomer)
    assert derive("run", "--full", "--as-of", WHEN, "--dsn", primary).returncode == 0
    assert _state(primary) == incremental_state
