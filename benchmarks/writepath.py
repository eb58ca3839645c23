"""The write path of a first full run against a plain COPY of the same rows into the same tables.

After the first run (c), the rows it wrote are exported as binary COPY files: its
``state_change_logged`` audit rows and ``validation_fail`` rows (audience_events, found by the
run id in their metadata) and its states (audience_state). Each file is then copied into the same
table of a fresh copy of the loaded database (the state (c) started from), once as the table is
and once with all its indexes dropped, each inside a transaction that is rolled back, triggers off
(``session_replication_role = replica``: a plain COPY). The job's own seconds per step come from
``derivation_runs.timings``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

#: Columns the exported rows leave to the table's defaults, as the job's inserts do.
_DEFAULTED = ("ingest_xid",)


@dataclass(frozen=True)
class Step:
    """One bulk write of the job: which rows, where, and which run timing measures it."""

    name: str
    table: str
    where: str
    timing: tuple[str, ...]


STEPS = (
    Step(
        "audit rows",
        "audience_events",
        "event_category = 'system' AND event_type = 'state_change_logged'"
        " AND metadata ->> 'run_id' = %s",
        ("write_audit",),
    ),
    Step(
        "validation_fail rows",
        "audience_events",
        "event_category = 'system' AND event_type = 'validation_fail'"
        " AND metadata ->> 'run_id' = %s",
        ("write_validation_fail", "write_rejections", "write_audit"),
    ),
    Step("states", "audience_state", "metadata ->> 'run_id' = %s", ("write_states",)),
)


@dataclass
class WriteFigure:
    """One step: rows, the job's seconds and the plain-COPY seconds with and without indexes."""

    step: str
    table: str
    rows: int
    job_seconds: float | None
    timing: str | None
    #: Rows written by the timed step: more than ``rows`` when two writes share one step.
    step_rows: int = 0
    indexed_seconds: list[float] = field(default_factory=list)
    bare_seconds: list[float] = field(default_factory=list)

    @property
    def job_rate(self) -> float | None:
        """Rows per second of the job's step (all the rows the step wrote)."""
        return self.step_rows / self.job_seconds if self.job_seconds and self.step_rows else None

    @property
    def shared(self) -> bool:
        return self.step_rows != self.rows

    @property
    def indexed(self) -> float | None:
        return statistics.median(self.indexed_seconds) if self.indexed_seconds else None

    @property
    def bare(self) -> float | None:
        return statistics.median(self.bare_seconds) if self.bare_seconds else None


@dataclass
class Export:
    """Rows of one step exported to a binary COPY file."""

    step: Step
    path: Path
    rows: int
    columns: list[str]


def _columns(conn: psycopg.Connection[Any], table: str) -> list[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0"
        " AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
        (table,),
    ).fetchall()
    return [str(r[0]) for r in rows if r[0] not in _DEFAULTED]


def export(dsn: str, run_id: str, directory: Path) -> list[Export]:
    """Write each step's rows of run ``run_id`` to ``directory`` as binary COPY files."""
    exports = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i, step in enumerate(STEPS):
            columns = _columns(conn, step.table)
            path = directory / f"write_{i}.copy"
            query = (
                f"COPY (SELECT {', '.join(columns)} FROM {step.table} WHERE {step.where})"
                " TO STDOUT (FORMAT binary)"
            )
            with conn.cursor() as cur, path.open("wb") as out:
                with cur.copy(query, (run_id,)) as copy:
                    for block in copy:
                        out.write(block)
                rows = cur.rowcount
            exports.append(Export(step, path, rows, columns))
    return exports


def _drop_indexes(conn: psycopg.Connection[Any], table: str) -> None:
    """Drop every index of ``table`` inside the current transaction (constraints by name)."""
    rows = conn.execute(
        "SELECT i.indexrelid::regclass::text, c.conname FROM pg_index i"
        " LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid"
        "  AND c.contype IN ('p', 'u', 'x')"
        " WHERE i.indrelid = %s::regclass",
        (table,),
    ).fetchall()
    for index, constraint in rows:
        if constraint:
            conn.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{constraint}" CASCADE')
        else:
            conn.execute(f"DROP INDEX {index}")


