"""``derive prune``: retention from the rules file's ``[retention]``, batched, logged, idempotent.

What goes (SPEC §1 tables; ages in days from the rules):
- non-system ``audience_events`` older than the longest lookback plus ``events_margin_days``,
  counted back from the earlier of now and the last full derive run's as_of, so neither the next
  run's window nor the events an incremental run sees leaving the window are touched;
- system rows (audit, validation_fail) older than ``system_events_days``, except the audit row a
  stored state points at and every ``subject_erased`` record;
- raw ``payload_jsonb`` of surface_metrics (cleared) and prospect_touchpoints (reduced to the
  amount and currency attribution reads) older than ``payload_days``;
- ``audience_state_history`` steps older than ``state_history_days``.

A second prune finds nothing left to remove. Each batch is its own short transaction; with an
archive directory the batch's old rows are written to Parquet (fsynced) before it commits, so a
row is never gone without its copy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from derive.config import Retention, Rules, format_duration
from derive.io import retention as sql
from derive.io.connect import Db
from derive.io.retention import Target
from derive.io.runlog import job_run
from derive.jobs.derivation import JOB as DERIVE_JOB

JOB = "prune"
DEFAULT_LOOKBACK = timedelta(days=120)
TARGETS: tuple[Target, ...] = (
    sql.STATE_HISTORY,
    sql.EVENTS,
    sql.SYSTEM_EVENTS,
    sql.METRIC_PAYLOADS,
    sql.TOUCHPOINT_PAYLOADS,
)


def cutoffs(
    retention: Retention,
    *,
    now: datetime,
    lookback: timedelta,
    base_as_of: datetime | None,
) -> dict[str, datetime | None]:
    """The cutoff of every target (``None``: kept forever). Pure.

    Args:
        lookback: the longest lookback derive runs with.
        base_as_of: as_of of the last successful full derive run (``None``: never ran).
    """

    def days(value: int | None, start: datetime) -> datetime | None:
        return None if value is None else start - timedelta(days=value)

    window_start = min(now, base_as_of or now) - lookback
    return {
        sql.EVENTS.name: days(retention.events_margin_days, window_start),
        sql.SYSTEM_EVENTS.name: days(retention.system_events_days, now),
        sql.METRIC_PAYLOADS.name: days(retention.payload_days, now),
        sql.TOUCHPOINT_PAYLOADS.name: days(retention.payload_days, now),
        sql.STATE_HISTORY.name: days(retention.state_history_days, now),
    }


@dataclass
class PruneResult:
    """What a prune removed (or, dry, would remove)."""

    run_id: str | None
    dry_run: bool
    now: datetime
    lookback: timedelta
    cutoffs: dict[str, datetime | None]
    rows: dict[str, int] = field(default_factory=dict)
    history_steps: int = 0
    archived: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "run_id": self.run_id,
            "dry_run": self.dry_run,
            "now": self.now.isoformat(),
            "lookback": format_duration(self.lookback),
            "cutoffs": {k: None if v is None else v.isoformat() for k, v in self.cutoffs.items()},
            "rows": self.rows,
            "history_steps": self.history_steps,
            "archived_files": self.archived,
        }


def _archive(directory: Path, target: Target, run_id: str, batch: int, rows: pa.Table) -> str:
    import pyarrow.parquet as pq

    folder = directory / target.name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}-{batch:05d}.parquet"
    temporary = path.with_name(f".{path.name}.tmp")
    pq.write_table(rows, temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return str(path)


def _prune_target(
    db: Db,
    target: Target,
    *,
    cutoff: datetime,
    limit: int,
    archive: Path | None,
    run_id: str,
    archived: list[str],
) -> int:
    total = 0
    batch = 0
    while True:
        try:
            n, rows = sql.prune_batch(
                db, target, cutoff=cutoff, limit=limit, archive=archive is not None
            )
            if archive is not None and rows is not None and n:
                archived.append(_archive(archive, target, run_id, batch, rows))
            db.commit()
        finally:
            db.rollback()
        total += n
        batch += 1
        if n < limit:
            return total


def run_prune(
    db: Db,
    *,
    rules: Rules,
    lookback: timedelta | None = None,
    archive: Path | None = None,
    dry_run: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> PruneResult:
    """Apply the rules' retention once.

    Args:
        lookback: the lookback your derive runs use, if longer than any in the run log (the
            longest of this, the run log's and 120d protects the window).
        progress: called with each target's name and rows when it is done.

    Raises:
        LockBusy: another prune holds the lock (exit 75).
    """
    now, logged, base_as_of = sql.lookback_facts(db, job=DERIVE_JOB)
    longest = max(d for d in (DEFAULT_LOOKBACK, lookback, logged) if d is not None)
    limits = cutoffs(rules.retention, now=now, lookback=longest, base_as_of=base_as_of)
    result = PruneResult(run_id=None, dry_run=dry_run, now=now, lookback=longest, cutoffs=limits)
    if dry_run:
        for target in TARGETS:
            cutoff = limits[target.name]
            result.rows[target.name] = (
                0 if cutoff is None else sql.count_due(db, target, cutoff=cutoff)
            )
        return result
    args = {"archive": None if archive is None else str(archive), "rules": rules.source}
    with job_run(db, job=JOB, as_of=now, lookback=longest, args=args) as run:
        result.run_id = run.run_id
        for target in TARGETS:
            cutoff = limits[target.name]
            if cutoff is None:
                result.rows[target.name] = 0
                continue
            with run.phase(target.name):
                if target is sql.STATE_HISTORY:
                    result.history_steps = sql.drop_history_markers(db, cutoff=cutoff)
                result.rows[target.name] = _prune_target(
                    db,
                    target,
                    cutoff=cutoff,
                    limit=rules.retention.batch_rows,
                    archive=archive,
                    run_id=run.run_id,
                    archived=result.archived,
                )
            if progress is not None:
                progress(target.name, result.rows[target.name])
        run.counts.update(
            {
                "rows": result.rows,
                "history_steps": result.history_steps,
                "archived_files": len(result.archived),
                "cutoffs": result.as_dict()["cutoffs"],
            }
        )
    return result


def schedule_units(
    *,
    executable: str,
    env_file: Path = Path("/etc/derive/derive.env"),
    log_file: Path = Path("/var/log/derive/prune.log"),
    at: str = "03:30",
) -> dict[str, str]:
    """A nightly crontab line and a systemd service + timer for ``derive prune``."""
    hour, minute = (int(part) for part in at.split(":"))
    command = f"{executable} prune"
    crontab = (
        "# derive: nightly retention (exit 75 = skipped, another prune held the lock)\n"
        f"{minute} {hour} * * * set -a && . {env_file} && set +a && {command} >> {log_file} 2>&1\n"
    )
    service = f"""[Unit]
Description=derive: retention (delete what the rules' [retention] says is past its age)
Wants=network-online.target
After=network-online.target postgresql.service

[Service]
Type=oneshot
EnvironmentFile={env_file}
ExecStart={command}
SuccessExitStatus=75
Nice=10
"""
    timer = f"""[Unit]
Description=derive: run the retention nightly

[Timer]
OnCalendar=*-*-* {hour:02d}:{minute:02d}:00
Persistent=true
Unit=derive-prune.service

[Install]
WantedBy=timers.target
"""
    return {
        "crontab (prune)": crontab,
        "derive-prune.service": service,
        "derive-prune.timer": timer,
    }
