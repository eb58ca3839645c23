"""Where the shards of a full run or a backfill are derived: in this process, or as Ray tasks.

Both executors run the same task functions below, which read one shard in the run's exported
snapshot and call the pure transforms (:func:`~derive.transforms.shard.derive_shard`, the
backfill's replay); neither has its own copy of a rule. A task writes nothing: it returns Arrow
tables to the driver, which stages them into its one write transaction, so a task that Ray runs
again after a lost worker changes nothing.

- :class:`LocalExecutor` calls the tasks one after another in this process;
- :class:`RayExecutor` submits them as Ray tasks (``max_retries`` for lost workers, ``memory``
  declared from the shard's size) and hands back each result as it completes (``ray.wait``), so
  the driver holds one result at a time while the rest wait in Ray's object store.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import polars as pl
import pyarrow as pa

from derive.config import Rules
from derive.errors import DeriveError, UsageError
from derive.io import read
from derive.io.connect import connect
from derive.transforms.shard import ShardBounds, ShardDiff, derive_shard

EXECUTORS = ("local", "ray")
#: How often Ray runs a task again when its worker (or node) is lost; tasks write nothing.
MAX_RETRIES = 3
#: The least memory a task declares (a shard's own rows are only part of a worker's footprint).
MIN_TASK_MEMORY = 64 * 2**20
INSTALL_HINT = "install the ray extra: pip install 'derive[ray]'"


@dataclass(frozen=True)
class ShardSource:
    """Where and in which snapshot a task reads: the read server and the driver's exported id.

    The driver holds the transaction that exported ``snapshot`` open until every task has read,
    so every task sees one consistent state of the database (``SET TRANSACTION SNAPSHOT``).
    """

    dsn: str
    snapshot: str
    as_of: datetime
    lookback: timedelta
    relog_after: timedelta


def _read_range(source: ShardSource, bounds: ShardBounds, *, states: bool) -> Any:
    """A shard's window (and stored states) in the exported snapshot, on a connection of its own."""
    with connect(source.dsn) as db:
        read.begin_snapshot(db, snapshot=source.snapshot)
        read.set_window(
            db, as_of=source.as_of, lookback=source.lookback, relog_after=source.relog_after
        )
        read.set_user_range(db, bounds.lo, bounds.hi)
        span = (bounds.lo, bounds.hi)
        events = read.read_events(db, user_range=span)
        stored = read.read_states(db, user_range=span) if states else None
        db.rollback()
    return events, stored


@dataclass(frozen=True)
class ShardResult:
    """One derived shard as a task returns it (Arrow only), with the task's own timings."""

    diff: ShardDiff
    stored: pa.Table | None  # the shard's stored states, when the caller compares (--verify)
    largest_user: int
    read_seconds: float
    compute_seconds: float
    started: float  # wall clock (time.time) at the task's start and end
    ended: float


def largest_user(events: pl.DataFrame) -> int:
    """The most window rows of one user."""
    if events.height == 0:
        return 0
    return int(events.group_by("user_id").len().get_column("len").max() or 0)  # type: ignore[arg-type]


def derive_shard_task(
    source: ShardSource,
    bounds: ShardBounds,
    recent: pa.Table,
    rules: Rules,
    keep_stored: bool,
    memory_limit: int,
) -> ShardResult:
    """Read one shard in the snapshot and derive it (``derive_shard``); write nothing.

    Raises:
        UsageError: one user of the shard alone needs more than ``memory_limit``.
    """
    from derive.jobs.derivation import check_user_fits

    started = time.time()
    tick = time.perf_counter()
    events, stored = _read_range(source, bounds, states=True)
    read_seconds = time.perf_counter() - tick
    heaviest = largest_user(events)
    check_user_fits(heaviest, memory_limit)
    tick = time.perf_counter()
    diff = derive_shard(
        bounds,
        events,
        stored,
        pl.DataFrame(pl.from_arrow(recent)),
        as_of=source.as_of,
        rules=rules,
    )
    compute_seconds = time.perf_counter() - tick
    return ShardResult(
        diff=diff,
        stored=stored.to_arrow() if keep_stored else None,
        largest_user=heaviest,
        read_seconds=read_seconds,
        compute_seconds=compute_seconds,
        started=started,
        ended=time.time(),
    )


@dataclass(frozen=True)
class ReplayResult:
    """One backfill shard: every step's states of its users (Arrow), and its counts."""

    index: int
    steps: list[pa.Table]
    state_changes: list[int]
    events_read: int
    largest_user: int
    read_seconds: float
    compute_seconds: float
    started: float
    ended: float


def backfill_shard_task(
    source: ShardSource,
    bounds: ShardBounds,
    prior: pa.Table,
    points: list[datetime],
    lookback: timedelta,
    rules: Rules,
    memory_limit: int,
) -> ReplayResult:
    """Read one shard's events over the whole backfill range and replay every step for it.

    ``prior``: the shard's stored states before the first step (``schema.STORED_STATES``).

    Raises:
        UsageError: one user of the shard alone needs more than ``memory_limit``.
    """
    from derive.jobs.backfill import replay_steps
    from derive.jobs.derivation import check_user_fits

    started = time.time()
    tick = time.perf_counter()
    events, _ = _read_range(source, bounds, states=False)
    read_seconds = time.perf_counter() - tick
    heaviest = largest_user(events)
    check_user_fits(heaviest, memory_limit)
    tick = time.perf_counter()
    stored = pl.DataFrame(pl.from_arrow(prior))
    steps: list[pa.Table] = []
    changes: list[int] = []
    for _as_of, states, state_changes in replay_steps(
        events.filter(bounds.expr()), stored.filter(bounds.expr()), points, lookback, rules
    ):
        steps.append(states.to_arrow())
        changes.append(state_changes)
    return ReplayResult(
        index=bounds.index,
        steps=steps,
        state_changes=changes,
        events_read=events.height,
        largest_user=heaviest,
        read_seconds=read_seconds,
        compute_seconds=time.perf_counter() - tick,
        started=started,
        ended=time.time(),
    )