def plain_copy(dsn: str, item: Export, *, indexes: bool) -> float:
    """Seconds of ``COPY table FROM STDIN (FORMAT binary)`` of the exported rows, rolled back."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET LOCAL session_replication_role = replica")
        if not indexes:
            _drop_indexes(conn, item.step.table)
        statement = f"COPY {item.step.table} ({', '.join(item.columns)}) FROM STDIN (FORMAT binary)"
        with conn.cursor() as cur, item.path.open("rb") as data:
            start = time.perf_counter()
            with cur.copy(statement) as copy:
                while block := data.read(1 << 20):
                    copy.write(block)
            seconds = time.perf_counter() - start
        conn.rollback()
    return seconds


def job_seconds(step: Step, timings: dict[str, float]) -> tuple[str | None, float | None]:
    """The first of the step's timing names the run recorded, and its seconds."""
    for name in step.timing:
        if name in timings:
            return name, timings[name]
    return None, None


def measure(
    fresh_dsn: str, exports: list[Export], timings: dict[str, float], *, repeat: int
) -> list[WriteFigure]:
    """Plain COPY of each export into ``fresh_dsn`` ``repeat`` times, with and without indexes."""
    figures = []
    steps = [job_seconds(item.step, timings) for item in exports]
    for item, (timing, seconds) in zip(exports, steps, strict=True):
        step_rows = sum(e.rows for e, (t, _) in zip(exports, steps, strict=True) if t == timing)
        figure = WriteFigure(
            item.step.name, item.step.table, item.rows, seconds, timing, step_rows=step_rows
        )
        if item.rows:
            for _ in range(repeat):
                figure.indexed_seconds.append(plain_copy(fresh_dsn, item, indexes=True))
                figure.bare_seconds.append(plain_copy(fresh_dsn, item, indexes=False))
        figures.append(figure)
    return figures


def measure_table(
    dsn: str,
    step: Step,
    key: str,
    timings: dict[str, float],
    directory: Path,
    *,
    repeat: int,
) -> WriteFigure:
    """One job's bulk write (rows of ``step``, selected with ``key``) against a plain COPY.

    For the jobs whose first run fills an empty table (attribution_credits, metric_aggregates):
    the rows are exported, then copied back after a ``TRUNCATE`` inside a transaction that is
    rolled back (the table keeps its rows for the next cases), as the table is (indexes and
    constraints kept) and with its indexes dropped.
    """
    [item] = _export_steps(dsn, [step], key, directory)
    timing, seconds = job_seconds(step, timings)
    figure = WriteFigure(step.name, step.table, item.rows, seconds, timing, step_rows=item.rows)
    for _ in range(repeat if item.rows else 0):
        for indexes, into in ((True, figure.indexed_seconds), (False, figure.bare_seconds)):
            with psycopg.connect(dsn) as conn:
                conn.execute("SET LOCAL session_replication_role = replica")
                conn.execute(f"TRUNCATE {step.table}")
                if not indexes:
                    _drop_indexes(conn, step.table)
                statement = (
                    f"COPY {step.table} ({', '.join(item.columns)}) FROM STDIN (FORMAT binary)"
                )
                with conn.cursor() as cur, item.path.open("rb") as data:
                    start = time.perf_counter()
                    with cur.copy(statement) as copy:
                        while block := data.read(1 << 20):
                            copy.write(block)
                    into.append(time.perf_counter() - start)
                conn.rollback()
    item.path.unlink()
    return figure


def _export_steps(dsn: str, steps: list[Step], key: str, directory: Path) -> list[Export]:
    exports = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i, step in enumerate(steps):
            columns = _columns(conn, step.table)
            path = directory / f"write_{step.table}_{i}.copy"
            query = (
                f"COPY (SELECT {', '.join(columns)} FROM {step.table} WHERE {step.where})"
                " TO STDOUT (FORMAT binary)"
            )
            with conn.cursor() as cur, path.open("wb") as out:
                with cur.copy(query, (key,)) as copy:
                    for block in copy:
                        out.write(block)
                rows = cur.rowcount
            exports.append(Export(step, path, rows, columns))
    return exports
