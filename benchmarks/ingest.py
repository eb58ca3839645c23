"""What the incremental run's watermark, and the covering index of users' windows, cost the
application's own inserts into audience_events.

The watermark (migration 0007) is a column ``ingest_xid xid8 DEFAULT pg_current_xact_id()``, a
partial index on it and two statement-level triggers (after UPDATE, after DELETE) that record
changed users. Two copies of the same migrated, loaded database are measured side by side: one as
migrated ("with"), one with exactly those objects dropped ("without"). The statements tolerate the
objects being absent, so the same code runs on a checkout before 0007: then both copies are the
same schema and the rows say so. The covering index of users' windows (migration 0052: the index
and its small rest index) is measured the same way, as a second subject.

Two ingest shapes, both through the PostgreSQL client programs and timed as whole processes:

- single-row inserts: ``pgbench`` with a script of one ``INSERT`` per transaction (each commit
  waits for the WAL flush, as an application's would), a few thousand transactions on 2 clients;
- a bulk load: ``psql \\copy audience_events FROM`` a 100k-row CSV file, one transaction.

The single-row inserts run as ``service_role`` (the role the application writes with), so
row-level security applies as in production; the COPY runs as the connecting (super)user, as bulk
loads must: PostgreSQL refuses ``COPY FROM`` into a table whose row-level security applies to the
role. The copies are measured alternately (with, without, with, ...), so drift
of the machine during the run affects both alike: the single inserts in short rounds taking
turns, the COPYs in turns whose first copy alternates.
"""

from __future__ import annotations

import csv
import random
import re
import statistics
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import psycopg

from benchmarks.child import client_tool, timed

#: The watermark's objects, as migration 0007 creates them.
WATERMARK_COLUMN = "ingest_xid"
WATERMARK_INDEX = "audience_events_ingest_xid_idx"
WATERMARK_TRIGGERS = ("audience_events_changes_upd", "audience_events_changes_del")

#: "Without": the same database minus exactly the watermark's objects (no error when absent).
DROP_WATERMARK = (
    *(f"DROP TRIGGER IF EXISTS {name} ON audience_events" for name in WATERMARK_TRIGGERS),
    f"DROP INDEX IF EXISTS {WATERMARK_INDEX}",
    f"ALTER TABLE audience_events DROP COLUMN IF EXISTS {WATERMARK_COLUMN}",
)

#: One application insert per transaction; a new anonymous-looking session per client.
INSERT_SCRIPT = """\
INSERT INTO audience_events (user_id, session_id, event_type, event_category, event_source, metadata)
VALUES (gen_random_uuid(), 'bench-' || :client_id, 'content_view', 'engagement', 'web',
        '{"duration_seconds": 42}');
"""

COPY_COLUMNS = (
    "created_at",
    "user_id",
    "session_id",
    "event_type",
    "event_category",
    "event_source",
    "metadata",
)
#: (event_type, event_category, metadata) of the rows in the COPY file: an ordinary mix.
_EVENT_MIX = (
    ("content_view", "engagement", '{"duration_seconds": 45}'),
    ("content_view", "engagement", '{"duration_seconds": 12}'),
    ("scroll_depth_75", "engagement", '{"scroll_depth_percent": 80}'),
    ("repeat_session_30d", "retention", "{}"),
    ("content_share", "advocacy", "{}"),
    ("email_subscribe", "subscription", '{"consent_recorded": true}'),
)
APP_ROLE = "service_role"
#: Rounds of single inserts per repeat, alternating between the copies.
ROUNDS = 4
_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)


@dataclass
class InsertFigure:
    """One ingest shape on one copy: seconds and rows per second of each repeat."""

    shape: str
    variant: str
    rows: int
    seconds: list[float] = field(default_factory=list)
    rows_per_s: list[float] = field(default_factory=list)

    @property
    def median_rate(self) -> float:
        return statistics.median(self.rows_per_s)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class IngestResult:
    """The with/without figures of one scale and which watermark objects the "with" copy had."""

    figures: list[InsertFigure]
    present: list[str]
    clients: int
    transactions: int
    synchronous_commit: str
    subject: str = "watermark"

    def pair(self, shape: str) -> tuple[InsertFigure, InsertFigure] | None:
        """(with, without) of one shape."""
        found = {f.variant: f for f in self.figures if f.shape == shape}
        if "with" not in found or "without" not in found:
            return None
        return found["with"], found["without"]


#: The covering index of users' windows and its rest index, as migration 0052 creates them.
WINDOW_INDEXES = ("audience_events_user_window_idx", "audience_events_user_window_rest_idx")


def window_indexes(dsn: str) -> list[str]:
    """Which of the two window indexes exist in the database at ``dsn``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT 'index ' || relname FROM pg_class WHERE relkind = 'i' AND relname = ANY(%s)"
            " ORDER BY relname",
            (list(WINDOW_INDEXES),),
        ).fetchall()
    return [str(r[0]) for r in rows]


def drop_window_indexes(dsn: str) -> None:
    """Drop the two window indexes (a no-op where they are absent)."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        for name in WINDOW_INDEXES:
            conn.execute(f"DROP INDEX IF EXISTS {name}")


