"""Connection hygiene for hosted servers: low timeouts, connections cut in the middle of a read.

Hosted PostgreSQL (Supabase, RDS ...) sets statement_timeout and
idle_in_transaction_session_timeout per role or database. derive lifts both per transaction
(SET LOCAL) where its reads and writes may outlast them, and says what happened, and what to do,
when the server or a pooler cuts the connection mid-statement.

A read is made slow deterministically: another session holds an ACCESS EXCLUSIVE lock on the table
until derive's backend is seen waiting for it (a lock wait counts against statement_timeout).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.db.helpers import engaged_user, insert_events, states

AS_OF = "2026-06-01T12:00:00+00:00"


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``derive *args`` as a console command in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "derive.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "NO_COLOR": "1", **(env or {})},
    )


def waiting_backend(pg: psycopg.Connection, *, timeout: float = 120) -> tuple[int, str]:
    """(pid, query) of derive's backend once it waits for a lock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = pg.execute(
            "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'derive' AND wait_event_type = 'Lock'"
        ).fetchone()
        if row is not None:
            return int(row[0]), str(row[1])
        time.sleep(0.05)
    raise AssertionError("derive never waited for the lock")


def while_locked(
    dsn: str, pg: psycopg.Connection, table: str, command: list[str], during: Callable[[int], None]
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` while ``table`` is locked; ``during(pid)`` once derive waits for it."""
    with psycopg.connect(dsn) as locker:
        locker.execute("SET statement_timeout = 0")
        locker.execute("SET idle_in_transaction_session_timeout = 0")
        locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        proc = start(*command)
        try:
            pid, query = waiting_backend(pg)
            print(f"derive waits in: {' '.join(query.split())[:120]}")
            during(pid)
        finally:
            locker.rollback()
        out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def database(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


@pytest.mark.parametrize(
    ("table", "command"),
    [
        ("audience_events", ["run", "--as-of", AS_OF]),  # waits in the shard planning
        ("audience_state", ["run", "--as-of", AS_OF]),  # waits in the snapshot's reads
        ("surface_metrics", ["rollup", "--as-of", AS_OF]),
    ],
)
def test_reads_outlast_a_low_statement_and_idle_timeout_of_the_database(
    dsn: str, pg: psycopg.Connection, table: str, command: list[str]
) -> None:
    insert_events(pg, [e for n in range(1, 20) for e in engaged_user(n)])
    pg.execute(f'ALTER DATABASE "{database(dsn)}" SET statement_timeout = 200')
    pg.execute(f'ALTER DATABASE "{database(dsn)}" SET idle_in_transaction_session_timeout = 200')

    result = while_locked(
        dsn, pg, table, [*command, "--dsn", dsn], lambda _pid: time.sleep(1.0)
    )  # 1 s of waiting: five times the database's statement_timeout

    assert result.returncode == 0, result.stderr
    if command[0] == "run":
        assert len(states(pg)) == 19


def test_a_connection_cut_during_the_window_read_says_what_happened_and_what_to_do(
    dsn: str, pg: psycopg.Connection
) -> None:
    insert_events(pg, [e for n in range(1, 20) for e in engaged_user(n)])

    def cut(pid: int) -> None:
        pg.execute("SELECT pg_terminate_backend(%s)", (pid,))

    result = while_locked(dsn, pg, "audience_state", ["run", "--as-of", AS_OF, "--dsn", dsn], cut)

    assert result.returncode == 1
    assert "lost the connection to PostgreSQL" in result.stderr
    assert "session mode" in result.stderr
    assert "port 5432" in result.stderr
    assert "Traceback" not in result.stderr
    assert states(pg) == {}
