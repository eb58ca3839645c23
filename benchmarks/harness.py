"""The measurements behind ``python -m benchmarks run``.

One scale is measured on one dataset: the project's generator fills a template database once
(``<prefix>_loaded``, fixed seed, clean data; the prefix is ``derive_bench`` unless
``--db-prefix`` says otherwise), and every measurement runs in a copy made with
``CREATE DATABASE ... TEMPLATE``, so each first run of the job starts from exactly the same bytes.
The figures:

(a) baseline: ``bench_baseline.run_batch`` (benchmarks/baseline.sql), one PL/pgSQL call per user;
(b) read floor: ``psql -c "COPY (<the job's window query>) TO STDOUT (FORMAT binary)"`` with its
    stdout on /dev/null, timed as a whole process; (b') the same COPY streamed to a Python client
    (psycopg), for comparison only;
(c) ``derive run`` on a fresh copy (every user new);
(d) ``derive run --full`` again (nothing changed);
(e) ``derive run --full --dry-run`` (``--full`` only where the CLI has it);
(f) ``derive run`` 15 minutes after the base with new events for 1 % of users
    (:mod:`benchmarks.incremental`);
(g) the same with nothing new.

Besides: the write path of a first run on a dirty dataset (so that users are rejected) against a
plain COPY of the same rows (:mod:`benchmarks.writepath`) and the watermark's cost to the
application's inserts (:mod:`benchmarks.ingest`).

The job runs as a subprocess started from a small launcher (:func:`benchmarks.child.spawn`): its
wall time is what a cron user waits for, ``os.wait4`` gives its own peak RSS (not inflated by the
harness's memory), and its ``derivation_runs`` row (or its ``--json`` output for a dry run) gives phase
timings, counts and the run's mode.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from benchmarks import incremental, ingest, rayexec, userwindows, writepath
from benchmarks.child import client_tool, spawn, timed
from derive.config import load_rules
from derive.io.connect import connect
from derive.io.migrate import migrate

HERE = Path(__file__).resolve().parent
BASELINE_SQL = HERE / "baseline.sql"

SCALES: dict[str, int] = {"S": 10_000, "M": 100_000, "L": 1_000_000}
AS_OF = datetime(2026, 6, 1, tzinfo=UTC)
LOOKBACK = timedelta(days=120)
LOOKBACK_TEXT = "120d"
SEED = 6
#: Databases are named from this prefix: ``<prefix>_loaded`` (the template), ``<prefix>`` (work).
DEFAULT_PREFIX = "derive_bench"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
#: Users in the timed sample that decides whether the full baseline fits under the time cap.
BASELINE_SAMPLE = 1_000
OTHER_JOBS = ("bench_rollup", "bench_attribution")
#: Scales at which the watermark's insert overhead is measured (each needs two database copies).
INGEST_SCALES = ("S", "M")
#: Inserts timed for the watch latency.
WATCH_REPEAT = 7
#: Scales at which the write path is measured (on a dataset of its own, generated dirty).
WRITE_SCALES = ("S", "M")
#: Single-row insert transactions and COPY rows of the insert-overhead figures.
INGEST_TRANSACTIONS = 4_000
INGEST_COPY_ROWS = 100_000

CASES: dict[str, str] = {
    "a": "(a) baseline: PL/pgSQL per user, looped",
    "b": "(b) read floor: psql COPY window TO STDOUT (binary) > /dev/null",
    "b_py": "(b') same COPY read by a Python client (psycopg); not the floor, ratios use (b)",
    "c": "(c) derive run, first run (all users new)",
    "d": "(d) derive run --full, steady state (nothing changed)",
    "e": "(e) derive run --full --dry-run (compute only)",
    "f": "(f) derive run 15 min later, 1 % of users with new events",
    "g": "(g) derive run 15 min later, nothing new",
}


class BenchError(RuntimeError):
    """A benchmark step could not run; the message says which and why."""


def log(message: str) -> None:
    """Progress on stderr, so stdout carries only the result tables."""
    sys.stderr.write(f"[{datetime.now().strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# -- results ---------------------------------------------------------------------------------------


@dataclass
class Figure:
    """Repeated measurements of one case at one scale."""

    case: str
    seconds: list[float] = field(default_factory=list)
    job_seconds: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    rows: int | None = None
    note: str = ""
    projected: bool = False
    #: ``derivation_runs.mode`` of each run (None where the run log has no such column).
    modes: list[str | None] = field(default_factory=list)
    #: The last run's ``derivation_runs.counts`` and ``full_reason``.
    counts: dict[str, Any] = field(default_factory=dict)
    full_reason: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def job_median(self) -> float | None:
        return statistics.median(self.job_seconds) if self.job_seconds else None

    @property
    def rss_max(self) -> float | None:
        return max(self.peak_rss_mb) if self.peak_rss_mb else None

    def phase_medians(self) -> dict[str, float]:
        """Median seconds of each phase over the runs that reported it, in first-seen order."""
        names: list[str] = []
        for phases in self.phases:
            names.extend(name for name in phases if name not in names)
        return {
            name: statistics.median([p[name] for p in self.phases if name in p]) for name in names
        }


@dataclass
class Agreement:
    """How the baseline's states compare with the job's after a first run on clean data."""

    compared: int
    states_equal: int
    scores_equal: int
    only_baseline: int
    only_derive: int
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.compared > 0 and self.states_equal == self.compared


@dataclass
class ScaleResult:
    """Everything measured at one scale."""

    scale: str
    users: int
    events_total: int = 0
    window_rows: int = 0
    window_bytes: int = 0
    load_seconds: float = 0.0
    users_in_window: int = 0
    #: 1-minute load average of the machine when the scale started and when it ended.
    load_avg: tuple[float, float] = (0.0, 0.0)
    figures: dict[str, Figure] = field(default_factory=dict)
    agreement: Agreement | None = None
    others: list[dict[str, Any]] = field(default_factory=list)
    #: Bulk writes of a first run on the dirty dataset against a plain COPY of the same rows.
    writes: list[writepath.WriteFigure] = field(default_factory=list)
    #: (rows, seconds) of that run's staging COPY into temp tables (``write_copy``), if recorded.
    write_staging: tuple[int, float] | None = None
    #: That run's counts.
    write_counts: dict[str, Any] = field(default_factory=dict)
    #: The watermark's cost to the application's inserts (None when not measured at this scale).
    inserts: ingest.IngestResult | None = None
    #: The covering window index's cost to the same inserts (None when not measured).
    index_inserts: ingest.IngestResult | None = None
    #: Bytes of audience_events and of each of its indexes in the loaded database.
    relation_sizes: dict[str, int] = field(default_factory=dict)
    #: Users and events appended before (f).
    tick_appended: dict[str, int] = field(default_factory=dict)
    #: Reads of N listed users' windows (benchmarks/userwindows.py), one row per N.
    user_reads: list[dict[str, Any]] = field(default_factory=list)
    #: ``derive watch --debounce 1s``: seconds from insert commit to derived row (measured once
    #: per benchmark run, on an empty database, and kept with the first scale).
    watch_latency: list[float] = field(default_factory=list)
    #: ``--executor local`` against ``--executor ray`` (None when not measured at this scale).
    ray: rayexec.RayResult | None = None

    def ratio(self, top: str, bottom: str, *, job_time: bool = False) -> float | None:
        """Median of case ``top`` over median of case ``bottom`` (None when one is missing)."""
        a, b = self.figures.get(top), self.figures.get(bottom)
        if a is None or b is None or not a.seconds or not b.seconds:
            return None
        numerator = a.job_median if job_time and a.job_median is not None else a.median
        denominator = b.job_median if job_time and b.job_median is not None else b.median
        return numerator / denominator if denominator > 0 else None


# -- databases -------------------------------------------------------------------------------------


def server_dsn(explicit: str | None = None) -> str:
    """The server to benchmark on: ``--dsn``, DERIVE_BENCH_DSN, DERIVE_DSN or the local server."""
    for candidate in (explicit, os.environ.get("DERIVE_BENCH_DSN"), os.environ.get("DERIVE_DSN")):
        if candidate:
            return candidate
    return DEFAULT_SERVER


def with_database(dsn: str, database: str) -> str:
    """The same URL pointing at another database."""
    if "://" not in dsn:
        raise BenchError(
            f"the benchmark needs a postgresql:// URL, got a key=value DSN ({dsn[:20]}...)"
        )
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@contextmanager
def admin(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """Autocommit connection to the server's maintenance database."""
    with psycopg.connect(with_database(dsn, "postgres"), autocommit=True) as conn:
        yield conn


