"""derive through a real PgBouncer in transaction mode (Supabase's pooler, port 6543).

The fixture starts /usr/sbin/pgbouncer on a free local port (pool_mode = transaction,
default_pool_size 2, trust auth) in front of the test server and stops it afterwards. PgBouncer
refuses to run as root, so as root it runs as the ``postgres`` system user.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from derive.io.notify import Listener
from tests.db.helpers import engaged_user, hold_lease, insert_events, states
from tests.db.test_hosted import start, waiting_backend
from tests.db.test_sql_entry_points import as_service_role, quiet_insert, wait_done
from tests.db.test_watch import Watch, insert_view, stopped_stats, wait_for_state, watch_factory

__all__ = ["watch_factory"]  # the fixture, shared with test_watch

pytestmark = pytest.mark.pgbouncer

AS_OF = "2026-06-01T12:00:00+00:00"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def pgbouncer(admin_dsn: str, *settings: str) -> Iterator[tuple[str, int]]:
    """(host, port) of a transaction-mode PgBouncer in front of the test server, until exit.

    ``settings``: extra ``key = value`` lines of its [pgbouncer] section.
    """
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
        + "".join(f"{line}\n" for line in settings)
    )
    command = ["/usr/sbin/pgbouncer", str(home / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "pgbouncer did not start"
            time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def pooler(admin_dsn: str) -> Iterator[tuple[str, int]]:
    """(host, port) of a transaction-mode PgBouncer (default_pool_size 2) for the module."""
    with pgbouncer(admin_dsn) as address:
        yield address


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


# -- every batch command through the pooler, compared with the same commands direct ------------------

OWNER = "aaaaaaaa-0000-4000-8000-000000000001"
PROSPECT = "aaaaaaaa-0000-4000-8000-0000000000f1"
METRICS = {
    "surface": "tryst",
    "rows": [
        {
            "metric_kind": kind,
            "window_start": "2026-05-30T00:00:00Z",
            "window_end": "2026-05-31T00:00:00Z",
            "value_numeric": value,
        }
        for kind, value in (("profile_view", 120), ("dm_inbound", 7))
    ],
    "next_poll_after_ms": 900_000,
    "health_note": "ok",
}
TOUCHPOINTS = [
    {
        "user_id": OWNER,
        "prospect_id": PROSPECT,
        "surface": surface,
        "touchpoint": kind,
        "external_id": external,
        "occurred_at": at,
        **({"payload": {"amount": 40, "currency": "USD"}} if kind == "tip" else {}),
    }
    for surface, kind, external, at in (
        ("x", "profile_view", "t1", "2026-05-20T10:00:00Z"),
        ("tryst", "dm_inbound", "t2", "2026-05-28T10:00:00Z"),
        ("tryst", "tip", "t3", "2026-05-31T10:00:00Z"),
    )
]
# What each table holds, without ids, run ids and wall-clock times.
CONTENT = {
    "surface_metrics": "SELECT user_id, surface, metric_kind::text, window_start, window_end,"
    " value_numeric, value_text, currency, source FROM surface_metrics ORDER BY 1, 2, 3, 4",
    "metric_aggregates": "SELECT user_id, metric_kind::text, window_start, window_end,"
    " value_numeric, currency, surfaces_included, surface_breakdown FROM metric_aggregates"
    " ORDER BY 1, 2, 3, 4",
    "prospect_touchpoints": "SELECT user_id, prospect_id, surface, touchpoint::text, external_id,"
    " occurred_at, payload_jsonb, ingestion_source FROM prospect_touchpoints ORDER BY external_id",
    "attribution_credits": "SELECT c.external_id, t.external_id, a.surface, a.model, a.weight,"
    " a.attributed_value, a.currency FROM attribution_credits a"
    " JOIN prospect_touchpoints c ON c.id = a.conversion_id"
    " LEFT JOIN prospect_touchpoints t ON t.id = a.touchpoint_id ORDER BY 1, 4, 2 NULLS FIRST",
    "audience_state": "SELECT user_id, current_state, engagement_score, last_event_type,"
    " last_activity_at, metadata - 'run_id' - 'last_audit_id' FROM audience_state ORDER BY user_id",
}
_VOLATILE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # run ids
    r"|\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?"  # wall-clock times
    r"|\b\d+:\d+:[\d,]*"  # read snapshots (transaction ids are cluster-wide)
    r"|\b\d+\.\d+\b|\b\d+(\.\d+)?(ms|s|m|h|d)\b"  # durations, timings, lags
)


def scrub(text: str, *names: str) -> str:
    for name in names:
        text = text.replace(name, "DB")
    return _VOLATILE.sub("T", text)


def content(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    with psycopg.connect(dsn) as conn:
        return {table: conn.execute(sql).fetchall() for table, sql in CONTENT.items()}


def test_every_batch_command_through_the_pooler_equals_the_same_command_direct(
    dsn: str, second_dsn: str, pooler: tuple[str, int], tmp_path: Path
) -> None:
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps(METRICS) + "\n")
    touchpoints = tmp_path / "touchpoints.jsonl"
    touchpoints.write_text("".join(json.dumps(t) + "\n" for t in TOUCHPOINTS))
    outputs: list[dict[str, str]] = []
    for page, target in enumerate((via(pooler, dsn), second_dsn)):
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO users (id, attribution_salt) VALUES (%s, %s)", (OWNER, bytes(32))
            )
            conn.execute("INSERT INTO prospects (id, user_id) VALUES (%s, %s)", (PROSPECT, OWNER))
            insert_events(conn, [e for n in range(1, 30) for e in engaged_user(n)])
        said: dict[str, str] = {}
        for name, command in {
            "ingest metrics": ["ingest", "metrics", str(metrics), "--user", OWNER, "--json"],
            "ingest touchpoints": ["ingest", "touchpoints", str(touchpoints), "--json"],
            "run": ["run", "--as-of", AS_OF],
            "rollup": ["rollup"],  # now: the metrics were fetched now, after AS_OF
            "attribution": ["attribution", "--as-of", AS_OF],
            "status": ["status", "--json"],
            "report": ["report", "--as-of", AS_OF, "--out", str(tmp_path / f"report{page}.html")],
        }.items():
            result = derive(*command, "--dsn", target)
            assert result.returncode == 0, f"{name} via {target}: {result.stderr}"
            said[name] = re.sub(r"report\d\.html \([\d,]+ bytes\)", "report", result.stdout)
        # The page's tables (the charts' geometry follows the runs' durations).
        said["page"] = "\n".join(
            re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", (tmp_path / f"report{page}.html").read_text())
        )
        outputs.append(said)

    names = [urlsplit(d).path.lstrip("/") for d in (dsn, second_dsn)]
    labels = [f"{pooler[0]}:{pooler[1]}", "127.0.0.1:5432"]
    pooled, direct = content(dsn), content(second_dsn)
    assert pooled == direct
    assert all(pooled.values()), {t: len(rows) for t, rows in pooled.items()}
    assert outputs[0]["page"].count("\n") > 10  # the page's tables, not nothing
    for name in outputs[0]:
        assert scrub(outputs[0][name], *names, *labels) == scrub(
            outputs[1][name], *names, *labels
        ), name


# -- the lease through the pooler: overlap, kill -9 ------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_two_overlapping_runs_through_the_pooler_one_succeeds_the_other_exits_75(
    dsn: str, pg: psycopg.Connection, pooler: tuple[str, int], mode: str
) -> None:
    pooled = via(pooler, dsn)
    base = 0
    if mode == "incremental":  # a base, then candidates enough for a read in two halves
        base = 200  # (and few enough of the stored users for no whole-window read)
        insert_events(pg, [e for n in range(1000, 1000 + base) for e in engaged_user(n)])
        assert derive("run", "--as-of", AS_OF, "--dsn", dsn).returncode == 0
        pg.execute("ANALYZE audience_state")
    insert_events(pg, [e for n in range(1, 71) for e in engaged_user(n)])
    with psycopg.connect(dsn) as locker:  # holds the first run inside its read
        locker.execute("LOCK TABLE audience_state IN ACCESS EXCLUSIVE MODE")
        first = start("run", "--as-of", AS_OF, "--dsn", pooled)
        waiting_backend(pg)  # the first run holds the lease and waits in its snapshot read
        second = derive("run", "--as-of", AS_OF, "--dsn", pooled)
        locker.rollback()
    _out, err = first.communicate(timeout=300)

    assert first.returncode == 0, err
    assert mode in err + _out
    assert second.returncode == 75, second.stderr
    assert "holds the lock" in second.stderr
    assert len(states(pg)) == 70 + base
    statuses = [s for (s,) in pg.execute("SELECT status FROM derivation_runs ORDER BY started_at")][
        -2:
    ]
    assert sorted(statuses) == ["skipped", "succeeded"]


LEASE = 10  # seconds: DERIVE_LEASE_SECONDS of the killed run (slack for a slow CLI start)


def test_a_run_killed_through_the_pooler_blocks_until_its_lease_expires_then_the_next_converges(
    dsn: str, second_dsn: str, pg: psycopg.Connection, pooler: tuple[str, int]
) -> None:
    rows = [e for n in range(1, 20) for e in engaged_user(n)]
    insert_events(pg, rows)
    with psycopg.connect(second_dsn, autocommit=True) as conn:
        insert_events(conn, rows)
    pooled = via(pooler, dsn)
    env = {"DERIVE_LEASE_SECONDS": str(LEASE)}
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE audience_state IN ACCESS EXCLUSIVE MODE")
        victim = start("run", "--as-of", AS_OF, "--dsn", pooled, env=env)
        waiting_backend(pg)
        victim.send_signal(signal.SIGKILL)
        victim.communicate(timeout=60)
        locker.rollback()
    blocked = derive("run", "--as-of", AS_OF, "--dsn", pooled, env=env)
    expires = pg.execute(
        "SELECT lease_expires_at FROM derivation_runs WHERE status = 'running'"
    ).fetchone()
    while pg.execute("SELECT clock_timestamp() <= %s", expires).fetchone() == (True,):
        time.sleep(0.2)  # the lease expires LEASE seconds after its last heartbeat
    after = derive("run", "--as-of", AS_OF, "--dsn", pooled, env=env)
    direct = derive("run", "--as-of", AS_OF, "--dsn", second_dsn)

    assert victim.returncode == -signal.SIGKILL
    assert blocked.returncode == 75, blocked.stderr
    assert after.returncode == 0, after.stderr
    assert direct.returncode == 0, direct.stderr
    killed = pg.execute(
        "SELECT status, error FROM derivation_runs ORDER BY started_at LIMIT 1"
    ).fetchone()
    assert killed is not None
    assert killed[0] == "failed"
    assert "lease expired" in str(killed[1])
    assert content(dsn)["audience_state"] == content(second_dsn)["audience_state"]
    assert len(states(pg)) == 19


def test_a_pooler_that_cuts_a_long_read_gets_a_message_naming_session_mode(
    admin_dsn: str, dsn: str, pg: psycopg.Connection
) -> None:
    insert_events(pg, [e for n in range(1, 20) for e in engaged_user(n)])
    with pgbouncer(admin_dsn, "query_timeout = 1") as cutting, psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE audience_state IN ACCESS EXCLUSIVE MODE")
        run = start("run", "--as-of", AS_OF, "--dsn", via(cutting, dsn))
        waiting_backend(pg)
        out, err = run.communicate(timeout=300)  # PgBouncer cuts it after 1 s of waiting
        locker.rollback()

    assert run.returncode == 1, out + err
    assert "lost the connection to PostgreSQL" in err
    assert "query_timeout" in err
    assert "port 5432" in err
    assert "Traceback" not in err
    assert states(pg) == {}


def test_a_run_whose_heartbeat_cannot_get_a_server_connection_says_its_lease_was_lost(
    admin_dsn: str, dsn: str, pg: psycopg.Connection
) -> None:
    insert_events(pg, [e for n in range(1, 20) for e in engaged_user(n)])
    env = {"DERIVE_LEASE_SECONDS": "1"}
    with pgbouncer(admin_dsn, "default_pool_size = 1") as narrow, psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE audience_state IN ACCESS EXCLUSIVE MODE")
        run = start("run", "--as-of", AS_OF, "--dsn", via(narrow, dsn), env=env)
        waiting_backend(pg)  # the run's read holds the pool's only server connection
        expires = pg.execute(
            "SELECT lease_expires_at FROM derivation_runs WHERE status = 'running'"
        ).fetchone()
        while pg.execute("SELECT clock_timestamp() <= %s", expires).fetchone() == (True,):
            time.sleep(0.2)
        locker.rollback()
        out, err = run.communicate(timeout=300)

    assert run.returncode == 1, out + err
    assert "lost its lease" in err
    assert "default_pool_size" in err
    assert states(pg) == {}


def test_a_request_through_the_pooler_is_served_by_a_polling_watcher(
    dsn: str, pooler: tuple[str, int], watch_factory: Callable[..., Watch]
) -> None:
    pooled = via(pooler, dsn)
    watch = watch_factory("--dsn", pooled, "--poll", "1s")
    watch.wait_for_line("full run (no base run)", timeout=60)
    user = uuid.UUID(int=0xF3)
    quiet_insert(pooled, user)  # no wake-up: only the request asks for the user

    with psycopg.connect(pooled, autocommit=True) as conn:
        rid = as_service_role(conn, f"derive_audience_state('{user}')")
        wait_for_state(dsn, user, timeout=60)
        wait_done(conn, count=1)
        status = conn.execute("SELECT status FROM derive_request_status(%s)", (rid,)).fetchone()
    code = watch.terminate()

    assert code == 0
    assert status == ("done",)


def test_a_full_run_in_shards_through_the_pooler_equals_a_direct_one(
    dsn: str, second_dsn: str, pooler: tuple[str, int]
) -> None:
    for target in (dsn, second_dsn):
        with psycopg.connect(target, autocommit=True) as conn:
            insert_events(conn, [e for n in range(1, 40) for e in engaged_user(n)])
    pooled = derive("run", "--full", "--shards", "3", "--as-of", AS_OF, "--dsn", via(pooler, dsn))
    direct = derive("run", "--full", "--shards", "3", "--as-of", AS_OF, "--dsn", second_dsn)

    assert (pooled.returncode, direct.returncode) == (0, 0), pooled.stderr + direct.stderr
    assert content(dsn)["audience_state"] == content(second_dsn)["audience_state"]
    assert len(content(dsn)["audience_state"]) == 39
