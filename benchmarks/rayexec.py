"""The Ray executor against the local one: the same full run (nothing changed, as (d)) in the same
number of shards, ``--executor local`` and ``--executor ray`` (a local Ray started by each run,
as a user without a cluster gets it).

Figures: wall (includes interpreter and Ray start-up), in-job (the run log's duration: Ray is up
by then), the tasks' own read and compute time, and the overhead per task: what the Ray run's
in-job time exceeds the local one's by, per task. The 4-node figure is an estimate from the
measured per-task timings, not a measurement (see :func:`estimate_nodes`).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Scales the section is measured at, and the shard count of both executors (enough tasks to
#: show a per-task cost; the memory limit alone would give one shard at S).
RAY_SCALES = ("S", "M")
SHARDS = 8
NODES = 4


def installed() -> bool:
    """Whether the ray package can be imported here (the ``ray`` extra)."""
    return importlib.util.find_spec("ray") is not None


@dataclass
class ExecutorFigure:
    """Repeated runs of one executor."""

    executor: str
    seconds: list[float] = field(default_factory=list)
    job_seconds: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)

    def median(self, values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    def phase(self, name: str) -> float | None:
        """Median of one phase over the runs that recorded it."""
        return self.median([p[name] for p in self.phases if name in p])


@dataclass
class RayResult:
    """The Ray section of one scale (``installed`` False: not measured)."""

    installed: bool
    shards: int = SHARDS
    cpus: int = 0
    local: ExecutorFigure = field(default_factory=lambda: ExecutorFigure("local"))
    ray: ExecutorFigure = field(default_factory=lambda: ExecutorFigure("ray"))

    @property
    def tasks(self) -> int:
        """Tasks of one Ray run: one per shard (0 before a Ray run was measured)."""
        return self.shards if self.ray.phases else 0

    def overhead_per_task(self) -> float | None:
        """(Ray in-job - Ray start - local in-job) / tasks, seconds (negative: Ray's
        parallelism won)."""
        ray_job, local_job = (
            self.ray.median(self.ray.job_seconds),
            self.local.median(self.local.job_seconds),
        )
        if ray_job is None or local_job is None or not self.tasks:
            return None
        return (ray_job - (self.ray.phase("executor_start") or 0.0) - local_job) / self.tasks

    def estimate_nodes(self, nodes: int = NODES) -> float | None:
        """ESTIMATE of the in-job time on ``nodes`` machines like this one (``cpus`` each).

        The driver's serial part (in-job minus Ray's start and the shards phase) plus the tasks' summed wall time
        spread over every CPU of the cluster, plus the measured overhead of every task spread the
        same way. It assumes PostgreSQL serves that many concurrent range reads as fast as it
        served these, which one server of this size would not: the read floor still bounds it.
        """
        job = self.ray.median(self.ray.job_seconds)
        shards_phase, task_wall = self.ray.phase("shards"), self.ray.phase("task_wall")
        overhead = self.overhead_per_task()
        if job is None or shards_phase is None or task_wall is None or not self.cpus:
            return None
        slots = nodes * self.cpus
        serial = job - shards_phase - (self.ray.phase("executor_start") or 0.0)
        return serial + (task_wall + max(overhead or 0.0, 0.0) * self.tasks) / slots


def measure(
    work_dsn: str,
    *,
    run: Callable[..., Any],
    repeat: int,
    log: Callable[[str], None] = lambda _line: None,
    scale: str = "",
    shards: int = SHARDS,
) -> RayResult:
    """Run both executors ``repeat`` times on ``work_dsn`` (a database after (d))."""
    if not installed():
        log(f"{scale}: ray is not installed, the Ray section is not measured")
        return RayResult(installed=False, shards=shards)
    result = RayResult(installed=True, shards=shards, cpus=os.cpu_count() or 1)
    for figure in (result.local, result.ray):
        for i in range(repeat):
            done = run(
                work_dsn, full=True, extra=("--executor", figure.executor, "--shards", str(shards))
            )
            figure.seconds.append(done.seconds)
            if done.job_seconds is not None:
                figure.job_seconds.append(done.job_seconds)
            figure.phases.append(done.phases)
            log(
                f"{scale}: --executor {figure.executor} --shards {shards} run {i + 1}/{repeat}:"
                f" {done.seconds:.2f} s wall, {done.job_seconds or 0:.2f} s in-job"
            )
    return result


def _s(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(rows: list[tuple[str, RayResult | None]]) -> str:
    """The README section's body: one table row per scale and executor, then the estimate."""
    measured = [(scale, r) for scale, r in rows if r is not None]
    if not measured:
        return "Not measured in this run."
    if not any(r.installed for _, r in measured):
        return "ray is not installed (`pip install -e '.[ray]'`): not measured in this run."
    lines = [
        "| scale | executor | shards | wall s (median) | in-job s (median) | Ray start s"
        " | shards phase s | tasks' read s (sum) | tasks' compute s (sum) | overhead per task s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    estimates = []
    for scale, r in measured:
        if not r.installed:
            lines.append(f"| {scale} | — | — | ray not installed | | | | | | |")
            continue
        for fig in (r.local, r.ray):
            is_ray = fig.executor == "ray"
            lines.append(
                f"| {scale} | {fig.executor} | {r.shards} | {_s(fig.median(fig.seconds))}"
                f" | {_s(fig.median(fig.job_seconds))}"
                f" | {_s(fig.phase('executor_start')) if is_ray else '—'}"
                f" | {_s(fig.phase('shards')) if is_ray else '—'}"
                f" | {_s(fig.phase('task_read')) if is_ray else _s(fig.phase('read'))}"
                f" | {_s(fig.phase('task_compute')) if is_ray else _s(fig.phase('compute'))}"
                f" | {_s(r.overhead_per_task(), 3) if is_ray else '—'} |"
            )
        estimates.append(
            f"- {scale}: **estimate**, not a measurement: {_s(r.estimate_nodes())} s in-job on"
            f" {NODES} nodes of {r.cpus} CPUs like this one (measured here on 1 node:"
            f" {_s(r.ray.median(r.ray.job_seconds))} s)."
        )
    return "\n".join(
        [
            *lines,
            "",
            "For local, the read and compute columns are the run's own phases (one streamed read,"
            " shards derived in turn); for ray, the sums over the tasks (each reads its user range"
            " in the run's exported snapshot). Ray start: the local Ray started inside the run"
            " (no `--ray-address`; joining a running cluster costs less); wall also includes"
            " stopping it. Overhead per task = (ray in-job - Ray start - local in-job) / tasks.",
            "",
            f"What {NODES} nodes would do, from these per-task timings: the driver's serial part"
            " (in-job minus Ray start and the shards phase: planning, the snapshot, the one write"
            " transaction)"
            f" plus the tasks' summed wall time and overhead spread over {NODES} x CPUs. It"
            " assumes PostgreSQL serves that many concurrent range reads as fast as it served"
            " these; one server of this machine's size would not (a read replica per few nodes"
            " would), so the read floor (b) still bounds a real cluster.",
            "",
            *estimates,
        ]
    )