def recreate_database(dsn: str, name: str, *, template: str | None = None) -> str:
    """Drop ``name`` if present and create it (from ``template`` when given); return its URL."""
    with admin(dsn) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        clause = f' TEMPLATE "{template}"' if template else ""
        if template and conn.info.server_version >= 150000:
            # PostgreSQL 15's default (WAL_LOG) copies through shared buffers and leaves them
            # dirty: the first run on the copy would pay for writing them out. FILE_COPY
            # checkpoints and copies the files, so a copy starts as a database at rest does.
            clause += " STRATEGY FILE_COPY"
        for attempt in range(5):
            try:
                conn.execute(f'CREATE DATABASE "{name}"{clause}')
                break
            except psycopg.errors.ObjectInUse:
                # An autovacuum worker can hold the template for a moment after a load.
                if attempt == 4:
                    raise
                time.sleep(2)
    return with_database(dsn, name)


def drop_database(dsn: str, name: str) -> None:
    """Drop ``name`` if it exists."""
    with admin(dsn) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate_database(dsn: str) -> None:
    """Apply the project's migrations to the database at ``dsn``."""
    with connect(dsn) as db:
        migrate(db)


def load_dataset(
    dsn: str,
    *,
    users: int,
    seed: int = SEED,
    as_of: datetime = AS_OF,
    dirty: bool = False,
    bursts: bool = False,
) -> dict[str, Any]:
    """Fill ``dsn`` with the project's generator (by default clean, no near-duplicate bursts)."""
    try:
        from derive.jobs.demo import load_demo_data
    except ImportError as exc:
        raise BenchError(
            "the data generator derive.jobs.demo.load_demo_data is not available in this checkout"
        ) from exc
    with connect(dsn) as db:
        summary = load_demo_data(
            db, users=users, as_of=as_of, seed=seed, dirty=dirty, bursts=bursts, rules=load_rules()
        )
        db.commit()
    return dict(summary)