class TaskFailed(DeriveError):
    """A task failed for a reason of its own or was lost for good; the run wrote nothing."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(f"{message}; nothing was written (the run's one transaction rolled back)")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__


class Executor(Protocol):
    """Runs task functions over a list of argument tuples; yields results as they complete."""

    name: str

    def map(
        self, fn: Callable[..., Any], calls: Iterable[tuple[Any, ...]], *, memory: int
    ) -> Iterator[Any]: ...

    def connect(self) -> None: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Every task in this process, one after another (the default)."""

    name = "local"

    def map(
        self, fn: Callable[..., Any], calls: Iterable[tuple[Any, ...]], *, memory: int
    ) -> Iterator[Any]:
        """``fn(*args)`` for each call, in order."""
        del memory  # one task at a time: the shard plan already bounds it
        for args in calls:
            yield fn(*args)

    def connect(self) -> None:
        """Nothing to start."""

    def close(self) -> None:
        """Nothing to release."""


class RayExecutor:
    """Tasks on a Ray cluster: joined at ``address``, or a local Ray started for the run."""

    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise UsageError(
                f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}"
            ) from None
        self._ray: Any = ray
        self.address = address
        self._started = False
        self._connected = False
        self.cpus = 1
        self.memory = 0
        if address:
            _probe(address)  # fail fast; Ray is joined or started when the first task is due

    def connect(self) -> None:
        """Join the cluster (or start a local Ray) once; an incremental run never needs it."""
        if self._connected:
            return
        ray, address = self._ray, self.address
        if not ray.is_initialized():
            try:
                ray.init(
                    address=address or "local",
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                )
            except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
                reason = " ".join(str(exc).split())[:300].rstrip(".")
                if not address:
                    raise UsageError(
                        f"could not start a local Ray for --executor ray: {reason}"
                    ) from None
                raise UsageError(_unreachable(address, reason)) from None
            self._started = True
        self._connected = True
        resources = ray.cluster_resources()
        self.cpus = max(1, int(resources.get("CPU", 1)))
        self.memory = int(resources.get("memory", 0))

    def put(self, value: Any) -> Any:
        """Place a value shared by every task in the object store once."""
        self.connect()
        return self._ray.put(value)

    def map(
        self, fn: Callable[..., Any], calls: Iterable[tuple[Any, ...]], *, memory: int
    ) -> Iterator[Any]:
        """Submit the calls (at most two per CPU in flight) and yield each result as it completes.

        A task's own error (a :class:`~derive.errors.DeriveError`) is raised here as itself; a
        task whose worker died is run again by Ray up to ``MAX_RETRIES`` times.
        """
        self.connect()
        ray = self._ray
        need = max(MIN_TASK_MEMORY, memory)
        if self.memory:
            need = min(need, self.memory)  # a larger request could never be scheduled
        remote = ray.remote(fn).options(max_retries=MAX_RETRIES, num_cpus=1, memory=need)
        pending: list[Any] = []
        todo = iter(calls)
        window = 2 * self.cpus

        def submit() -> None:
            for args in todo:
                pending.append(remote.remote(*args))
                if len(pending) >= window:
                    return

        submit()
        try:
            while pending:
                done, rest = ray.wait(pending, num_returns=1)
                pending[:] = rest
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, DeriveError):
                        raise exc.cause from None
                    raise TaskFailed(f"a shard task failed on Ray: {_first_line(exc)}") from exc
                except ray.exceptions.RayError as exc:
                    raise TaskFailed(
                        f"a shard task was lost on Ray after {MAX_RETRIES} retries:"
                        f" {_first_line(exc)}"
                    ) from exc
                submit()
                yield result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        """Shut down the local Ray this executor started (a joined cluster keeps running)."""
        if self._started:
            self._ray.shutdown()
            self._started = False
        self._connected = False


#: Seconds to wait for a TCP connection to a Ray head before calling it unreachable (Ray itself
#: would keep retrying for minutes).
PROBE_SECONDS = 5.0


def _unreachable(address: str, reason: str) -> str:
    return (
        f"cannot reach the Ray cluster at --ray-address {address!r} (RAY_ADDRESS): {reason}."
        " Start a head with `ray start --head` (other machines join with `ray start --address"
        " HEAD:6379`) and give its HOST:PORT, or auto for the cluster running on this machine;"
        " or drop --ray-address to start a local Ray for this run"
    )


def _probe(address: str) -> None:
    """Fail fast when nothing listens at ``HOST:PORT`` (or ``ray://HOST:PORT``)."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UsageError(
            f"--ray-address {address!r}: give HOST:PORT of the Ray head (e.g. 10.0.0.5:6379),"
            " ray://HOST:PORT for Ray Client, or auto"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS):
            pass
    except OSError as exc:
        raise UsageError(_unreachable(address, f"no connection to {target} ({exc})")) from None


def make_executor(name: str | None, address: str | None = None) -> Executor:
    """The executor called ``name`` (default local).

    Raises:
        UsageError: an unknown name, Ray not installed, or a Ray cluster that cannot be reached.
    """
    if name in (None, "local"):
        return LocalExecutor()  # a RAY_ADDRESS in the environment only matters to --executor ray
    if name == "ray":
        return RayExecutor(address)
    raise UsageError(f"--executor {name!r}: use one of {', '.join(EXECUTORS)}")
