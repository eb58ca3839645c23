"""derive through a real PgBouncer in transaction mode (Supabase's pooler, port 6543).

The fixture starts /usr/sbin/pgbouncer on a free local port (pool_mode = transaction,
default_pool_size 2, trust auth) in front of the test server and stops it afterwards. PgBouncer
refuses to run as root, so as root it runs as the ``postgres`` system user.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from derive.io.notify import Listener
from tests.db.helpers import engaged_user, hold_lease, insert_events, states
from tests.db.test_watch import Watch, insert_view, stopped_stats, wait_for_state, watch_factory

__all__ = ["watch_factory"]  # the fixture, shared with test_watch

pytestmark = pytest.mark.pgbouncer

AS_OF = "2026-06-01T12:00:00+00:00"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pooler(admin_dsn: str) -> Iterator[tuple[str, int]]:
    """(host, port) of a transaction-mode PgBouncer in front of the test server."""
    server = urlsplit(admin_dsn)
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="derive-pgbouncer-"))
    home.chmod(0o777)
    (home / "users.txt").write_text('"postgres" ""\n')
    (home / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.hostname or '127.0.0.1'} port={server.port or 5432}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {home / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 2\nmax_client_conn = 100\n"
        "ignore_startup_parameters = extra_float_digits\n"
    )
    command = ["/usr/sbin/pgbouncer", str(home / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "pgbouncer did not start"
        time.sleep(0.05)
    yield "127.0.0.1", port
    proc.terminate()
    proc.wait(timeout=30)
    if proc.stderr is not None:
        proc.stderr.close()


def via(pooler: tuple[str, int], dsn: str) -> str:
    """The same database reached through the pooler."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"postgres@{pooler[0]}:{pooler[1]}"))


def derive(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "derive.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "160", "NO_COLOR": "1", **(env or {})},
        check=False,
    )


def test_full_and_incremental_runs_through_the_pooler_equal_direct_runs(
    dsn: str, second_dsn: str, pooler: tuple[str, int]
) -> None:
    pooled = via(pooler, dsn)
    for target in (dsn, second_dsn):
        with psycopg.connect(target, autocommit=True) as conn:
            insert_events(conn, [e for n in range(1, 40) for e in engaged_user(n)])
    first = derive("run", "--dsn", pooled, "--as-of", AS_OF)
    direct = derive("run", "--dsn", second_dsn, "--as-of", AS_OF)
    assert (first.returncode, direct.returncode) == (0, 0), first.stderr + direct.stderr
    for target in (dsn, second_dsn):
        with psycopg.connect(target, autocommit=True) as conn:
            insert_events(conn, [e for n in range(40, 45) for e in engaged_user(n)])
    again = derive("run", "--dsn", pooled, "--as-of", AS_OF)
    direct = derive("run", "--dsn", second_dsn, "--as-of", AS_OF)
    assert (again.returncode, direct.returncode) == (0, 0), again.stderr + direct.stderr
    assert "incremental" in (again.stdout + again.stderr)

    with psycopg.connect(dsn) as a, psycopg.connect(second_dsn) as b:
        assert states(a) == states(b)
        assert len(states(a)) == 44


@pytest.mark.parametrize("command", [["db", "check"]])
def test_read_commands_through_the_pooler_say_what_they_say_directly(
    dsn: str, pooler: tuple[str, int], command: list[str]
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        insert_events(conn, engaged_user(1))
    assert derive("run", "--dsn", dsn, "--as-of", AS_OF).returncode == 0
    pooled = derive(*command, "--dsn", via(pooler, dsn))
    direct = derive(*command, "--dsn", dsn)
    host = urlsplit(dsn)
    assert pooled.returncode == direct.returncode == 0, pooled.stderr
    label = f"{pooler[0]}:{pooler[1]}"

    def same(text: str) -> str:  # durations since the run (lag, age) differ between calls
        return re.sub(
            r"\b\d+(\.\d+)?(ms|s|m|h|d)\b", "T", text.replace(label, f"{host.hostname}:{host.port}")
        )

    assert same(pooled.stdout) == same(direct.stdout)


def test_migrate_through_the_pooler(empty_dsn: str, pooler: tuple[str, int]) -> None:
    result = derive("db", "migrate", "--dsn", via(pooler, empty_dsn))
    assert result.returncode == 0, result.stderr
    assert derive("db", "check", "--dsn", via(pooler, empty_dsn)).returncode == 0


def test_a_run_through_the_pooler_while_another_holds_the_lease_exits_75(
    dsn: str, pg: psycopg.Connection, pooler: tuple[str, int]
) -> None:
    hold_lease(pg, "derive")
    result = derive("run", "--dsn", via(pooler, dsn), "--as-of", AS_OF)
    assert result.returncode == 75, result.stderr


def test_watch_behind_the_pooler_finds_listen_undelivered_and_polls_a_real_insert(
    dsn: str, pooler: tuple[str, int], watch_factory: Callable[..., Watch]
) -> None:
    pooled = via(pooler, dsn)
    watch = watch_factory("--dsn", pooled)
    watch.wait_for_line("LISTEN does not deliver", timeout=60)
    start = watch.wait_for_line("full run (no base run)", timeout=60)
    user = uuid.UUID(int=0xF1)

    insert_view(pooled, user)
    wait_for_state(dsn, user, timeout=60)
    watch.wait_for_line("incremental run", after=start, timeout=60)
    code = watch.terminate()

    assert code == 0
    assert not any("listening on" in line for line in watch.lines), watch.lines
    assert stopped_stats(watch)["polling"] == "True"


def test_watch_with_poll_behind_the_pooler_never_listens(
    dsn: str, pooler: tuple[str, int], watch_factory: Callable[..., Watch]
) -> None:
    pooled = via(pooler, dsn)
    watch = watch_factory("--dsn", pooled, "--poll", "1s")
    start = watch.wait_for_line("full run (no base run)", timeout=60)
    user = uuid.UUID(int=0xF2)

    insert_view(pooled, user)
    wait_for_state(dsn, user, timeout=60)
    watch.wait_for_line("incremental run", after=start, timeout=60)
    code = watch.terminate()

    assert code == 0
    assert any("polling" in line for line in watch.lines), watch.lines
    assert not any("listening on" in line for line in watch.lines), watch.lines


def test_listen_delivers_directly(dsn: str) -> None:
    listener = Listener(dsn)
    try:
        assert listener.delivers()
    finally:
        listener.close()


def test_listen_through_the_transaction_pooler_does_not_deliver(
    dsn: str, pooler: tuple[str, int]
) -> None:
    listener = Listener(via(pooler, dsn))
    try:
        assert not listener.delivers()
    finally:
        listener.close()