def install_baseline(dsn: str) -> None:
    """Create (or replace) the bench_baseline schema, tables and functions."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(BASELINE_SQL.read_text())


def analyze(dsn: str) -> None:
    """VACUUM ANALYZE and CHECKPOINT, so every copy starts with statistics and clean pages."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


# -- (a) baseline ----------------------------------------------------------------------------------


def run_baseline(
    dsn: str, *, as_of: datetime = AS_OF, lookback: timedelta = LOOKBACK, limit: int | None = None
) -> tuple[float, int]:
    """Reset the baseline's tables and time one ``run_batch``; return (seconds, users derived)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE bench_baseline.audience_state, bench_baseline.state_log")
        start = time.perf_counter()
        row = conn.execute(
            "SELECT bench_baseline.run_batch(%s, %s, %s)", (as_of, lookback, limit)
        ).fetchone()
        seconds = time.perf_counter() - start
    assert row is not None
    return seconds, int(row[0])


def window_users(dsn: str, *, as_of: datetime = AS_OF, lookback: timedelta = LOOKBACK) -> int:
    """Users with at least one event in the lookback window (the users the baseline loops over)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT user_id) FROM audience_events WHERE user_id IS NOT NULL"
            " AND created_at >= %s AND created_at <= %s",
            (as_of - lookback, as_of),
        ).fetchone()
    assert row is not None
    return int(row[0])


def baseline_states(dsn: str) -> dict[str, tuple[str, float]]:
    """user_id -> (state, score) written by the baseline."""
    return _states(dsn, "bench_baseline.audience_state")


def derive_states(dsn: str) -> dict[str, tuple[str, float]]:
    """user_id -> (state, score) written by ``derive run``."""
    return _states(dsn, "public.audience_state")


def _states(dsn: str, table: str) -> dict[str, tuple[str, float]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT user_id::text, current_state, engagement_score::float8 FROM {table}"
        ).fetchall()
    return {str(u): (str(s), float(v)) for u, s, v in rows}


def compare_states(
    baseline: Mapping[str, tuple[str, float]], derived: Mapping[str, tuple[str, float]]
) -> Agreement:
    """Compare the two outcomes user by user.

    Users only the baseline derived are users the job rejected by a fail-safe (the seed has none,
    SPEC §2.9 item 6); they are counted, not compared.
    """
    common = baseline.keys() & derived.keys()
    differing = sorted(u for u in common if baseline[u][0] != derived[u][0])
    scores_equal = sum(1 for u in common if abs(baseline[u][1] - derived[u][1]) < 1e-9)
    return Agreement(
        compared=len(common),
        states_equal=len(common) - len(differing),
        scores_equal=scores_equal,
        only_baseline=len(baseline.keys() - derived.keys()),
        only_derive=len(derived.keys() - baseline.keys()),
        examples=[f"{u}: baseline {baseline[u][0]}, derive {derived[u][0]}" for u in differing[:5]],
    )


