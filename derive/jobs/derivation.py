"""``derive run``: derive the users whose state can differ, write only the differences.

read (one snapshot) -> pure transforms (``derive.transforms.pipeline``) -> one write transaction
that also finishes the run's row. A run is one of three modes (SPEC §2.10):

- ``full``: every user in the window and every stored state (first run, ``--full``, rules or
  lookback changed, as_of before the base run, gates that are not monotone);
- ``incremental`` (the default once a base exists): only the candidate users of SPEC §2.10,
  found by index range scans, read with one join against their list;
- ``users``: the users named with ``--user``.

All three call the same :func:`~derive.transforms.pipeline.derive_states`; they differ only in
which users are read. The run holds the job's lease throughout and is logged in
``derivation_runs`` with its mode, base run, watermark and candidates per reason.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, Literal, TypeVar, cast

import polars as pl

from derive import __version__
from derive.config import STATES, Rules, format_duration, machine_memory, parse_size
from derive.errors import UsageError
from derive.io import incremental, read
from derive.io.connect import Db
from derive.io.replica import open_reader
from derive.io.runlog import job_run
from derive.io.spill import ShardSpill
from derive.io.write import StagedWrite, WriteResult, staged_write, write_derivation
from derive.jobs.executor import (
    Executor,
    LocalExecutor,
    ShardResult,
    ShardSource,
    derive_shard_task,
    largest_user,
)
from derive.schema import EVENTS, STORED_STATES, empty
from derive.transforms.monotone import non_monotone
from derive.transforms.pipeline import Derivation, derive_states
from derive.transforms.shard import ShardBounds, ShardDiff, Totals, derive_shard, shard_bounds

JOB = "derive"
T = TypeVar("T")
Mode = Literal["full", "incremental", "users"]

#: An incremental run whose candidates exceed this share of the stored users reads the whole
#: window instead (same answer, SPEC §2.10: a full run equals an incremental one; cheaper then).
FULL_READ_SHARE = 0.5


@dataclass(frozen=True)
class Plan:
    """Which users a run evaluates, and why."""

    mode: Mode
    full_reason: str | None = None
    base: incremental.BaseRun | None = None


def plan_run(
    db: Db,
    *,
    as_of: datetime,
    lookback: timedelta,
    rules: Rules,
    users: Sequence[str] = (),
    full: bool = False,
) -> Plan:
    """Decide the mode of a run from the flags, the rules and the latest base run (SPEC §2.10)."""
    if users:
        return Plan("users")
    if full:
        return Plan("full", "--full")
    problems = non_monotone(rules)
    if problems:
        return Plan("full", "rules not monotone: " + "; ".join(problems))
    base = incremental.latest_base(db, job=JOB)
    if base is None or base.read_snapshot is None:
        return Plan("full", "no base run")
    if base.rules_version != rules.tag:
        return Plan("full", f"rules tag changed ({base.rules_version} -> {rules.tag})", base)
    if base.lookback != lookback:
        was = "none" if base.lookback is None else format_duration(base.lookback)
        return Plan("full", f"lookback changed ({was} -> {format_duration(lookback)})", base)
    if as_of < base.as_of:
        return Plan(
            "full", f"as_of before the base run's ({as_of.isoformat()} < {base.as_of.isoformat()})"
        )
    return Plan("incremental", None, base)


@dataclass
class RunReport:
    """What a run read, decided and wrote; printed by the CLI and stored in ``derivation_runs``."""

    run_id: str
    as_of: datetime
    lookback: timedelta
    rules_version: str
    dry_run: bool
    mode: Mode = "full"
    full_reason: str | None = None
    base_run_id: str | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)

    @property
    def headline(self) -> str:
        """The summary's first line: mode, and why for a full run."""
        if self.mode == "full":
            return f"full run ({self.full_reason})"
        if self.mode == "users":
            return "run for the users named with --user"
        return f"incremental run (base {self.base_run_id})"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "run_id": self.run_id,
            "mode": self.mode,
            "full_reason": self.full_reason,
            "base_run_id": self.base_run_id,
            "as_of": self.as_of.isoformat(),
            "lookback": format_duration(self.lookback),
            "rules_version": self.rules_version,
            "dry_run": self.dry_run,
            "counts": self.counts,
            "timings": self.timings,
            "states_before": self.before,
            "states_after": self.after,
        }


@dataclass
class Inputs:
    """Everything a run reads, from one snapshot."""

    events: pl.DataFrame
    stored: pl.DataFrame
    recent: pl.DataFrame
    side: dict[str, int | None]
    snapshot: str
    evaluated: pl.Series | None = None  # the candidate users; None = everyone
    candidates: dict[str, int] = field(default_factory=dict)
    state_counts: dict[str, int] | None = None  # whole-table distribution (incremental runs)
    requests_upto: int = 0


