"""``derive backfill``: replay the stateful machine over past as-of points, without touching
audience_state.

Starting from an empty prior state at ``--from``, each step derives every user at once with the
same pure pipeline as ``derive run`` (:func:`~derive.transforms.pipeline.derive_states`); its
stored-state input is the previous step's result, carried with a consistent audit pointer so no
``state_jump`` fires. The events are read once for the whole range (``lookback`` before the first
step through the last) and sliced per step in Polars. Each step's states are written as one
complete unit (a parquet file or the rows of ``audience_state_history`` plus a marker), so an
interrupted backfill resumes after its last complete step with the same answers.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import polars as pl
import pyarrow as pa
import pyarrow.ipc

from derive.config import STATES, Rules, format_duration
from derive.errors import UsageError
from derive.io import read
from derive.io.connect import Db
from derive.io.history import HISTORY
from derive.io.replica import open_reader
from derive.io.runlog import job_run
from derive.jobs.derivation import ShardPlan, plan_shards, task_memory
from derive.jobs.executor import (
    Executor,
    LocalExecutor,
    ReplayResult,
    ShardSource,
    backfill_shard_task,
)
from derive.schema import RECENT_REJECTIONS, STORED_STATES, empty
from derive.transforms.pipeline import derive_states
from derive.transforms.shard import shard_bounds

JOB = "backfill"
#: The audit pointer carried by replayed states: the replay is its own audit trail.
REPLAY_AUDIT_ID = "backfill"


class HistoryStore(Protocol):
    """Where the steps go (:class:`~derive.io.history.ParquetHistory` or ``TableHistory``)."""

    def describe(self) -> str: ...
    def open(self) -> None: ...
    def done(self) -> set[datetime]: ...
    def load(self, as_of: datetime) -> pl.DataFrame: ...
    def save(self, as_of: datetime, states: pl.DataFrame, *, run_id: str | None) -> None: ...


@dataclass(frozen=True)
class StepResult:
    """One finished (or skipped) step, handed to the progress callback."""

    index: int
    total: int
    as_of: datetime
    skipped: bool
    users: int
    state_changes: int
    distribution: dict[str, int]


@dataclass
class BackfillReport:
    """What a backfill did."""

    run_id: str
    start: datetime
    end: datetime
    step: timedelta
    lookback: timedelta
    target: str
    steps: int = 0
    steps_skipped: int = 0
    events_read: int = 0
    final: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "run_id": self.run_id,
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "step": format_duration(self.step),
            "lookback": format_duration(self.lookback),
            "target": self.target,
            "steps": self.steps,
            "steps_written": self.steps - self.steps_skipped,
            "steps_skipped": self.steps_skipped,
            "events_read": self.events_read,
            "final_states": self.final,
            "timings": self.timings,
        }


def step_points(start: datetime, end: datetime, step: timedelta) -> list[datetime]:
    """``start, start + step, ...`` up to and including ``end``.

    Raises:
        UsageError: an empty range or a non-positive step.
    """
    if step <= timedelta(0):
        raise UsageError(f"--step must be positive, got {step}")
    if end < start:
        raise UsageError(f"--to {end.isoformat()} is before --from {start.isoformat()}")
    count = int((end - start) / step) + 1
    return [start + i * step for i in range(count)]


def as_stored(history: pl.DataFrame, /) -> pl.DataFrame:
    """A step's states as the pipeline's stored-state input, audit pointer consistent."""
    return history.select(
        *[pl.col(n).cast(t) for n, t in HISTORY.items()],
        last_audit_id=pl.lit(REPLAY_AUDIT_ID),
        audit_new_state=pl.col("current_state").cast(pl.String()),
        audit_user_matches=pl.lit(True),
    ).select([pl.col(n).cast(t) for n, t in STORED_STATES.items()])


def advance(stored: pl.DataFrame, writes: pl.DataFrame, /) -> pl.DataFrame:
    """The stored states after a step: exactly the rows ``derive run`` would have upserted."""
    updated = as_stored(writes.select(list(HISTORY.names())))
    kept = stored.join(updated.select("user_id"), on="user_id", how="anti")
    return pl.concat([kept, updated], how="vertical")


def _distribution(states: pl.DataFrame) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for state, n in states.get_column("current_state").value_counts().iter_rows():
        counts[str(state)] = int(n)
    return counts


def _read_range(db: Db, *, first: datetime, last: datetime, lookback: timedelta) -> pl.DataFrame:
    """Every event any step needs, in one snapshot: ``[first - lookback, last]``."""
    db.rollback()
    db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    db.lift_timeouts()
    db.execute('SET LOCAL ROLE "service_role"')
    read.set_window(db, as_of=last, lookback=lookback + (last - first), relog_after=lookback)
    events = read.read_events(db)
    db.rollback()
    return events


def run_backfill(
    db: Db,
    *,
    start: datetime,
    end: datetime,
    step: timedelta,
    lookback: timedelta,
    rules: Rules,
    store: HistoryStore,
    progress: Callable[[StepResult], None] = lambda _step: None,
    shards: int | None = None,
    memory_limit: int | None = None,
    executor: Executor | None = None,
    read_dsn: str | None = None,
) -> BackfillReport:
    """Replay the state machine at every step point and store each step's states.

    Steps already complete in ``store`` are skipped; the replay resumes from the last complete
    one. The users are split into ``shards`` user_id ranges (default: as many as keep one shard's
    events of the whole range under ``memory_limit``), derived by ``executor`` (default in this
    process) reading from ``read_dsn`` when given; one shard reads everything at once as before. Holds the ``backfill`` job lock (one backfill at a time) and logs the run in
    ``derivation_runs``; audience_state and audience_events are never written.

    Raises:
        LockBusy: another backfill is running.
        UsageError: an empty range, a bad step, or a store holding another backfill.
    """
    points = step_points(start, end, step)
    store.open()
    done = store.done()
    resume = next((i for i, p in enumerate(points) if p not in done), len(points))
    args = {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "step": format_duration(step),
        "target": store.describe(),
    }
    with job_run(
        db, job=JOB, as_of=end, lookback=lookback, rules_version=rules.tag, args=args
    ) as run:
        report = BackfillReport(
            run_id=run.run_id,
            start=start,
            end=end,
            step=step,
            lookback=lookback,
            target=store.describe(),
            steps=len(points),
            steps_skipped=resume,
        )
        for i in range(resume):
            progress(StepResult(i, len(points), points[i], True, 0, 0, {}))
        stored = as_stored(store.load(points[resume - 1])) if resume > 0 else empty(STORED_STATES)
        if resume < len(points):
            first, last = points[resume], points[-1]
            sharding = plan_shards(
                db,
                as_of=last,
                lookback=lookback + (last - first),
                memory_limit=memory_limit,
                shards=shards,
            )
            distributed = bool(read_dsn) or not isinstance(executor, LocalExecutor | None)
            run.counts["shards"] = sharding.as_dict() | {
                "executor": executor.name if executor else "local"
            }
        if resume < len(points) and (sharding.count > 1 or distributed):
            report.events_read = _sharded_replay(
                db,
                stored,
                points[resume:],
                offset=resume,
                total=len(points),
                lookback=lookback,
                rules=rules,
                store=store,
                run=run,
                sharding=sharding,
                executor=executor or LocalExecutor(),
                read_dsn=read_dsn,
                progress=progress,
            )
        elif resume < len(points):
            with run.phase("read"):
                events = _read_range(db, first=points[resume], last=points[-1], lookback=lookback)
            report.events_read = events.height
            _replay(
                events,
                stored,
                points[resume:],
                offset=resume,
                total=len(points),
                lookback=lookback,
                rules=rules,
                store=store,
                run_id=run.run_id,
                timings=run.timings,
                progress=progress,
            )
        report.final = _distribution(store.load(points[-1]))
        run.counts.update(
            steps=len(points),
            steps_skipped=resume,
            events_read=report.events_read,
            states_after=report.final,
        )
    report.timings = dict(run.timings)
    return report


def replay_steps(
    events: pl.DataFrame,
    stored: pl.DataFrame,
    points: Sequence[datetime],
    lookback: timedelta,
    rules: Rules,
) -> Iterator[tuple[datetime, pl.DataFrame, int]]:
    """Each step's (as_of, states, state changes), from ``stored`` before the first step.

    Pure: the same users in, the same states out, whether over everyone or one shard's users.
    """
    no_rejections = empty(RECENT_REJECTIONS)
    created = pl.col("created_at")
    for as_of in points:
        window = events.filter(created >= as_of - lookback, created <= as_of)
        result = derive_states(window, stored, no_rejections, as_of=as_of, rules=rules)
        stored = advance(stored, result.writes)
        yield as_of, stored.select(list(HISTORY.names())), result.state_changes


def _replay(
    events: pl.DataFrame,
    stored: pl.DataFrame,
    points: Sequence[datetime],
    *,
    offset: int,
    total: int,
    lookback: timedelta,
    rules: Rules,
    store: HistoryStore,
    run_id: str,
    timings: dict[str, float],
    progress: Callable[[StepResult], None],
) -> None:
    tick = time.perf_counter()
    for k, (as_of, states, state_changes) in enumerate(
        replay_steps(events, stored, points, lookback, rules)
    ):
        timings["compute"] = round(timings.get("compute", 0.0) + time.perf_counter() - tick, 4)
        _save_step(store, as_of, states, run_id=run_id, timings=timings)
        progress(
            StepResult(
                offset + k, total, as_of, False, states.height, state_changes, _distribution(states)
            )
        )
        tick = time.perf_counter()


def _save_step(
    store: HistoryStore,
    as_of: datetime,
    states: pl.DataFrame,
    *,
    run_id: str,
    timings: dict[str, float],
) -> None:
    tick = time.perf_counter()
    store.save(as_of, states, run_id=run_id)
    timings["write"] = round(timings.get("write", 0.0) + time.perf_counter() - tick, 4)


def _sharded_replay(
    db: Db,
    stored: pl.DataFrame,
    points: Sequence[datetime],
    *,
    offset: int,
    total: int,
    lookback: timedelta,
    rules: Rules,
    store: HistoryStore,
    run: Any,
    sharding: ShardPlan,
    executor: Executor,
    read_dsn: str | None,
    progress: Callable[[StepResult], None],
) -> int:
    """The replay in user_id ranges (each task reads its users' events in one snapshot and
    replays every step for them); each step is stored whole once every shard is in. Events read.
    """
    first, last = points[0], points[-1]
    with run.phase("read"):
        reader = open_reader(db, read_dsn)
    try:
        with run.phase("read"):
            exported = read.begin_snapshot(reader)
        source = ShardSource(
            dsn=reader.dsn,
            snapshot=exported,
            as_of=last,
            lookback=lookback + (last - first),
            relog_after=lookback,
        )
        bounds = shard_bounds(sharding.count)
        calls = (
            (
                source,
                shard,
                stored.filter(shard.expr()).to_arrow(),
                list(points),
                lookback,
                rules,
                sharding.memory_limit,
            )
            for shard in bounds
        )
        changes = [0] * len(points)
        events_read = 0
        tasks = {"task_read": 0.0, "task_compute": 0.0, "task_wall": 0.0}  # seconds, summed
        with tempfile.TemporaryDirectory(prefix="derive-backfill-") as root:
            empty_states = empty(HISTORY).to_arrow()
            writers = [
                pa.ipc.new_file(f"{root}/step-{k}.arrow", empty_states.schema)
                for k in range(len(points))
            ]
            try:
                with run.phase("executor_start"):
                    executor.connect()
                with run.phase("shards"):
                    memory = task_memory(sharding.estimated_rows, sharding.count)
                    for result in executor.map(backfill_shard_task, calls, memory=memory):
                        assert isinstance(result, ReplayResult)
                        events_read += result.events_read
                        for k, part in enumerate(result.steps):
                            writers[k].write_table(part.cast(empty_states.schema))
                            changes[k] += result.state_changes[k]
                        tasks["task_read"] += result.read_seconds
                        tasks["task_compute"] += result.compute_seconds
                        tasks["task_wall"] += result.ended - result.started
                        del result
            finally:
                for writer in writers:
                    writer.close()
            reader.rollback()
            run.timings.update({k: round(v, 4) for k, v in tasks.items()})
            run.timings["compute"] = round(tasks["task_compute"], 4)
            for k, as_of in enumerate(points):
                with pa.OSFile(f"{root}/step-{k}.arrow", "rb") as source_file:
                    table = pa.ipc.open_file(source_file).read_all()
                states = pl.DataFrame(pl.from_arrow(table)).sort("user_id")
                _save_step(store, as_of, states, run_id=run.run_id, timings=run.timings)
                progress(
                    StepResult(
                        offset + k,
                        total,
                        as_of,
                        False,
                        states.height,
                        changes[k],
                        _distribution(states),
                    )
                )
    finally:
        reader.close()
    return events_read