# -- (b) read floor --------------------------------------------------------------------------------


def window_sql() -> str:
    """The job's window query (derive.io.read.EVENTS_WINDOW_SQL)."""
    try:
        from derive.io.read import EVENTS_WINDOW_SQL
    except ImportError as exc:
        raise BenchError(
            "derive.io.read.EVENTS_WINDOW_SQL is not available in this checkout"
        ) from exc
    return EVENTS_WINDOW_SQL


def _set_window(conn: psycopg.Connection[Any], as_of: datetime, lookback: timedelta) -> None:
    conn.execute(
        "SELECT set_config('derive.window_start', %s, false),"
        " set_config('derive.as_of', %s, false)",
        ((as_of - lookback).isoformat(), as_of.isoformat()),
    )


def psql_floor(
    dsn: str,
    sql: str,
    *,
    as_of: datetime = AS_OF,
    lookback: timedelta = LOOKBACK,
    output: str = os.devnull,
) -> float:
    """Seconds of ``psql`` streaming ``COPY (sql) TO STDOUT (FORMAT binary)`` to ``output``.

    Timed as a whole process, like the job's runs. The window's bounds are session settings read
    by ``current_setting(...)``, as the job sets them (so the plan is the job's), and JIT is off,
    as in the job's read transaction.
    """
    argv = [
        client_tool("psql"),
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        dsn,
        "-c",
        "SET jit = off",
        "-c",
        f"SET derive.window_start = '{(as_of - lookback).isoformat()}'",
        "-c",
        f"SET derive.as_of = '{as_of.isoformat()}'",
        "-c",
        f"COPY ({sql}) TO STDOUT (FORMAT binary)",
    ]
    try:
        return timed(argv, stdout_to=output).seconds
    except (OSError, RuntimeError) as exc:
        raise BenchError(f"the psql read floor failed: {exc}") from exc


def read_floor(
    dsn: str, sql: str, *, as_of: datetime = AS_OF, lookback: timedelta = LOOKBACK
) -> tuple[float, int]:
    """Time ``COPY (sql) TO STDOUT (FORMAT binary)`` streamed to this client; (seconds, bytes).

    Not the floor (psql's is, :func:`psql_floor`): psycopg's per-block overhead makes it slower.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        _set_window(conn, as_of, lookback)
        received = 0
        start = time.perf_counter()
        with conn.cursor() as cur, cur.copy(f"COPY ({sql}) TO STDOUT (FORMAT binary)") as copy:
            for block in copy:
                received += len(block)
        seconds = time.perf_counter() - start
    return seconds, received


def window_rows(
    dsn: str, sql: str, *, as_of: datetime = AS_OF, lookback: timedelta = LOOKBACK
) -> int:
    """Rows the window query returns."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        _set_window(conn, as_of, lookback)
        row = conn.execute(f"SELECT count(*) FROM ({sql}) AS w").fetchone()
    assert row is not None
    return int(row[0])


# -- (c)-(e) derive run ----------------------------------------------------------------------------


@dataclass
class DeriveRun:
    """One ``derive run`` subprocess."""

    seconds: float
    peak_rss_mb: float
    job_seconds: float | None
    phases: dict[str, float]
    counts: dict[str, Any]
    run_id: str | None = None
    mode: str | None = None
    full_reason: str | None = None


def derive_command() -> list[str]:
    """How to start the CLI: the console script next to this interpreter, else ``-c``."""
    script = Path(sys.executable).with_name("derive")
    if script.exists():
        return [str(script)]
    found = shutil.which("derive")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from derive.cli import main; sys.exit(main())"]


def _find(payload: Any, key: str) -> Any:
    """The first value under ``key`` anywhere in a JSON document."""
    if isinstance(payload, dict):
        if key in payload:
            return payload[key]
        for value in payload.values():
            found = _find(value, key)
            if found is not None:
                return found
    elif isinstance(payload, list):
        for value in payload:
            found = _find(value, key)
            if found is not None:
                return found
    return None


def _numeric(mapping: Any) -> dict[str, float]:
    if not isinstance(mapping, dict):
        return {}
    return {str(k): float(v) for k, v in mapping.items() if isinstance(v, int | float)}


