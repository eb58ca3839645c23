"""The run log (``derivation_runs``) and the per-job session advisory lock.

Every job run follows the same protocol:

1. take ``pg_try_advisory_lock`` for the job on the job's own connection; if another session holds
   it, record a ``skipped`` row and raise :class:`~derive.errors.LockBusy` (exit 75);
2. insert a ``running`` row (committed at once, so the audience_state guard can see it);
3. do the work; on success update the row to ``succeeded`` with counts and phase timings, on any
   error to ``failed`` with the error text; release the lock.

A process killed with SIGKILL leaves a ``running`` row behind; the lock dies with its session, and
:func:`reap_orphans` marks such rows ``failed`` at the start of the next run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from derive.errors import LockBusy
from derive.io.connect import Db

_LOCK_CLASS = 0x6476  # first key of pg_try_advisory_lock(int, int): "dv"


def lock_key(job: str) -> int:
    """Stable 31-bit key of a job's advisory lock."""
    return int.from_bytes(hashlib.sha256(job.encode()).digest()[:4], "big") & 0x7FFFFFFF


@dataclass
class Run:
    """A running job: its id and what it will record when it finishes."""

    run_id: str
    job: str
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; the seconds land in ``timings[name]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)


def _interval(value: timedelta | None) -> str | None:
    return None if value is None else f"{int(value.total_seconds())} seconds"


def reap_orphans(db: Db, job: str) -> int:
    """Mark ``running`` rows of ``job`` whose session is gone as ``failed``. Returns how many.

    Only called while holding the job's lock, so no live run of the job can be affected.
    """
    with db.transaction(role="service_role"):
        rows = db.fetch_all(
            "UPDATE derivation_runs SET status = 'failed', finished_at = clock_timestamp(),"
            " error = 'process ended without finishing (killed?)'"
            " WHERE job = $1 AND status = 'running'"
            "   AND backend_pid NOT IN (SELECT pid FROM pg_stat_activity)"
            " RETURNING run_id",
            (job,),
        )
    return len(rows)


@contextmanager
def job_run(
    db: Db,
    *,
    job: str,
    as_of: datetime,
    lookback: timedelta | None = None,
    rules_version: str | None = None,
    args: dict[str, Any] | None = None,
    record: bool = True,
    lock: str | None = None,
) -> Iterator[Run]:
    """Hold the job's lock and log the run in ``derivation_runs`` around the block.

    Args:
        record: ``False`` for dry runs: take the lock but write no run row.
        lock: name of the lock to hold (default: the job's own); jobs that write the same table
            share one.

    Raises:
        LockBusy: another session holds the job's lock (a ``skipped`` row is recorded).
    """
    key = lock_key(lock or job)
    db.rollback()
    got = db.fetch_value("SELECT pg_try_advisory_lock($1::int, $2::int)", (_LOCK_CLASS, key))
    db.commit()
    payload = json.dumps(args or {}, default=str)
    if not got:
        if record:
            with db.transaction(role="service_role"):
                db.execute(
                    "INSERT INTO derivation_runs (job, as_of, lookback, rules_version, args, status,"
                    " finished_at, error) VALUES ($1, $2, $3::interval, $4, $5::jsonb, 'skipped',"
                    " clock_timestamp(), 'another run holds the lock')",
                    (job, as_of, _interval(lookback), rules_version, payload),
                )
        raise LockBusy(f"another `{job}` run holds the lock on {db.label}; this run was skipped")
    try:
        run = Run(run_id="00000000-0000-0000-0000-000000000000", job=job)
        if record:
            reap_orphans(db, job)
            with db.transaction(role="service_role"):
                run.run_id = str(
                    db.fetch_value(
                        "INSERT INTO derivation_runs (job, as_of, lookback, rules_version, args)"
                        " VALUES ($1, $2, $3::interval, $4, $5::jsonb) RETURNING run_id::text",
                        (job, as_of, _interval(lookback), rules_version, payload),
                    )
                )
        try:
            yield run
        except BaseException as exc:
            if record:
                _finish(db, run, "failed", f"{type(exc).__name__}: {exc}"[:2000])
            raise
        if record:
            _finish(db, run, "succeeded", None)
    finally:
        db.rollback()
        db.fetch_value("SELECT pg_advisory_unlock($1::int, $2::int)", (_LOCK_CLASS, key))
        db.commit()


def _finish(db: Db, run: Run, status: str, error: str | None) -> None:
    try:
        with db.transaction(role="service_role"):
            db.execute(
                "UPDATE derivation_runs SET status = $2, finished_at = clock_timestamp(),"
                " counts = $3::jsonb, timings = $4::jsonb, error = $5 WHERE run_id = $1::uuid",
                (
                    run.run_id,
                    status,
                    json.dumps(run.counts, default=str),
                    json.dumps(run.timings),
                    error,
                ),
            )
    except Exception:
        if status == "succeeded":
            raise
        # The connection may be gone; the orphan reaper marks the row failed next time.
