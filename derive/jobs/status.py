"""``derive status``: is every job healthy? For people, for cron wrappers and for Prometheus.

A job is failing when its last run (skipped runs aside, they only say another run held the lock)
failed, and late when its last successful full-scope run finished longer ago than its ``max_lag``
(``derive`` has one by default, other jobs when one is given, e.g. ``prune=26h``). Runs given a
user list (``derive run --user``) count for "last run failed" but not for the lag: they cannot stand
in for the scheduled run.

``--format openmetrics`` renders the same report as gauges (:func:`openmetrics`); each family is
one small function of the report, so a new figure is one more function in :data:`_FAMILIES`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import polars as pl

from derive.config import STATES, format_duration, parse_duration
from derive.errors import UsageError
from derive.io import history, monitoring
from derive.io.connect import Db
from derive.jobs.derivation import JOB
from derive.jobs.openmetrics import Gauge, render

DEFAULT_MAX_LAG = timedelta(minutes=30)


def parse_max_lags(values: Iterable[str]) -> dict[str, timedelta]:
    """``--max-lag`` values: ``30m`` (the derive job) or ``JOB=DURATION``; derive defaults to 30m.

    Raises:
        UsageError: a value that is neither form, naming it.
    """
    lags = {JOB: DEFAULT_MAX_LAG}
    for value in values:
        job, sep, duration = value.rpartition("=")
        if not sep:
            job = JOB
        elif not job.strip():
            raise UsageError(
                f"invalid --max-lag {value!r}: use DURATION or JOB=DURATION, e.g. prune=26h"
            )
        try:
            lags[job.strip()] = parse_duration(duration)
        except UsageError as exc:
            raise UsageError(f"invalid --max-lag {value!r}: {exc}") from None
    return lags


@dataclass
class StatusReport:
    """Everything ``derive status`` shows."""

    database: str
    now: datetime
    max_lags: dict[str, timedelta]
    runs: pl.DataFrame
    jobs: pl.DataFrame
    states: dict[str, int]
    rejections: pl.DataFrame
    problems: list[str] = field(default_factory=list)

    def job(self, name: str) -> dict[str, Any] | None:
        """The run-log summary of one job (``None`` when it never ran)."""
        found = self.jobs.filter(pl.col("job") == name)
        return found.row(0, named=True) if found.height else None

    def last_success(self, name: str = JOB) -> datetime | None:
        """When the job's last successful full-scope run finished."""
        row = self.job(name)
        return None if row is None else row["last_success"]

    @property
    def last_full_success(self) -> datetime | None:
        """When the last successful full derive run finished."""
        return self.last_success(JOB)

    @property
    def last_any_success(self) -> datetime | None:
        """When the last successful derive run of any scope finished."""
        row = self.job(JOB)
        return None if row is None else row["last_any_success"]

    @property
    def max_lag(self) -> timedelta:
        """The derive job's lateness threshold."""
        return self.max_lags[JOB]

    def lag_of(self, name: str) -> timedelta | None:
        """Time since the job's last successful full-scope run finished (``None``: never)."""
        success = self.last_success(name)
        return None if success is None else self.now - success

    @property
    def lag(self) -> timedelta | None:
        """The derive job's lag."""
        return self.lag_of(JOB)

    @property
    def watermark(self) -> datetime | None:
        """Up to when derived state is known to be current.

        For now: when the last successful full-scope derive run finished.
        """
        return self.last_full_success

    @property
    def healthy(self) -> bool:
        """No problem found."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        lag = self.lag
        return {
            "database": self.database,
            "now": self.now.isoformat(),
            "healthy": self.healthy,
            "problems": self.problems,
            "lag_seconds": None if lag is None else round(lag.total_seconds(), 3),
            "max_lag_seconds": self.max_lag.total_seconds(),
            "max_lag_seconds_by_job": {k: v.total_seconds() for k, v in self.max_lags.items()},
            "last_full_success": _iso(self.last_full_success),
            "last_any_success": _iso(self.last_any_success),
            "runs": [_jsonable(row) for row in self.runs.iter_rows(named=True)],
            "jobs": [
                _jsonable({k: v for k, v in row.items() if k != "last_counts"})
                for row in self.jobs.iter_rows(named=True)
            ],
            "states": self.states,
            "rejections": self.rejections.to_dicts(),
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (_iso(v) if isinstance(v, datetime) else v) for k, v in row.items()}


def problems(jobs: pl.DataFrame, *, now: datetime, max_lags: dict[str, timedelta]) -> list[str]:
    """What is wrong, as sentences naming the run or the lag (empty when healthy).

    Args:
        jobs: one summary row per job (``derive.io.monitoring.job_summary``).
        max_lags: job -> lateness threshold; jobs not named are only checked for failures.
    """
    found: list[str] = []
    by_job = {row["job"]: row for row in jobs.iter_rows(named=True)}
    order = [JOB, *sorted(set(by_job) - {JOB})]
    for name in order:
        row = by_job.get(name)
        if row is not None and row["last_status"] == "failed":
            subject = "the last run" if name == JOB else f"the last {name} run"
            found.append(
                f"{subject} ({row['last_run_id']}, as_of {row['last_as_of'].isoformat()}) failed: "
                f"{row['last_error'] or 'no error text'}"
            )
        if row is not None and row["expired_leases"]:
            found.append(
                f"a {name} run is marked running but its lease expired (process killed?); the"
                f" next {name} run marks it failed"
            )
    for name in sorted(max_lags, key=lambda j: (j != JOB, j)):
        limit = max_lags[name]
        row = by_job.get(name)
        success = None if row is None else row["last_success"]
        what = "full derive run" if name == JOB else f"{name} run"
        if success is None:
            found.append(f"no {what} has succeeded yet")
        elif now - success > limit:
            option = format_duration(limit) if name == JOB else f"{name}={format_duration(limit)}"
            found.append(
                f"the last successful {'full run' if name == JOB else what} finished "
                f"{human_duration(now - success)} ago, more than --max-lag {option}"
            )
    return found


def human_duration(value: timedelta) -> str:
    """``52s``, ``10m52s``, ``2h05m``, ``3d04h``: two units at most, for people."""
    seconds = max(0, int(value.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def collect_status(
    db: Db, *, max_lag: timedelta | dict[str, timedelta] = DEFAULT_MAX_LAG, limit: int = 10
) -> StatusReport:
    """Read the run log, the state distribution and the recent rejections.

    Args:
        max_lag: the derive job's threshold, or job -> threshold (see :func:`parse_max_lags`).
    """
    lags = dict(max_lag) if isinstance(max_lag, dict) else {JOB: max_lag}
    lags.setdefault(JOB, DEFAULT_MAX_LAG)
    now = history.server_now(db)
    runs = history.recent_runs(db, job=JOB, limit=limit)
    jobs = monitoring.job_summary(db, since=now - timedelta(hours=24))
    stored = history.state_distribution(db)
    states = {s: stored.get(s, 0) for s in STATES}
    rejections = history.rejections_by_reason(db, now=now)
    flagged = [
        f"run {run_id} ({job}, {status}, started by {who}) wrote audience_state at"
        f" {first.isoformat()} and never finished: a write outside derive's own protocol"
        " (forged or manual); check the states it touched with `derive run --verify`"
        for run_id, job, status, who, first in history.unfinished_writers(db)
    ]
    return StatusReport(
        database=db.label,
        now=now,
        max_lags=lags,
        runs=runs,
        jobs=jobs,
        states=states,
        rejections=rejections,
        problems=[*flagged, *problems(jobs, now=now, max_lags=lags)],
    )


# -- openmetrics ------------------------------------------------------------------------------------


def _seconds(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _job_rows(report: StatusReport) -> list[dict[str, Any]]:
    """Every job of the run log, plus the jobs with a threshold that never ran."""
    rows = {row["job"]: row for row in report.jobs.iter_rows(named=True)}
    for name in report.max_lags:
        rows.setdefault(name, {"job": name})
    return [rows[name] for name in sorted(rows)]


def _health(report: StatusReport) -> Iterable[Gauge]:
    yield Gauge("derive_healthy", "1 when no job is failing or late, else 0").add(
        float(report.healthy)
    )
    yield Gauge("derive_problems", "Problems found (failing or late jobs)").add(
        len(report.problems)
    )
    yield Gauge(
        "derive_status_timestamp_seconds",
        "Database time when this status was collected",
        "seconds",
    ).add(_seconds(report.now))


def _per_job(report: StatusReport) -> Iterable[Gauge]:
    success = Gauge(
        "derive_last_success_timestamp_seconds",
        "When the job's last successful run covering every user finished",
        "seconds",
    )
    lag = Gauge(
        "derive_lag_seconds",
        "Seconds since the job's last successful full-scope run finished (+Inf: never)",
        "seconds",
    )
    max_lag = Gauge(
        "derive_max_lag_seconds", "Lag above which status --check reports the job late", "seconds"
    )
    started = Gauge(
        "derive_last_run_start_timestamp_seconds",
        "When the job's last run (skipped runs aside) started",
        "seconds",
    )
    failed = Gauge("derive_last_run_failed", "1 when the job's last run (skipped aside) failed")
    duration = Gauge(
        "derive_last_run_duration_seconds",
        "Wall time of the job's last finished run (skipped aside)",
        "seconds",
    )
    running = Gauge("derive_running_runs", "Runs of the job marked running in the run log")
    expired = Gauge(
        "derive_expired_leases", "Runs marked running whose lease expired (the process died)"
    )
    unfinished = Gauge(
        "derive_unfinished_writer_runs",
        "Runs that wrote audience_state and never finished (should be 0)",
    )
    mode = Gauge(
        "derive_last_run_mode", "1 for the mode of the job's last run (full/incremental/users)"
    )
    recent = Gauge("derive_runs_24h", "Runs of the job started in the last 24 hours, by status")
    for row in _job_rows(report):
        job = row["job"]
        success.add(_seconds(row.get("last_success")), job=job)
        job_lag = report.lag_of(job)
        lag.add(float("inf") if job_lag is None else job_lag.total_seconds(), job=job)
        if job in report.max_lags:
            max_lag.add(report.max_lags[job].total_seconds(), job=job)
        if row.get("last_status") is not None:
            started.add(_seconds(row["last_started_at"]), job=job)
            failed.add(float(row["last_status"] == "failed"), job=job)
            duration.add(row["last_seconds"], job=job)
        running.add(row.get("running") or 0, job=job)
        expired.add(row.get("expired_leases") or 0, job=job)
        unfinished.add(row.get("unfinished_writers") or 0, job=job)
        if row.get("last_mode"):
            mode.add(1, job=job, mode=row["last_mode"])
        for status in ("succeeded", "failed", "skipped"):
            recent.add(row.get(f"{status}_24h") or 0, job=job, status=status)
    yield from (success, lag, max_lag, started, failed, duration, running, recent)
    yield from (expired, unfinished, mode)


def _derivation(report: StatusReport) -> Iterable[Gauge]:
    users = Gauge("derive_users", "Users per stored audience state")
    for state, count in report.states.items():
        users.add(count, state=state)
    yield users
    watermark = report.watermark
    yield Gauge(
        "derive_watermark_age_seconds",
        "Seconds since the derived states were last known current (the last full-scope derive"
        " run's finish)",
        "seconds",
    ).add(None if watermark is None else (report.now - watermark).total_seconds())
    rejections = Gauge(
        "derive_rejections", "validation_fail rows written per reason, over a trailing window"
    )
    rejected_users = Gauge(
        "derive_rejected_users_7d", "Distinct users rejected per reason over the last 7 days"
    )
    for row in report.rejections.iter_rows(named=True):
        rejections.add(row["last_24h"], reason=row["reason"], window="24h")
        rejections.add(row["last_7d"], reason=row["reason"], window="7d")
        rejected_users.add(row["users_7d"], reason=row["reason"])
    yield rejections
    yield rejected_users
    yield from _last_derive_counts(report)


#: Counts of the last successful derive run exposed as gauges: counts key -> metric suffix.
LAST_RUN_COUNTS = {
    "events_read": "events_read",
    "users_evaluated": "users_evaluated",
    "users_changed": "users_changed",
    "users_rejected": "users_rejected",
    "audit_rows": "audit_rows",
}


def _last_derive_counts(report: StatusReport) -> Iterable[Gauge]:
    row = report.job(JOB)
    counts: dict[str, Any] = {}
    if row is not None and row["last_status"] == "succeeded" and row["last_counts"]:
        try:  # a run row anyone with service_role wrote: any JSON, nested arbitrarily deep
            parsed = json.loads(row["last_counts"])
        except (ValueError, RecursionError):
            parsed = None
        counts = parsed if isinstance(parsed, dict) else {}
    for key, suffix in LAST_RUN_COUNTS.items():
        value = counts.get(key)
        yield Gauge(
            f"derive_last_run_{suffix}", f"{key} of the last derive run, when it succeeded"
        ).add(value if isinstance(value, int | float) else None, job=JOB)
    candidates = Gauge(
        "derive_last_run_candidates",
        "Users an incremental derive run evaluated, per reason (SPEC 2.10), when it succeeded",
    )
    reasons = counts.get("candidates")
    if isinstance(reasons, dict):
        for reason, n in reasons.items():
            if isinstance(n, int | float) and reason != "total":
                candidates.add(n, job=JOB, reason=str(reason))
    yield candidates


_FAMILIES: tuple[Callable[[StatusReport], Iterable[Gauge]], ...] = (
    _health,
    _per_job,
    _derivation,
)


def openmetrics(report: StatusReport) -> str:
    """The report as OpenMetrics text (also valid Prometheus text 0.0.4)."""
    return render(family for build in _FAMILIES for family in build(report))