@functools.cache
def has_full_flag() -> bool:
    """Whether this checkout's ``derive run`` takes ``--full`` (it has incremental runs)."""
    done = subprocess.run(
        [*derive_command(), "run", "--help"], capture_output=True, text=True, check=False
    )
    return "--full" in done.stdout


def run_derive(
    dsn: str,
    *,
    as_of: datetime = AS_OF,
    lookback: str = LOOKBACK_TEXT,
    dry_run: bool = False,
    full: bool = False,
    extra: Sequence[str] = (),
) -> DeriveRun:
    """Run ``derive run --json`` as a child process and collect its wall time, RSS and timings.

    Args:
        full: pass ``--full`` where the CLI has it (a checkout without incremental runs always
            runs full, and has no such flag).

    Raises:
        BenchError: when the command exits non-zero (its stderr tail is in the message).
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        started_row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert started_row is not None
    argv = [
        *derive_command(),
        "run",
        "--dsn",
        dsn,
        "--as-of",
        as_of.isoformat(),
        "--lookback",
        lookback,
        "--json",
    ]
    if dry_run:
        argv.append("--dry-run")
    if full and has_full_flag():
        argv.append("--full")
    argv.extend(extra)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = spawn(argv, stdout=out, stderr=err, env=None)
        seconds = child.seconds
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if child.exit_code != 0:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-8:])
        raise BenchError(
            f"`derive run{' --dry-run' if dry_run else ''}` exited {child.exit_code}:\n{tail}"
        )
    try:
        payload: Any = json.loads(stdout)
    except json.JSONDecodeError:
        payload = {}
    phases = _numeric(_find(payload, "timings"))
    counts = _find(payload, "counts") or {}
    job_seconds: float | None = None
    run_id = mode = full_reason = None
    with psycopg.connect(dsn, autocommit=True) as conn:
        # to_jsonb(r): columns a newer run log adds (mode, full_reason) are read when present.
        row = conn.execute(
            "SELECT extract(epoch FROM finished_at - started_at)::float8, timings, counts,"
            " run_id::text, to_jsonb(r) ->> 'mode', to_jsonb(r) ->> 'full_reason'"
            " FROM derivation_runs r WHERE job = 'derive' AND started_at >= %s"
            " ORDER BY started_at DESC LIMIT 1",
            (started_row[0],),
        ).fetchone()
    if row is not None and not dry_run:
        job_seconds = float(row[0]) if row[0] is not None else None
        phases = _numeric(row[1]) or phases
        counts = row[2] or counts
        run_id, mode, full_reason = row[3], row[4], row[5]
    return DeriveRun(
        seconds=seconds,
        peak_rss_mb=child.peak_rss_mb,
        job_seconds=job_seconds,
        phases=phases,
        counts=dict(counts) if isinstance(counts, dict) else {},
        run_id=run_id,
        mode=mode,
        full_reason=full_reason,
    )


def _add(figure: Figure, run: DeriveRun) -> None:
    figure.seconds.append(run.seconds)
    figure.peak_rss_mb.append(run.peak_rss_mb)
    if run.job_seconds is not None:
        figure.job_seconds.append(run.job_seconds)
    figure.phases.append(run.phases)
    figure.modes.append(run.mode)
    figure.counts = run.counts
    figure.full_reason = run.full_reason


# -- one scale -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    """The databases one benchmark run (re)creates, all named from one prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def loaded(self) -> str:
        return f"{self.prefix}_loaded"

    @property
    def work(self) -> str:
        return self.prefix

    def scratch(self, purpose: str) -> str:
        return f"{self.prefix}_{purpose}"