class SiblingRead(Generic[T]):
    """``work`` in a thread on a new connection that adopts ``db``'s exported snapshot.

    The caller reads its own part meanwhile inside ``joined()`` (which waits for the thread
    however the block ends), then takes ``result()``: the thread's value, or its exception raised
    in the caller's thread.
    """

    def __init__(
        self, db: Db, *, exported: str, bind: Callable[[Db], None], work: Callable[[Db], T]
    ) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None

        def target() -> None:
            try:
                other = db.sibling()
                try:
                    read.begin_snapshot(other, snapshot=exported)
                    bind(other)
                    self._value = work(other)
                finally:
                    other.close()
            except BaseException as exc:  # re-raised by result()
                self._error = exc

        self._thread = threading.Thread(target=target, name="derive-sibling-read")
        self._thread.start()

    @contextmanager
    def joined(self) -> Iterator[None]:
        """Run the caller's block, then wait for the thread (also when the block raises)."""
        try:
            yield
        finally:
            self._thread.join()

    def result(self) -> T:
        """The thread's value (after :meth:`joined`)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return cast(T, self._value)


def _full_read(db: Db, *, as_of: datetime, lookback: timedelta, rules: Rules) -> Inputs:
    """The whole window on ``db`` while a sibling connection sharing the snapshot reads the rest.

    On 2 cores the overlap hides ~1 s of the 100k-user read. (Splitting the events' read itself
    over two connections was measured slower: by user or by time each slice scanned the whole
    table, and by page range, at M on a quiet machine, 3.6 s against 3.1 s for one scan, as the
    halves compete with the side reads for the 2 cores.) Behind a pooler the
    reads run one after the other on ``db``: two open transactions would take two of the pool's
    server connections for the whole read, and the lease's heartbeat or the next run would wait
    for one (with PgBouncer's default_pool_size 2, until the lease expired).
    """

    def bind(conn: Db) -> None:
        read.set_window(conn, as_of=as_of, lookback=lookback, relog_after=rules.relog_after)

    if db.proxied():
        read.begin_snapshot(db)
        bind(db)
        try:
            snapshot = incremental.read_snapshot(db)
            events = read.read_events(db)
            stored = read.read_states(db)
            recent = read.read_recent_rejections(db)
            side = read.read_side_counts(db, window_start=as_of - lookback, as_of=as_of)
            upto = incremental.pending_requests(db)
        finally:
            db.rollback()
        return Inputs(events, stored, recent, dict(side), snapshot, requests_upto=upto)

    exported = read.begin_snapshot(db)
    bind(db)

    def side_reads(conn: Db) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int | None], int]:
        return (
            read.read_states(conn),
            read.read_recent_rejections(conn),
            dict(read.read_side_counts(conn, window_start=as_of - lookback, as_of=as_of)),
            incremental.pending_requests(conn),
        )

    try:
        side_job = SiblingRead(db, exported=exported, bind=bind, work=side_reads)
        with side_job.joined():
            snapshot = incremental.read_snapshot(db)
            events = read.read_events(db)
        stored, recent, counted, upto = side_job.result()
    finally:
        db.rollback()
    return Inputs(events, stored, recent, counted, snapshot, requests_upto=upto)


class _ReadInShards(Exception):
    """An incremental run's candidates need more memory than one read may take (why, as text)."""


def _candidates_too_big(
    db: Db, *, users: int, stored_users: int, window_start: datetime, as_of: datetime, limit: int
) -> str | None:
    """Why ``users`` candidates' windows do not fit one read under ``limit``; ``None`` if they do.

    Their rows are estimated as their share of the stored users times the planner's window
    estimate (planning only), at the bytes per row a full run's shard plan assumes.
    """
    rows = read.estimate_window_rows(db, window_start=window_start, as_of=as_of)
    need = math.ceil(users / max(stored_users, 1) * rows * BYTES_PER_ROW * SAFETY)
    if need <= limit:
        return None
    return (
        f"{users} candidates: their windows (~{_mib(need)}) exceed the memory limit"
        f" ({_mib(limit)}), read in shards"
    )


def _users_read(
    db: Db,
    *,
    as_of: datetime,
    lookback: timedelta,
    rules: Rules,
    users: Sequence[str],
    plan: Plan,
    memory_limit: int | None = None,
) -> Inputs:
    """The windows of listed users (``--user``) or of the candidates (incremental), one snapshot.

    Off a pooler, a sibling connection sharing the snapshot starts at once: an incremental run's
    sibling counts the stored states while this connection finds the candidates, then both read
    half of the listed users' windows (see :class:`_ListedRead`).
    """
    parallel = not db.proxied()  # behind a pooler, one transaction at a time (see _full_read)
    incremental_run = plan.mode == "incremental"

    def bind(conn: Db) -> None:
        read.set_window(conn, as_of=as_of, lookback=lookback, relog_after=rules.relog_after)

    exported = read.begin_snapshot(db)
    listed_read: _ListedRead | None = None
    try:
        bind(db)
        if parallel and (incremental_run or len(users) >= SPLIT_READ_USERS):
            listed_read = _ListedRead(db, exported=exported, bind=bind, counts=incremental_run)
        snapshot = incremental.read_snapshot(db)
        candidates: dict[str, int] = {}
        stored_users = read.estimate_states(db)
        upto = 0
        if incremental_run:
            assert plan.base is not None
            incremental.set_bounds(
                db,
                base=plan.base,
                as_of=as_of,
                lookback=lookback,
                thresholds=tuple(d.inactivity_days for d in rules.downgrades),
            )
            upto = incremental.pending_requests(db)
            found = incremental.read_candidates(db)
            ids = found.get_column("user_id").unique().sort()
            candidates = _count_reasons(found, total=ids.len())
            too_big = _candidates_too_big(
                db,
                users=ids.len(),
                stored_users=stored_users,
                window_start=as_of - lookback,
                as_of=as_of,
                limit=memory_limit if memory_limit is not None else default_memory_limit(),
            )
            if too_big is not None:
                raise _ReadInShards(too_big)  # the caller runs full, in shards
            if ids.len() > FULL_READ_SHARE * max(stored_users, 1):
                if listed_read is not None:
                    listed_read.cancel()
                db.rollback()
                inputs = _full_read(db, as_of=as_of, lookback=lookback, rules=rules)
                inputs.candidates = candidates | {"read_whole_window": 1}
                return inputs
            listed = [bytes(u).hex() for u in ids.to_list()]
        else:
            ids = pl.Series(
                "user_id", sorted({bytes.fromhex(u.replace("-", "")) for u in users}), pl.Binary
            )
            listed = [u.hex() for u in ids.to_list()]
        lookups = len(listed) <= LOOKUP_SHARE * stored_users
        if listed_read is None:
            events, stored = _read_part(db, listed, lookups=lookups)
            state_counts = read.read_state_counts(db) if incremental_run else None
        else:
            events, stored, state_counts = listed_read.read(listed, lookups=lookups)
        recent = read.read_recent_rejections(db)
    finally:
        if listed_read is not None:
            listed_read.cancel()
        db.rollback()
    # Counted by full runs only: each is a range scan over the whole window.
    side: dict[str, int | None] = dict.fromkeys(("anonymous", "future", "system_rows_malformed"))
    return Inputs(
        events,
        stored,
        recent,
        side,
        snapshot,
        evaluated=ids,
        candidates=candidates,
        state_counts=state_counts,
        requests_upto=upto,
    )


#: Listed users from which their windows are read in two halves on two connections (sharing one
#: snapshot): each half is one index range scan per user, and the second backend runs on the
#: second core. (Measured at M, 1,170 users / 47k rows: 0.17 s -> 0.10 s; at L, 11.9k users:
#: 1.5 s -> 0.9 s.) Below it, the second half costs more than it saves.
SPLIT_READ_USERS = 64

#: Listed users, as a share of the stored ones, up to which their windows are read by index
#: lookups per user (see :func:`derive.io.read.prefer_lookups`).
LOOKUP_SHARE = 0.25


def _read_part(conn: Db, chunk: list[str], *, lookups: bool) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Events and stored states of ``chunk`` (hex uuids) in ``conn``'s open snapshot.

    With ``lookups`` the reads are index lookups per user whatever the planner estimates;
    without, the planner's choice (a scan is then cheaper).
    """
    if not chunk:
        return empty(EVENTS), empty(STORED_STATES)
    if lookups:
        read.prefer_lookups(conn)
    conn.set_local(users=",".join(chunk))
    return read.read_events(conn, users=chunk), read.read_states(conn, users=chunk)


class _ListedRead:
    """A sibling connection, started before the users to read are known.

    It counts the stored states first (``counts``: the whole table's distribution, a scan that
    would otherwise follow the listed reads), then waits for its half of the users
    (:meth:`read`). :meth:`cancel` releases a sibling still waiting (a run that reads the whole
    window instead, or an error) and waits for its thread; it is safe to call more than once.
    """

    def __init__(self, db: Db, *, exported: str, bind: Callable[[Db], None], counts: bool) -> None:
        self._db = db
        self._handoff: queue.Queue[tuple[list[str], bool] | None] = queue.Queue(maxsize=1)
        self._sent = False

        def work(conn: Db) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int] | None]:
            state_counts = read.read_state_counts(conn) if counts else None
            job = self._handoff.get()
            if job is None:
                return empty(EVENTS), empty(STORED_STATES), state_counts
            chunk, lookups = job
            return (*_read_part(conn, chunk, lookups=lookups), state_counts)

        self._job = SiblingRead(db, exported=exported, bind=bind, work=work)

    def _send(self, job: tuple[list[str], bool] | None) -> None:
        if not self._sent:
            self._sent = True
            self._handoff.put(job)

    def read(
        self, listed: list[str], *, lookups: bool
    ) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int] | None]:
        """Events, stored states and the sibling's counts; the sibling reads the second half
        from ``SPLIT_READ_USERS`` listed users on, nothing below."""
        half = len(listed) // 2 if len(listed) >= SPLIT_READ_USERS else len(listed)
        self._send((listed[half:], lookups))
        with self._job.joined():
            first_events, first_stored = _read_part(self._db, listed[:half], lookups=lookups)
        second_events, second_stored, counts = self._job.result()
        return (
            pl.concat([first_events, second_events]),
            pl.concat([first_stored, second_stored]),
            counts,
        )

    def cancel(self) -> None:
        self._send(None)
        with suppress(BaseException):
            self._job.result()


def _count_reasons(found: pl.DataFrame, *, total: int) -> dict[str, int]:
    """Distinct users per candidate reason, plus the distinct total."""
    per = found.unique().group_by("reason").len()
    counts = dict.fromkeys(incremental.REASONS, 0)
    for reason, n in per.iter_rows():
        counts[incremental.REASONS[int(reason)]] = int(n)
    counts["total"] = total
    return counts


def read_inputs(
    db: Db,
    *,
    as_of: datetime,
    lookback: timedelta,
    rules: Rules,
    users: Sequence[str] = (),
    plan: Plan | None = None,
    memory_limit: int | None = None,
) -> Inputs:
    """Everything a run of ``plan`` reads (default: a full run, or ``--user`` when users are given).

    Raises:
        _ReadInShards: an incremental plan's candidates need more than ``memory_limit``.
    """
    plan = plan or (Plan("users") if users else Plan("full", "--full"))
    if plan.mode == "full":
        return _full_read(db, as_of=as_of, lookback=lookback, rules=rules)
    return _users_read(
        db,
        as_of=as_of,
        lookback=lookback,
        rules=rules,
        users=users,
        plan=plan,
        memory_limit=memory_limit,
    )


def _counts(d: Derivation, inputs: Inputs) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "events_read": d.events_read,
        "events_invalid": d.invalid,
        "events_deduplicated": d.deduplicated,
        "events_anonymous": inputs.side["anonymous"],
        "events_future": inputs.side["future"],
        "system_rows_malformed": inputs.side["system_rows_malformed"],
        "users_evaluated": d.users_evaluated,
        "users_changed": d.writes.height,
        "state_changes": d.state_changes,
        "users_rejected": d.rejected.height,
        "rejected_by_reason": d.rejected_by_reason,
        "rejections_logged": d.to_log.height,
        "audit_rows": d.audit.height,
    }
    if inputs.candidates:
        counts["candidates"] = inputs.candidates
    return counts


def _distributions(d: Derivation, inputs: Inputs) -> tuple[dict[str, int], dict[str, int]]:
    """Whole-table state distribution before and after (a partial read amends the stored one)."""
    if inputs.state_counts is None or inputs.evaluated is None:
        return d.before, d.after
    before = {s: inputs.state_counts.get(s, 0) for s in STATES}
    after = {s: before[s] - d.before[s] + d.after[s] for s in STATES}
    return before, after


#: Peak bytes of the process per window row (measured: 1.5 GiB at M for 2.07M rows, 13.6 GiB at L
#: for 20.7M rows, ~690 bytes/row), and the margin the shard count keeps below the limit: small
#: shards cost more per row (at M, 10 shards of ~200k rows peaked at 472 MiB, ~1.1 KiB a row over
#: the interpreter's 130 MiB), and the planner's window estimate runs ~8 % low.
BYTES_PER_ROW = 700
SAFETY = 2.5
MAX_SHARDS = 4096
#: Window rows per shard at most, whatever the limit, so that a full run at any scale stays under
#: 2 GiB with the default limit (a quarter of the machine) and the per-shard sorts stay the size
#: where compute is linear. Measured at L (1M users, 20.7M window rows, --full, steady state):
#: 9 shards of ~2.3M rows peaked at 2,290 MiB RSS, 18 shards of ~1.15M rows at 1,366 MiB.
MAX_SHARD_ROWS = 1_200_000


def default_memory_limit() -> int:
    """``DERIVE_MEMORY_LIMIT`` when set, else a quarter of the machine's memory."""
    text = os.environ.get("DERIVE_MEMORY_LIMIT")
    if text:
        return parse_size(text)
    return machine_memory() // 4


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


@dataclass(frozen=True)
class ShardPlan:
    """How a full run splits its users, and the estimate it was chosen from."""

    count: int
    memory_limit: int
    estimated_rows: int
    largest_user_rows: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in the run's counts)."""
        return {
            "shards": self.count,
            "memory_limit_bytes": self.memory_limit,
            "estimated_window_rows": self.estimated_rows,
        }


def check_user_fits(rows: int, memory_limit: int) -> None:
    """A usage error when one user's window alone needs more than the limit (shards cannot help)."""
    need = rows * BYTES_PER_ROW
    if need > memory_limit:
        raise UsageError(
            f"--memory-limit {_mib(memory_limit)} is too small: one user has {rows} events in the"
            f" window (~{_mib(need)}), and a user is never split across shards; raise"
            f" --memory-limit to at least {_mib(math.ceil(need * SAFETY))}, or shorten --lookback"
        )


def plan_shards(
    db: Db,
    *,
    as_of: datetime,
    lookback: timedelta,
    memory_limit: int | None = None,
    shards: int | None = None,
) -> ShardPlan:
    """Choose the shard count: ``shards`` (or ``DERIVE_SHARDS``) when given, else from the window.

    The window's rows are the planner's estimate; rows x ``BYTES_PER_ROW`` x ``SAFETY`` divided
    by the limit, rounded up, and at least rows / ``MAX_SHARD_ROWS``.

    Raises:
        UsageError: a bad ``DERIVE_MEMORY_LIMIT``/``DERIVE_SHARDS``, or a limit smaller than the
            largest single user's window.
    """
    limit = memory_limit if memory_limit is not None else default_memory_limit()
    if shards is None and os.environ.get("DERIVE_SHARDS"):
        text = os.environ["DERIVE_SHARDS"]
        if not text.strip().isdigit() or not 1 <= int(text) <= MAX_SHARDS:
            raise UsageError(f"invalid DERIVE_SHARDS {text!r}: use a whole number 1..{MAX_SHARDS}")
        shards = int(text)
    rows, largest = read.estimate_window(db, window_start=as_of - lookback, as_of=as_of)
    db.rollback()
    check_user_fits(largest, limit)
    if shards is None:
        by_memory = math.ceil(rows * BYTES_PER_ROW * SAFETY / limit)
        shards = min(MAX_SHARDS, max(1, by_memory, math.ceil(rows / MAX_SHARD_ROWS)))
    return ShardPlan(shards, limit, rows, largest)


@dataclass
class ShardedInputs:
    """What a sharded full run reads once (the shards' rows are read one range at a time)."""

    reader: Db
    recent: pl.DataFrame
    side: dict[str, int | None]
    snapshot: str
    exported: str
    requests_upto: int
    read_dsn: str  # where the reader (and every task importing ``exported``) reads


def _open_sharded_read(
    db: Db, *, as_of: datetime, lookback: timedelta, rules: Rules, read_dsn: str | None = None
) -> ShardedInputs:
    """One REPEATABLE READ snapshot on a sibling connection, held while the shards are read.

    Every shard's read runs in that one transaction, so all shards see one consistent database
    (``exported`` lets another connection, or another process, adopt the same snapshot). With
    ``read_dsn`` the snapshot is taken on that read replica once it has caught up with the
    primary (:func:`~derive.io.replica.open_reader`).
    """
    reader = open_reader(db, read_dsn)
    try:
        exported = read.begin_snapshot(reader)
        read.set_window(reader, as_of=as_of, lookback=lookback, relog_after=rules.relog_after)
        snapshot = incremental.read_snapshot(reader)
        recent = read.read_recent_rejections(reader)
        side = read.read_side_counts(reader, window_start=as_of - lookback, as_of=as_of)
        upto = incremental.pending_requests(reader)
    except BaseException:
        reader.close()
        raise
    return ShardedInputs(reader, recent, dict(side), snapshot, exported, upto, reader.dsn)


def _read_shard(reader: Db, bounds: ShardBounds) -> tuple[pl.DataFrame, pl.DataFrame]:
    read.set_user_range(reader, bounds.lo, bounds.hi)
    span = (bounds.lo, bounds.hi)
    return read.read_events(reader, user_range=span), read.read_states(reader, user_range=span)


#: How a sharded run reads its shards: ``"ranges"``, one user_id range query per shard, or
#: ``"stream"``, one streamed read of the window partitioned on the client (spilled as Arrow IPC).
SHARD_READ = os.environ.get("DERIVE_SHARD_READ", "stream")


def _shard_inputs(
    run: Any, inputs: ShardedInputs, plan: ShardPlan
) -> Iterator[tuple[ShardBounds, pl.DataFrame, pl.DataFrame]]:
    """Each shard's (bounds, events, stored states), read in one snapshot."""
    bounds = shard_bounds(plan.count)
    if SHARD_READ == "ranges":
        for shard in bounds:
            with run.phase("read"):
                events, stored = _read_shard(inputs.reader, shard)
            yield shard, events, stored
        return
    with ShardSpill(bounds) as spill:
        with run.phase("read"):
            spill.spill("events", read.stream_events(inputs.reader), EVENTS)
            spill.spill("states", read.stream_states(inputs.reader), STORED_STATES)
        for shard in bounds:
            with run.phase("read"):
                events = spill.read("events", shard.index)
                stored = spill.read("states", shard.index)
            yield shard, events, stored


def task_memory(rows: int, count: int) -> int:
    """The memory one shard's task declares: its share of the window's rows, with the margin."""
    return math.ceil(rows / max(count, 1) * BYTES_PER_ROW * SAFETY)


def _derive_shards(
    run: Any,
    inputs: ShardedInputs,
    plan: ShardPlan,
    *,
    as_of: datetime,
    lookback: timedelta,
    rules: Rules,
    each: Any,
    executor: Executor | None = None,
    keep_stored: bool = False,
) -> Totals:
    """Read, derive and hand over (``each(diff, stored)``) every shard; sum the counts.

    The local executor reads the window once (streamed, spilled per shard) in the reader's
    snapshot and derives the shards in turn; another executor runs :func:`derive_shard_task`
    per shard, each task importing the same snapshot, and hands back the results as they come.
    """
    if executor is not None and not isinstance(executor, LocalExecutor):
        return _derive_shards_as_tasks(
            run,
            inputs,
            plan,
            as_of=as_of,
            lookback=lookback,
            rules=rules,
            each=each,
            executor=executor,
            keep_stored=keep_stored,
        )
    totals = Totals()
    for bounds, events, stored in _shard_inputs(run, inputs, plan):
        check_user_fits(largest_user(events), plan.memory_limit)
        with run.phase("compute"):
            diff = derive_shard(bounds, events, stored, inputs.recent, as_of=as_of, rules=rules)
        del events
        totals.add(diff)
        each(diff, stored)
        del stored, diff
    return totals


def _derive_shards_as_tasks(
    run: Any,
    inputs: ShardedInputs,
    plan: ShardPlan,
    *,
    as_of: datetime,
    lookback: timedelta,
    rules: Rules,
    each: Any,
    executor: Executor,
    keep_stored: bool,
) -> Totals:
    source = ShardSource(
        dsn=inputs.read_dsn,
        snapshot=inputs.exported,
        as_of=as_of,
        lookback=lookback,
        relog_after=rules.relog_after,
    )
    totals = Totals()
    tasks = {"task_read": 0.0, "task_compute": 0.0, "task_wall": 0.0}  # seconds, summed
    with run.phase("executor_start"):
        executor.connect()  # a local Ray starts here, once a run has shards for it
    put = getattr(executor, "put", lambda value: value)
    recent = put(inputs.recent.to_arrow())
    calls = (
        (source, bounds, recent, rules, keep_stored, plan.memory_limit)
        for bounds in shard_bounds(plan.count)
    )
    with run.phase("shards"):
        results = executor.map(
            derive_shard_task, calls, memory=task_memory(plan.estimated_rows, plan.count)
        )
        for result in results:
            assert isinstance(result, ShardResult)
            totals.add(result.diff)
            stored = (
                pl.DataFrame(pl.from_arrow(result.stored)) if result.stored is not None else None
            )
            each(result.diff, stored)
            tasks["task_read"] += result.read_seconds
            tasks["task_compute"] += result.compute_seconds
            tasks["task_wall"] += result.ended - result.started
            del result, stored
    run.timings.update({k: round(v, 4) for k, v in tasks.items()})
    return totals


def _stage_diff(write: StagedWrite, diff: ShardDiff) -> None:
    write.stage(
        states=diff.states,
        audit=diff.audit,
        rejections=diff.to_log,
        rejected=diff.rejected.select(["user_id", "reasons_key"]),
    )


def _totals_counts(totals: Totals, side: dict[str, int | None]) -> dict[str, Any]:
    return {
        "events_read": totals.events_read,
        "events_invalid": totals.invalid,
        "events_deduplicated": totals.deduplicated,
        "events_anonymous": side["anonymous"],
        "events_future": side["future"],
        "system_rows_malformed": side["system_rows_malformed"],
        "users_evaluated": totals.users_evaluated,
        "users_changed": totals.users_changed,
        "state_changes": totals.state_changes,
        "users_rejected": totals.users_rejected,
        "rejected_by_reason": totals.sorted_reasons(),
        "rejections_logged": totals.rejections_logged,
        "audit_rows": totals.audit_rows,
    }


def run_derivation(
    db: Db,
    *,
    as_of: datetime,
    lookback: timedelta,
    rules: Rules,
    users: Sequence[str] = (),
    dry_run: bool = False,
    full: bool = False,
    shards: int | None = None,
    memory_limit: int | None = None,
    executor: Executor | None = None,
    read_dsn: str | None = None,
) -> RunReport:
    """Run the audience-state derivation once (incremental when a base allows it).

    A full run splits its users into ``shards`` user_id ranges (default: as many as keep each
    shard's window under ``memory_limit``, see :func:`plan_shards`); the shards' rows are staged
    into one write transaction as each is derived, and applied and committed once. ``executor``
    derives the shards (default in this process; see :mod:`derive.jobs.executor`), reading from
    ``read_dsn`` (a read replica) when given; the write always goes to ``db``.

    Raises:
        LockBusy: another run holds the lease (recorded as ``skipped``; exit 75).
        UsageError: ``memory_limit`` is smaller than the largest single user's window.
    """
    args = {"users": list(users), "dry_run": dry_run, "rules": rules.source, "full": full}
    with job_run(
        db,
        job=JOB,
        as_of=as_of,
        lookback=lookback,
        rules_version=rules.tag,
        args=args,
        record=not dry_run,
    ) as run:
        plan = plan_run(db, as_of=as_of, lookback=lookback, rules=rules, users=users, full=full)

        def in_shards(plan: Plan) -> RunReport | None:
            sharding = plan_shards(
                db, as_of=as_of, lookback=lookback, memory_limit=memory_limit, shards=shards
            )
            if sharding.count == 1 and not _distributed(executor, read_dsn):
                return None
            return _sharded_run(
                db,
                run,
                plan,
                sharding,
                as_of=as_of,
                lookback=lookback,
                rules=rules,
                dry_run=dry_run,
                executor=executor,
                read_dsn=read_dsn,
            )

        if plan.mode == "full" and (report := in_shards(plan)) is not None:
            return report
        try:
            with run.phase("read"):
                inputs = read_inputs(
                    db,
                    as_of=as_of,
                    lookback=lookback,
                    rules=rules,
                    users=users,
                    plan=plan,
                    memory_limit=memory_limit,
                )
        except _ReadInShards as too_big:
            # As many candidates as a full run's users, near enough: a full run in shards is the
            # same answer (incremental == full) within the memory limit.
            plan = Plan("full", str(too_big))
            report = in_shards(plan)
            if report is not None:
                return report
            with run.phase("read"):
                inputs = read_inputs(db, as_of=as_of, lookback=lookback, rules=rules, plan=plan)
        if not dry_run and plan.mode != "users":
            run.requests_upto = inputs.requests_upto  # failed with the run if it fails
        with run.phase("compute"):
            result = derive_states(
                inputs.events, inputs.stored, inputs.recent, as_of=as_of, rules=rules
            )
        before, after = _distributions(result, inputs)
        counts = _counts(result, inputs)
        run.extra = {
            "mode": plan.mode,
            "full_reason": plan.full_reason,
            "base_run_id": plan.base.run_id if plan.base and plan.mode == "incremental" else None,
            "read_snapshot": inputs.snapshot if plan.mode != "users" else None,
        }
        if not dry_run:
            write_started = time.perf_counter()

            def finish(written: WriteResult) -> None:
                counts["users_changed"] = written.states_written
                counts["audit_rows"] = written.audit_rows
                counts["rejections_logged"] = written.validation_fail_rows
                run.counts.update(counts, states_before=before, states_after=after)
                run.timings.update(written.timings)
                run.timings["write"] = round(time.perf_counter() - write_started, 4)
                run.finish_in(db)

            write_derivation(
                db,
                run=run,
                as_of=as_of,
                derived_by=f"derive {__version__}",
                rules_version=rules.tag,
                states=result.writes,
                audit=result.audit,
                rejections=result.to_log,
                rejected=result.rejected.select("user_id", "reasons_key"),
                evaluated=inputs.evaluated,
                requests_upto=inputs.requests_upto if plan.mode != "users" else 0,
                before_commit=finish,
            )
    return RunReport(
        run_id=run.run_id,
        as_of=as_of,
        lookback=lookback,
        rules_version=rules.tag,
        dry_run=dry_run,
        mode=plan.mode,
        full_reason=plan.full_reason,
        base_run_id=run.extra["base_run_id"],
        counts=counts,
        timings=dict(run.timings),
        before=before,
        after=after,
    )


def _distributed(executor: Executor | None, read_dsn: str | None) -> bool:
    """Whether the shards are read elsewhere (tasks, a replica): then even one shard is a task."""
    return bool(read_dsn) or (executor is not None and not isinstance(executor, LocalExecutor))


def _sharded_run(
    db: Db,
    run: Any,
    plan: Plan,
    sharding: ShardPlan,
    *,
    as_of: datetime,
    lookback: timedelta,
    rules: Rules,
    dry_run: bool,
    executor: Executor | None = None,
    read_dsn: str | None = None,
) -> RunReport:
    """A full run in ``sharding.count`` user ranges, one write transaction for all of them."""
    with run.phase("read"):
        inputs = _open_sharded_read(
            db, as_of=as_of, lookback=lookback, rules=rules, read_dsn=read_dsn
        )
    if not dry_run:
        run.requests_upto = inputs.requests_upto  # failed with the run if it fails
    shard_counts = sharding.as_dict() | {"executor": executor.name if executor else "local"}
    run.extra = {
        "mode": plan.mode,
        "full_reason": plan.full_reason,
        "base_run_id": None,
        "read_snapshot": inputs.snapshot,
    }
    counts: dict[str, Any] = {}
    try:
        if dry_run:
            totals = _derive_shards(
                run,
                inputs,
                sharding,
                as_of=as_of,
                lookback=lookback,
                rules=rules,
                each=lambda _d, _s: None,
                executor=executor,
            )
            counts = _totals_counts(totals, inputs.side)
            counts["shards"] = shard_counts
        else:
            with staged_write(
                db,
                run=run,
                as_of=as_of,
                derived_by=f"derive {__version__}",
                rules_version=rules.tag,
            ) as write:
                totals = _derive_shards(
                    run,
                    inputs,
                    sharding,
                    as_of=as_of,
                    lookback=lookback,
                    rules=rules,
                    each=lambda diff, _stored: _stage_diff(write, diff),
                    executor=executor,
                )
                inputs.reader.rollback()
                counts = _totals_counts(totals, inputs.side)
                counts["shards"] = shard_counts
                write_started = time.perf_counter()

                def finish(written: WriteResult) -> None:
                    counts["users_changed"] = written.states_written
                    counts["audit_rows"] = written.audit_rows
                    counts["rejections_logged"] = written.validation_fail_rows
                    run.counts.update(
                        counts, states_before=totals.before, states_after=totals.after
                    )
                    run.timings.update(written.timings)
                    run.timings["write"] = round(
                        time.perf_counter() - write_started + written.timings["write_copy"], 4
                    )
                    run.finish_in(db)

                write.finish(
                    evaluated_all=True, requests_upto=inputs.requests_upto, before_commit=finish
                )
    finally:
        inputs.reader.close()
    return RunReport(
        run_id=run.run_id,
        as_of=as_of,
        lookback=lookback,
        rules_version=rules.tag,
        dry_run=dry_run,
        mode=plan.mode,
        full_reason=plan.full_reason,
        base_run_id=None,
        counts=counts,
        timings=dict(run.timings),
        before=totals.before,
        after=totals.after,
    )


@dataclass
class VerifyReport:
    """A full dry run compared with the stored states (``derive run --verify``)."""

    as_of: datetime
    users_compared: int
    differences: pl.DataFrame  # one row per differing user, see ``VERIFY_COLUMNS``

    @property
    def equal(self) -> bool:
        """Whether every stored state equals what a full run would write."""
        return self.differences.height == 0


VERIFY_COLUMNS = (
    "user_id",
    "problem",
    "stored_state",
    "derived_state",
    "stored_score",
    "derived_score",
    "stored_last_event_type",
    "derived_last_event_type",
)


def _uuid_text(column: pl.Expr) -> pl.Expr:
    """16-byte uuids as their canonical text form."""
    h = column.bin.encode("hex")
    parts = [h.str.slice(0, 8), h.str.slice(8, 4), h.str.slice(12, 4), h.str.slice(16, 4)]
    return pl.concat_str([*parts, h.str.slice(20, 12)], separator="-")


def verify_derivation(
    db: Db,
    *,
    lookback: timedelta,
    rules: Rules,
    as_of: datetime | None = None,
    shards: int | None = None,
    memory_limit: int | None = None,
    executor: Executor | None = None,
    read_dsn: str | None = None,
) -> VerifyReport:
    """Recompute every user from scratch and list those whose stored row a full run would change.

    ``as_of`` defaults to the latest base run's, so time passing since then is no difference. A
    stored state that disagrees with its audit trail (a silent edit) is listed as ``state_jump``.
    """
    if as_of is None:
        base = incremental.latest_base(db, job=JOB)
        if base is None:
            raise UsageError(
                "nothing to verify: no full or incremental `derive run` has succeeded here yet"
            )
        as_of = base.as_of
    sharding = plan_shards(
        db, as_of=as_of, lookback=lookback, memory_limit=memory_limit, shards=shards
    )
    if sharding.count == 1 and not _distributed(executor, read_dsn):
        inputs = _full_read(db, as_of=as_of, lookback=lookback, rules=rules)
        result = derive_states(
            inputs.events, inputs.stored, inputs.recent, as_of=as_of, rules=rules
        )
        differences = _differences(inputs.stored, result.writes, result.rejected)
        return VerifyReport(
            as_of=as_of, users_compared=result.users_evaluated, differences=differences
        )
    sharded = _open_sharded_read(db, as_of=as_of, lookback=lookback, rules=rules, read_dsn=read_dsn)
    pieces: list[pl.DataFrame] = []

    def compare(diff: ShardDiff, stored: pl.DataFrame) -> None:
        writes = pl.DataFrame(pl.from_arrow(diff.states))
        rejected = pl.DataFrame(pl.from_arrow(diff.rejected))
        pieces.append(_differences(stored, writes, rejected))

    try:
        totals = _derive_shards(
            _Untimed(),
            sharded,
            sharding,
            as_of=as_of,
            lookback=lookback,
            rules=rules,
            each=compare,
            executor=executor,
            keep_stored=True,
        )
    finally:
        sharded.reader.close()
    differences = pl.concat(pieces).sort("user_id")
    return VerifyReport(as_of=as_of, users_compared=totals.users_evaluated, differences=differences)


class _Untimed:
    """Stands in for a run's phase timer where nothing is recorded (``--verify``)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def phase(self, _name: str) -> Iterator[None]:
        yield


def _differences(
    stored: pl.DataFrame, writes: pl.DataFrame, rejected: pl.DataFrame
) -> pl.DataFrame:
    """The users whose stored row a full run would change (``VERIFY_COLUMNS``), by user_id."""
    stored = stored.select(
        "user_id",
        stored_state="current_state",
        stored_score="engagement_score",
        stored_last_event_type="last_event_type",
    )
    written = writes.select(
        "user_id",
        problem=pl.when(pl.col("state_changed"))
        .then(pl.lit("state differs"))
        .otherwise(pl.lit("score or last event type differs")),
        derived_state=pl.col("current_state").cast(pl.String),
        derived_score="engagement_score",
        derived_last_event_type="last_event_type",
    )
    jumps = rejected.filter(pl.col("reasons").list.contains("state_jump")).select(
        "user_id", problem=pl.lit("state_jump: stored state disagrees with its audit trail")
    )
    return (
        pl.concat([written, jumps], how="diagonal_relaxed")
        .unique("user_id", keep="first", maintain_order=True)
        .join(stored, on="user_id", how="left")
        .with_columns(_uuid_text(pl.col("user_id")))
        .select(VERIFY_COLUMNS)
        .sort("user_id")
    )
