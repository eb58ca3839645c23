"""The run log (``derivation_runs``) and the job lock: a lease that holds through poolers.

Every job run follows the same protocol, with nothing held across transactions (SPEC §2.12: a
transaction-mode pooler may hand each transaction to another server connection):

1. ``derive_start_run(...)`` in one short transaction: serialised per lock name by a
   transaction-level advisory lock, it marks running rows whose lease expired as ``failed``, then
   either records a ``skipped`` row (another run's lease is alive; :class:`~derive.errors.LockBusy`,
   exit 75) or inserts the ``running`` row with a lease and returns the run's secret token;
2. while the block runs, a heartbeat on its own connection extends the lease every third of its
   length (``derive_heartbeat``); a process killed with SIGKILL stops the heartbeat, its lease
   expires and the next run takes over;
3. the job finishes its run with ``derive_finish_run`` inside its own write transaction when it
   has one (:meth:`Run.finish_in`: the data and the bookkeeping commit together), or in a
   transaction of its own after the block; an error finishes it ``failed``.

Run rows are written only through those definer functions (service_role holds no INSERT, UPDATE or
DELETE on the table), and only the holder of the token can extend or finish its run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from derive.errors import ConfigError, LockBusy, SourceError
from derive.io.connect import Db

#: Seconds a run's lease lasts without a heartbeat; a killed run blocks the next one this long.
DEFAULT_LEASE_SECONDS = 60
NO_RUN = "00000000-0000-0000-0000-000000000000"


def lease_seconds() -> int:
    """The lease length: ``DERIVE_LEASE_SECONDS`` (1..86400) or :data:`DEFAULT_LEASE_SECONDS`."""
    raw = os.environ.get("DERIVE_LEASE_SECONDS", "").strip()
    if not raw:
        return DEFAULT_LEASE_SECONDS
    if not raw.isdigit() or not 1 <= int(raw) <= 86400:
        raise ConfigError(
            f"DERIVE_LEASE_SECONDS={raw!r} is not a whole number of seconds from 1 to 86400"
        )
    return int(raw)


@dataclass
class Run:
    """A running job: its id, its secret token and what it will record when it finishes."""

    run_id: str
    job: str
    token: str = ""
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: Run-log columns beyond counts: mode, full_reason, base_run_id, read_snapshot.
    extra: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    lost: threading.Event = field(default_factory=threading.Event)
    #: The last pending SQL request this run serves (``derive_requests.id``), once it has read;
    #: 0 when it serves none. A failed run marks them ``failed`` with its error.
    requests_upto: int = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase; the seconds land in ``timings[name]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 4)

    @property
    def recorded(self) -> bool:
        """Whether this run has a row in ``derivation_runs`` (dry runs have none)."""
        return self.run_id != NO_RUN

    def mark(self, db: Db) -> None:
        """Set the guard's run marker (id and token) in the open transaction of ``db``."""
        db.set_local(run_id=self.run_id, run_token=self.token)

    def finish_in(self, db: Db) -> None:
        """Finish the run ``succeeded`` inside the caller's open transaction.

        The bookkeeping then commits or rolls back with the data: a crash after the commit leaves
        the run succeeded with its counts, a crash before it leaves neither.
        """
        if not self.recorded:
            return
        _finish_statement(db, self, "succeeded", None)
        self.finished = True


def _interval(value: timedelta | None) -> str | None:
    return None if value is None else f"{int(value.total_seconds())} seconds"


def _finish_statement(db: Db, run: Run, status: str, error: str | None) -> None:
    counts = run.counts if status == "succeeded" else {"computed_before_failure": run.counts}
    db.execute(
        "SELECT derive_finish_run($1::uuid, $2, $3, $4::jsonb, $5::jsonb, $6, $7::jsonb)",
        (
            run.run_id,
            run.token,
            status,
            json.dumps(counts, default=str),
            json.dumps(run.timings),
            error,
            json.dumps(run.extra, default=str),
        ),
    )


