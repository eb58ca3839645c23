"""The read connection of a full run in shards: the primary itself, or a read replica (``--read-dsn``).

Every shard must read one state of the database, and the stored states a run diffs against must
be those the write will update. A replica's state is some past state of the primary, so before a
run reads from one it waits (up to ``DERIVE_REPLICA_WAIT``, default 60 s) until the replica has
replayed the primary's WAL up to the position the primary had once the run held its lease: from
then on the replica holds every write any earlier run committed, and the run's snapshot is taken
there (tasks import that snapshot on the same replica). A replica that does not catch up in time
is refused, never read: mixing a lagging replica's stored states with the primary's would diff
against states that are not the ones being updated.

A ``--read-dsn`` that is not in recovery must be the primary itself under another address (it
proves this by importing a snapshot exported on the primary); another server is refused.
"""

from __future__ import annotations

import os
import time

from derive.errors import SourceError, UsageError
from derive.io.connect import Db, connect, describe_dsn

DEFAULT_WAIT = 60.0
POLL_SECONDS = 0.2


def replica_wait() -> float:
    """``DERIVE_REPLICA_WAIT`` in seconds (default 60).

    Raises:
        UsageError: a value that is not a non-negative number.
    """
    text = os.environ.get("DERIVE_REPLICA_WAIT", "").strip()
    if not text:
        return DEFAULT_WAIT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UsageError(
            f"invalid DERIVE_REPLICA_WAIT {text!r}: give the seconds to wait for a lagging read"
            " replica, e.g. 60"
        )
    return value


def _connect_read(read_dsn: str) -> Db:
    try:
        return connect(read_dsn)
    except SourceError as exc:
        raise SourceError(
            str(exc).replace("(check --dsn or DERIVE_DSN)", "(check --read-dsn or DERIVE_READ_DSN)")
        ) from None


def open_reader(db: Db, read_dsn: str | None, *, wait: float | None = None) -> Db:
    """A new connection for the run's read snapshot: a sibling of ``db``, or the replica.

    Call it once the run holds its lease (``db`` is the primary, where the run writes).

    Raises:
        SourceError: the replica refuses connections, or still lags after ``wait`` seconds.
        UsageError: ``read_dsn`` is neither a replica in recovery nor the primary's database.
    """
    if not read_dsn:
        return db.sibling()
    limit = replica_wait() if wait is None else wait
    reader = _connect_read(read_dsn)
    try:
        if bool(reader.fetch_value("SELECT pg_is_in_recovery()")):
            _await_replay(db, reader, limit)
        else:
            _check_same_database(db, reader, read_dsn)
        reader.rollback()
    except BaseException:
        reader.close()
        raise
    return reader


def _await_replay(db: Db, reader: Db, limit: float) -> None:
    """Wait until the replica has replayed the primary's current WAL position."""
    target = str(db.fetch_value("SELECT pg_current_wal_lsn()::text"))
    db.rollback()
    deadline = time.monotonic() + limit
    while True:
        replayed, caught_up = reader.fetch_all(
            "SELECT pg_last_wal_replay_lsn()::text,"
            " coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, false)",
            (target,),
        )[0]
        reader.rollback()
        if caught_up:
            return
        if time.monotonic() >= deadline:
            raise SourceError(
                f"the read replica at {reader.label} (--read-dsn) has replayed WAL up to"
                f" {replayed}, behind the primary's {target} at the start of this run, and did not"
                f" catch up within {limit:g} s; nothing was read or written. A lagging replica is"
                " never read (its stored states would not be the ones this run updates): retry"
                " later, wait longer with DERIVE_REPLICA_WAIT=SECONDS, or drop --read-dsn to read"
                " from the primary"
            )
        time.sleep(POLL_SECONDS)


def _check_same_database(db: Db, reader: Db, read_dsn: str) -> None:
    """A read server not in recovery must be the primary's own database (a snapshot imports)."""
    exporter = db.sibling()
    try:
        exporter.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        exported = str(exporter.fetch_value("SELECT pg_export_snapshot()"))
        reader.rollback()
        reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        try:
            reader.execute(f"SET TRANSACTION SNAPSHOT '{exported}'")  # a server-made id
        except SourceError:
            raise UsageError(
                f"--read-dsn {describe_dsn(read_dsn)} is not a read replica of --dsn {db.label}:"
                " it is not in recovery and is not the same database. Give a streaming replica"
                " of the primary, or drop --read-dsn"
            ) from None
    finally:
        reader.rollback()
        exporter.close()
