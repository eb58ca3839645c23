"""``derive status``: is the derivation healthy? For people and for monitoring.

Healthy means: the last derive run (skipped runs aside, they only say another run held the lock)
did not fail, and the last successful full run finished less than ``max_lag`` ago. Runs of the
watcher (``derive watch``, a user subset) count for "last run failed" but not for the lag: they
cannot stand in for the scheduled full run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import polars as pl

from derive.config import STATES, format_duration
from derive.io import history
from derive.io.connect import Db
from derive.jobs.derivation import JOB


@dataclass
class StatusReport:
    """Everything ``derive status`` shows."""

    database: str
    now: datetime
    max_lag: timedelta
    runs: pl.DataFrame
    states: dict[str, int]
    rejections: pl.DataFrame
    last_full_success: datetime | None
    last_any_success: datetime | None
    problems: list[str] = field(default_factory=list)

    @property
    def lag(self) -> timedelta | None:
        """Time since the last successful full run finished (``None``: never)."""
        return None if self.last_full_success is None else self.now - self.last_full_success

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
            "last_full_success": _iso(self.last_full_success),
            "last_any_success": _iso(self.last_any_success),
            "runs": [
                {k: (_iso(v) if isinstance(v, datetime) else v) for k, v in row.items()}
                for row in self.runs.iter_rows(named=True)
            ],
            "states": self.states,
            "rejections": self.rejections.to_dicts(),
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def problems(
    runs: pl.DataFrame, *, last_full_success: datetime | None, now: datetime, max_lag: timedelta
) -> list[str]:
    """What is wrong, as sentences naming the run or the lag (empty when healthy).

    Args:
        runs: recent runs, newest first (``derive.io.history.recent_runs``).
    """
    found: list[str] = []
    decisive = runs.filter(pl.col("status") != "skipped").head(1)
    if decisive.height and decisive.item(0, "status") == "failed":
        row = decisive.row(0, named=True)
        found.append(
            f"the last run ({row['run_id']}, as_of {row['as_of'].isoformat()}) failed: "
            f"{row['error'] or 'no error text'}"
        )
    if last_full_success is None:
        found.append("no full derive run has succeeded yet")
    elif now - last_full_success > max_lag:
        found.append(
            f"the last successful full run finished {human_duration(now - last_full_success)}"
            f" ago, more than --max-lag {format_duration(max_lag)}"
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


def collect_status(db: Db, *, max_lag: timedelta, limit: int = 10) -> StatusReport:
    """Read the run log, the state distribution and the recent rejections."""
    now = history.server_now(db)
    runs = history.recent_runs(db, job=JOB, limit=limit)
    full, any_scope = history.last_success(db, job=JOB)
    stored = history.state_distribution(db)
    states = {s: stored.get(s, 0) for s in STATES}
    rejections = history.rejections_by_reason(db, now=now)
    return StatusReport(
        database=db.label,
        now=now,
        max_lag=max_lag,
        runs=runs,
        states=states,
        rejections=rejections,
        last_full_success=full,
        last_any_success=any_scope,
        problems=problems(runs, last_full_success=full, now=now, max_lag=max_lag),
    )