class _Heartbeat:
    """Extends a run's lease from a thread with its own connection until stopped."""

    def __init__(self, db: Db, run: Run, lease: int) -> None:
        self._db = db
        self._run = run
        self._lease = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="derive-heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        interval = max(self._lease / 3.0, 0.2)
        conn: Db | None = None
        try:
            while not self._stop.wait(interval):
                try:
                    if conn is None:
                        conn = self._db.sibling()
                    with conn.transaction(role="service_role"):
                        alive = conn.fetch_value(
                            "SELECT derive_heartbeat($1::uuid, $2, $3::int)",
                            (self._run.run_id, self._run.token, self._lease),
                        )
                    if not alive:
                        self._run.lost.set()
                        return
                except Exception:
                    # A dropped connection: try again at the next beat (the lease has slack for
                    # two missed beats); the write's guard refuses once the lease is gone.
                    if conn is not None:
                        conn.close()
                    conn = None
        finally:
            if conn is not None:
                conn.close()


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
    """Hold the job's lease and log the run in ``derivation_runs`` around the block.

    Args:
        record: ``False`` for dry runs: no run row and no lock (a dry run only reads, from one
            snapshot, so it cannot interleave badly with a writing run).
        lock: name of the lock to hold (default: the job's own); jobs that write the same table
            share one.

    Raises:
        LockBusy: another run holds a live lease on the lock (a ``skipped`` row is recorded).
    """
    if not record:
        yield Run(run_id=NO_RUN, job=job)
        return
    lease = lease_seconds()
    payload = json.dumps(args or {}, default=str)
    with db.transaction(role="service_role"):
        run_id, token, status, holder = db.fetch_all(
            "SELECT run_id::text, token, status, holder::text"
            "  FROM derive_start_run($1, $2, $3, $4::interval, $5, $6::jsonb, $7::int)",
            (job, lock or job, as_of, _interval(lookback), rules_version, payload, lease),
        )[0]
    if status == "skipped":
        raise LockBusy(
            f"another `{lock or job}` run ({holder}) holds the lock on {db.label};"
            " this run was skipped"
        )
    run = Run(run_id=str(run_id), job=job, token=str(token))
    with _Heartbeat(db, run, lease):
        try:
            yield run
        except SourceError as exc:
            lost = not run.finished and not _lease_alive(db, run)
            if not run.finished:
                _finish_failed(db, run, f"{type(exc).__name__}: {exc}"[:2000], requests=True)
            if lost:
                raise LeaseLost(
                    f"this `{job}` run ({run.run_id}) lost its lease on {db.label} before it"
                    f" could write: no heartbeat got through for {lease} s"
                    " (DERIVE_LEASE_SECONDS), so the write was refused and nothing was kept."
                    " Behind a transaction-mode pooler the pool had no free server connection"
                    " for the heartbeat: give derive more of it (PgBouncer default_pool_size,"
                    " 3 per run), raise DERIVE_LEASE_SECONDS, or connect in session mode"
                    f" (Supabase: port 5432). ({exc})"
                ) from exc
            raise
        except Exception as exc:
            if not run.finished:
                _finish_failed(db, run, f"{type(exc).__name__}: {exc}"[:2000], requests=True)
            raise
        except BaseException as exc:
            # Ctrl-C or an exit: the run failed, its requests did not (the next run serves them).
            if not run.finished:
                _finish_failed(db, run, f"{type(exc).__name__}: {exc}"[:2000])
            raise
    if not run.finished:
        with db.transaction(role="service_role"):
            _finish_statement(db, run, "succeeded", None)
        run.finished = True


class LeaseLost(SourceError):
    """The run's lease expired (no heartbeat got through) before it wrote; its write was refused."""


def _lease_alive(db: Db, run: Run) -> bool:
    """Whether the run still holds its lease (``True`` when that cannot be told)."""
    try:
        db.rollback()
        alive = db.fetch_value(
            "SELECT status = 'running' AND lease_expires_at >= clock_timestamp()"
            "  FROM derivation_runs WHERE run_id = $1::uuid",
            (run.run_id,),
        )
        db.rollback()
    except SourceError:
        return True
    return alive is None or bool(alive)


_FAIL_REQUESTS = """
UPDATE derive_requests
   SET status = 'failed', run_id = $1::uuid, error = $2, finished_at = clock_timestamp()
 WHERE status = 'pending' AND id <= $3
"""


def _finish_failed(db: Db, run: Run, error: str, *, requests: bool = False) -> None:
    """Record the run as failed and, with ``requests``, the SQL requests it served as failed.

    The connection may be gone; the lease then expires and the next run marks the row failed
    (and serves the requests, which stay pending).
    """
    with suppress(Exception), db.transaction(role="service_role"):
        _finish_statement(db, run, "failed", error)
        if requests and run.requests_upto:
            db.execute(_FAIL_REQUESTS, (run.run_id, error, run.requests_upto))