def watermark_objects(dsn: str) -> list[str]:
    """Which of the watermark's objects exist in the database at ``dsn``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT array_remove(ARRAY["
            " (SELECT 'column ' || attname FROM pg_attribute WHERE attrelid = 'audience_events'::regclass"
            "   AND attname = %s AND NOT attisdropped),"
            " (SELECT 'index ' || relname FROM pg_class WHERE relname = %s AND relkind = 'i'),"
            " (SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgname = %s"
            "   AND tgrelid = 'audience_events'::regclass),"
            " (SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgname = %s"
            "   AND tgrelid = 'audience_events'::regclass)], NULL)",
            (WATERMARK_COLUMN, WATERMARK_INDEX, *WATERMARK_TRIGGERS),
        ).fetchone()
    assert row is not None
    return [str(name) for name in row[0]]


def drop_watermark(dsn: str) -> None:
    """Drop the watermark's objects from the database at ``dsn`` (a no-op where they are absent)."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        for statement in DROP_WATERMARK:
            conn.execute(statement)


@dataclass(frozen=True)
class Subject:
    """Objects whose cost to inserts is measured: how to list them and how to drop them."""

    key: str
    objects: Callable[[str], list[str]]
    drop: Callable[[str], None]


WATERMARK = Subject("watermark", watermark_objects, drop_watermark)
WINDOW_INDEX = Subject("window_index", window_indexes, drop_window_indexes)


def write_copy_file(path: Path, rows: int, *, until: datetime, seed: int) -> None:
    """A CSV of ``rows`` ordinary events of random users in the day before ``until``."""
    rng = random.Random(seed)
    users = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(max(rows // 20, 1))]
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        for i in range(rows):
            event_type, category, metadata = rng.choice(_EVENT_MIX)
            created = until - timedelta(seconds=rng.uniform(0, 86_400))
            user = rng.choice(users)
            out.writerow(
                [created.isoformat(), user, f"s{i // 8}", event_type, category, "web", metadata]
            )


def _app_env() -> dict[str, str]:
    return {"PGOPTIONS": f"-c role={APP_ROLE}"}


def single_inserts(
    dsn: str, *, transactions: int, clients: int, script: Path
) -> tuple[float, float]:
    """``pgbench`` of one INSERT per transaction: (wall seconds, transactions per second).

    The rate is pgbench's own ``tps`` (without connection start-up).
    """
    argv = [
        client_tool("pgbench"),
        "-n",  # no vacuum of pgbench's own tables (there are none)
        "-f",
        str(script),
        "-c",
        str(clients),
        "-j",
        str(clients),
        "-t",
        str(max(transactions // clients, 1)),
        dsn,
    ]
    run = timed(argv, env=_app_env())
    match = _TPS.search(run.stdout)
    if match is None:
        raise RuntimeError(f"pgbench printed no tps line: {run.stdout[-500:]}")
    return run.seconds, float(match.group(1))


def bulk_copy(dsn: str, path: Path) -> float:
    """``psql \\copy audience_events FROM path`` (CSV, one transaction): wall seconds."""
    command = f"\\copy audience_events ({', '.join(COPY_COLUMNS)}) FROM '{path}' (FORMAT csv)"
    argv = [client_tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", command]
    return timed(argv).seconds


def measure(
    with_dsn: str,
    without_dsn: str,
    *,
    workdir: Path,
    repeat: int,
    transactions: int = 4_000,
    clients: int = 2,
    copy_rows: int = 100_000,
    until: datetime,
    seed: int,
    subject: Subject = WATERMARK,
) -> IngestResult:
    """Measure both ingest shapes on both copies, alternately; drops ``subject`` from ``without``.

    Args:
        with_dsn, without_dsn: two copies of the same migrated, loaded database.
    """
    present = subject.objects(with_dsn)
    subject.drop(without_dsn)
    script = workdir / "insert_one.sql"
    script.write_text(INSERT_SCRIPT)
    data = workdir / "events.csv"
    write_copy_file(data, copy_rows, until=until, seed=seed)
    with psycopg.connect(with_dsn, autocommit=True) as conn:
        row = conn.execute("SHOW synchronous_commit").fetchone()
    per_round = max(transactions // (clients * ROUNDS), 1) * clients
    total = per_round * ROUNDS
    figures = {
        (shape, variant): InsertFigure(shape, variant, rows)
        for shape, rows in (("single", total), ("copy", copy_rows))
        for variant in ("with", "without")
    }
    order = [("with", with_dsn), ("without", without_dsn)]
    for i in range(repeat):
        # Single inserts in short rounds, the copies taking turns (ABBA...), so that a change in
        # the machine's load during a repeat reaches both alike: per copy, the repeat's rate is
        # its rows over the sum of its rounds' insert time (pgbench's, connections excluded).
        busy = {"with": 0.0, "without": 0.0}
        wall = {"with": 0.0, "without": 0.0}
        for r in range(ROUNDS):
            for variant, dsn in order if r % 2 == 0 else order[::-1]:
                seconds, tps = single_inserts(
                    dsn, transactions=per_round, clients=clients, script=script
                )
                busy[variant] += per_round / tps
                wall[variant] += seconds
        for variant, inserting in busy.items():
            single = figures["single", variant]
            single.seconds.append(wall[variant])
            single.rows_per_s.append(total / inserting)
        # Alternate which copy goes first, so neither always meets the warmer machine.
        for variant, dsn in order if i % 2 == 0 else order[::-1]:
            seconds = bulk_copy(dsn, data)
            bulk = figures["copy", variant]
            bulk.seconds.append(seconds)
            bulk.rows_per_s.append(copy_rows / seconds)
    return IngestResult(
        figures=list(figures.values()),
        present=present,
        clients=clients,
        transactions=total,
        synchronous_commit=str(row[0]) if row else "?",
        subject=subject.key,
    )