def prepare(server: str, result: ScaleResult, names: Names = Names()) -> None:
    """Build the loaded template database of this scale."""
    loaded = recreate_database(server, names.loaded)
    migrate_database(loaded)
    log(f"{result.scale}: generating {result.users:,} users (seed {SEED}, clean, no bursts)")
    start = time.perf_counter()
    summary = load_dataset(loaded, users=result.users)
    install_baseline(loaded)
    analyze(loaded)
    result.load_seconds = time.perf_counter() - start
    with psycopg.connect(loaded, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM audience_events").fetchone()
        sizes = conn.execute(
            "SELECT 'audience_events', pg_relation_size('audience_events')"
            " UNION ALL SELECT indexrelname, pg_relation_size(indexrelid)"
            " FROM pg_stat_user_indexes WHERE relname = 'audience_events'"
        ).fetchall()
    result.events_total = int(row[0]) if row else 0
    result.relation_sizes = {str(name): int(size) for name, size in sizes}
    log(
        f"{result.scale}: loaded {result.events_total:,} events"
        f" in {result.load_seconds:.1f} s: {summary}"
    )


def measure_baseline(
    work: str, result: ScaleResult, *, repeat: int, cap: float
) -> dict[str, tuple[str, float]]:
    """(a): a timed sample first; the full loop ``repeat`` times unless projected beyond ``cap``."""
    figure = Figure("a")
    sample_s, sampled = run_baseline(work, limit=BASELINE_SAMPLE)
    users = window_users(work)
    result.users_in_window = users
    projected = sample_s * users / max(sampled, 1)
    log(
        f"{result.scale}: baseline sample of {sampled} users took {sample_s:.2f} s,"
        f" projected for all: {projected:.0f} s"
    )
    if projected > cap:
        figure.seconds = [projected]
        figure.projected = True
        figure.note = (
            f"projected from a {sampled}-user sample ({sample_s:.1f} s): over the {cap:.0f} s cap,"
            " full loop skipped"
        )
        result.figures["a"] = figure
        return {}
    for i in range(repeat):
        seconds, users = run_baseline(work)
        figure.seconds.append(seconds)
        log(f"{result.scale}: (a) run {i + 1}/{repeat}: {seconds:.2f} s ({users:,} users)")
    figure.rows = users
    figure.note = f"{users:,} calls, one per user"
    result.figures["a"] = figure
    return baseline_states(work)


def measure_floor(work: str, result: ScaleResult, *, repeat: int) -> None:
    """(b) psql to /dev/null and (b') the Python client, alternately, after one untimed psql
    pass: the work database is a fresh file copy, and the first scan of it would also time
    reading its files into the page cache, which the job's runs (on a warm cache) never pay; a
    slower floor would flatter every ratio to it."""
    sql = window_sql()
    floor, python = Figure("b"), Figure("b_py")
    warm = psql_floor(work, sql)
    log(f"{result.scale}: (b) warm-up pass (untimed): psql {warm:.2f} s")
    for i in range(repeat):
        floor.seconds.append(psql_floor(work, sql))
        seconds, received = read_floor(work, sql)
        python.seconds.append(seconds)
        result.window_bytes = received
        log(
            f"{result.scale}: (b) run {i + 1}/{repeat}: psql {floor.seconds[-1]:.2f} s,"
            f" Python client {seconds:.2f} s, {received / 2**20:.0f} MiB"
        )
    result.window_rows = window_rows(work, sql)
    floor.rows = python.rows = result.window_rows
    floor.note = f"{result.window_rows:,} rows, {result.window_bytes / 2**20:.0f} MiB"
    python.note = "psycopg `cursor.copy`, blocks counted and discarded"
    result.figures["b"] = floor
    result.figures["b_py"] = python


def measure_ticks(server: str, result: ScaleResult, names: Names, *, repeat: int) -> None:
    """(f) and (g): each repeat on a fresh copy of the base, the work database after (d).

    The work database itself is never changed here, so it serves as the template (a copy fewer,
    which matters for disk space at L).
    """
    base = names.work
    tick = names.scratch("tick")
    as_of = AS_OF + incremental.TICK
    try:
        for case, appends in (("f", True), ("g", False)):
            figure = Figure(case)
            for i in range(repeat):
                dsn = recreate_database(server, tick, template=base)
                if appends:
                    result.tick_appended = incremental.append_recent_events(
                        dsn, since=AS_OF, until=as_of, seed=SEED
                    )
                run = run_derive(dsn, as_of=as_of)
                _add(figure, run)
                log(
                    f"{result.scale}: ({case}) run {i + 1}/{repeat}: {run.seconds:.2f} s,"
                    f" in-job {run.job_seconds or 0:.2f} s, RSS {run.peak_rss_mb:.0f} MiB,"
                    f" mode {run.mode or 'not recorded'}"
                )
            figure.note = _counts_note(figure.counts)
            if appends:
                appended = result.tick_appended
                figure.note = (
                    f"{appended.get('events', 0):,} events of {appended.get('users', 0):,} users"
                    f" appended in ({AS_OF:%H:%M}, {as_of:%H:%M}]; {figure.note}"
                )
            result.figures[case] = figure
    finally:
        drop_database(server, tick)


def measure_writes(
    server: str, result: ScaleResult, names: Names, *, repeat: int, scratch: Path
) -> None:
    """The write-path table: a first run on the dirty dataset against a plain COPY of its rows.

    The dirty dataset (invalid rows, near-duplicate bursts) makes the job reject users, so all
    three bulk writes have rows. Each first run starts from a fresh copy of it, as (c) does.
    """
    loaded_name, run_name, fresh_name = (
        names.scratch(p) for p in ("dirty_loaded", "dirty", "writefloor")
    )
    try:
        loaded = recreate_database(server, loaded_name)
        migrate_database(loaded)
        log(f"{result.scale}: generating the dirty dataset for the write path")
        load_dataset(loaded, users=result.users, dirty=True, bursts=True)
        analyze(loaded)
        first = Figure("write")
        for i in range(repeat):
            dsn = recreate_database(server, run_name, template=loaded_name)
            run = run_derive(dsn)
            _add(first, run)
            log(f"{result.scale}: write path, first run {i + 1}/{repeat}: {run.seconds:.2f} s")
        if run.run_id is None:
            raise BenchError("the write path's first run recorded no run row")
        exports = writepath.export(dsn, run.run_id, scratch)
        timings = first.phase_medians()  # every repeat writes the same rows: median seconds
        fresh = recreate_database(server, fresh_name, template=loaded_name)
        result.writes = writepath.measure(fresh, exports, timings, repeat=repeat)
        result.write_counts = first.counts
    finally:
        for name in (fresh_name, run_name, loaded_name):
            drop_database(server, name)
    if "write_copy" in timings:
        result.write_staging = (sum(e.rows for e in exports), timings["write_copy"])
    for figure in result.writes:
        log(
            f"{result.scale}: write path {figure.step}: {figure.rows:,} rows,"
            f" job {figure.job_seconds or 0:.2f} s, plain COPY {figure.indexed or 0:.2f} s"
            f" (no indexes {figure.bare or 0:.2f} s)"
        )


def measure_inserts(
    server: str, result: ScaleResult, names: Names, *, repeat: int, scratch: Path
) -> None:
    """What the watermark, then the covering window index, cost single-row inserts and a
    100k-row COPY (two fresh copies each)."""
    for subject in (ingest.WATERMARK, ingest.WINDOW_INDEX):
        pair = {v: names.scratch(f"ingest_{v}") for v in ("with", "without")}
        try:
            dsns = {
                v: recreate_database(server, name, template=names.loaded)
                for v, name in pair.items()
            }
            measured = ingest.measure(
                dsns["with"],
                dsns["without"],
                workdir=scratch,
                repeat=repeat,
                transactions=INGEST_TRANSACTIONS,
                copy_rows=INGEST_COPY_ROWS,
                until=AS_OF,
                seed=SEED,
                subject=subject,
            )
        except (OSError, RuntimeError) as exc:
            raise BenchError(f"the insert-overhead benchmark failed: {exc}") from exc
        finally:
            for name in pair.values():
                drop_database(server, name)
        if subject is ingest.WATERMARK:
            result.inserts = measured
        else:
            result.index_inserts = measured
        for shape in ("single", "copy"):
            found = measured.pair(shape)
            if found:
                w, wo = found
                log(
                    f"{result.scale}: inserts ({shape}): with {subject.key}"
                    f" {w.median_rate:,.0f} rows/s, without {wo.median_rate:,.0f} rows/s"
                )


def measure_scale(
    server: str,
    scale: str,
    *,
    repeat: int,
    baseline_cap: float,
    with_others: bool,
    names: Names = Names(),
) -> ScaleResult:
    """All measurements of one scale (see the module docstring)."""
    result = ScaleResult(scale=scale, users=SCALES[scale])
    load_at_start = os.getloadavg()[0]
    window_sql()  # fail before generating data when the checkout lacks the query
    prepare(server, result, names)
    work = recreate_database(server, names.work, template=names.loaded)

    measure_floor(work, result, repeat=repeat)
    baseline = measure_baseline(work, result, repeat=repeat, cap=baseline_cap)

    with tempfile.TemporaryDirectory(prefix="derive-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        first = Figure("c")
        for i in range(repeat):
            work = recreate_database(server, names.work, template=names.loaded)
            run = run_derive(work)
            _add(first, run)
            log(
                f"{scale}: (c) run {i + 1}/{repeat}: {run.seconds:.2f} s,"
                f" RSS {run.peak_rss_mb:.0f} MiB"
            )
        first.note = _counts_note(run.counts)
        result.figures["c"] = first
        if baseline:
            result.agreement = compare_states(baseline, derive_states(work))
        # (d) and (e) meet the database as a cron run 15 minutes later would: vacuumed and
        # analysed. Without this, autovacuum of the rows (c) just wrote races the timed runs.
        analyze(work)

        # Full runs: with incremental runs in the checkout, (d) would otherwise be incremental.
        for case, dry in (("d", False), ("e", True)):
            figure = Figure(case)
            for i in range(repeat):
                run = run_derive(work, dry_run=dry, full=True)
                _add(figure, run)
                log(
                    f"{scale}: ({case}) run {i + 1}/{repeat}: {run.seconds:.2f} s,"
                    f" RSS {run.peak_rss_mb:.0f} MiB"
                )
            figure.note = _counts_note(run.counts)
            result.figures[case] = figure

        if scale in rayexec.RAY_SCALES:
            result.ray = rayexec.measure(work, run=run_derive, repeat=repeat, log=log, scale=scale)

        measure_ticks(server, result, names, repeat=repeat)
        result.user_reads = userwindows.measure(
            work, as_of=AS_OF, lookback=LOOKBACK, users=result.users, repeat=repeat
        )
        for row in result.user_reads:
            log(
                f"{scale}: --user read of {row['users']:,} users: {row['read_s']:.3f} s,"
                f" dry run {row['dry_run_s']:.3f} s"
            )
        if scale in WRITE_SCALES:
            measure_writes(server, result, names, repeat=repeat, scratch=scratch)
        if scale in INGEST_SCALES:
            measure_inserts(server, result, names, repeat=repeat, scratch=scratch)

    result.load_avg = (load_at_start, os.getloadavg()[0])
    if with_others:
        others = measure_others(server, scale, names)
        # A row carrying "write" is a bulk write of that job against its plain COPY: it goes to
        # the write-path table with the derive run's own writes.
        result.writes.extend(row["write"] for row in others if "write" in row)
        result.others = [row for row in others if "write" not in row]
    return result


def _counts_note(counts: Mapping[str, Any]) -> str:
    keys = ("events_read", "users_evaluated", "users_changed", "audit_rows")
    shown = [f"{k}={counts[k]:,}" for k in keys if isinstance(counts.get(k), int)]
    return ", ".join(shown)


def measure_others(
    server: str, scale: str, names: Names = Names(), *, jobs: Sequence[str] = OTHER_JOBS
) -> list[dict[str, Any]]:
    """Rows of the other jobs' benchmark modules (``jobs``: which of :data:`OTHER_JOBS`), each on
    its own fresh migrated database."""
    rows: list[dict[str, Any]] = []
    for name in jobs:
        if not (HERE / f"{name}.py").exists():
            log(f"{scale}: benchmarks/{name}.py not present, skipped")
            continue
        module = importlib.import_module(f"benchmarks.{name}")
        measure: Callable[..., list[dict[str, Any]]] = module.measure
        database = names.scratch(name.removeprefix("bench_"))
        dsn = recreate_database(server, database)
        migrate_database(dsn)
        log(f"{scale}: measuring benchmarks/{name}.py")
        job = name.removeprefix("bench_")
        try:
            rows.extend({"job": job, **row} for row in measure(dsn, scale=scale))
        except Exception as exc:
            # Another job's benchmark failing must not discard the derive figures already taken.
            log(f"{scale}: benchmarks/{name}.py failed: {exc}")
            rows.append({"job": job, "case": "—", "note": f"failed: {type(exc).__name__}: {exc}"})
        finally:
            drop_database(server, database)
    return rows


def run(
    scales: list[str],
    *,
    dsn: str | None = None,
    repeat: int = 3,
    baseline_cap: float = 1800.0,
    with_others: bool = True,
    prefix: str = DEFAULT_PREFIX,
) -> list[ScaleResult]:
    """Measure every scale in order on the server named by ``dsn`` (see :func:`server_dsn`)."""
    server = server_dsn(dsn)
    names = Names(prefix)
    results = []
    for scale in scales:
        results.append(
            measure_scale(
                server,
                scale,
                repeat=repeat,
                baseline_cap=baseline_cap,
                with_others=with_others,
                names=names,
            )
        )
    if results:
        from benchmarks import watchlatency  # it imports this module

        results[0].watch_latency = watchlatency.measure(server, repeat=WATCH_REPEAT, debounce=1.0)
        log(f"watch latency (--debounce 1s): {sorted(results[0].watch_latency)}")
    return results
