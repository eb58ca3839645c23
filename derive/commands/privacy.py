"""Privacy operations: ``derive export``, ``derive erase`` and ``derive prune``."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from derive.commands.common import (
    DsnOpt,
    JsonOpt,
    RulesOpt,
    duration,
    examples,
    out,
    print_json,
    rules_from,
    table,
)
from derive.config import DURATION_FORMS
from derive.errors import UsageError
from derive.io.privacy import SubjectKind

UserOpt = Annotated[
    str | None,
    typer.Option(
        "--user",
        help="A user id: an audience member (audience_events / audience_state) and a tenant "
        "(users and seed 002's tables).",
        metavar="UUID",
    ),
]
ProspectOpt = Annotated[
    str | None,
    typer.Option("--prospect", help="One prospect of a tenant (prospects.id).", metavar="UUID"),
]


def subject_of(user: str | None, prospect: str | None) -> tuple[SubjectKind, uuid.UUID]:
    """The one subject named by ``--user`` or ``--prospect``; anything else is a usage error."""
    if (user is None) == (prospect is None):
        raise UsageError("give exactly one of --user UUID or --prospect UUID")
    kind: SubjectKind = "user" if user is not None else "prospect"
    value = user if user is not None else prospect
    assert value is not None
    try:
        return kind, uuid.UUID(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a UUID", param_hint=f"--{kind}") from None


class ExportFormatOpt(StrEnum):
    """``derive export --format`` values."""

    jsonl = "jsonl"
    parquet = "parquet"


@examples(
    "derive export --user 3f2b8c1e-0b7a-4d7e-9a52-1c3e5f7a9b0d",
    "derive export --prospect 9d1c7a52-4e3b-4f0a-8b6d-2a5c7e9f1b3d --format parquet --out /tmp/p",
)
def export_cmd(
    user: UserOpt = None,
    prospect: ProspectOpt = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Directory to write (default: ./export-UUID).", metavar="DIR"),
    ] = None,
    output: Annotated[
        ExportFormatOpt,
        typer.Option(
            "--format", help="jsonl (one JSON object per row) or parquet.", metavar="FORMAT"
        ),
    ] = ExportFormatOpt.jsonl,
    force: Annotated[
        bool,
        typer.Option("--force", help="Write into a directory that is not empty."),
    ] = False,
    dsn: DsnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export everything stored about one person: one file per table plus manifest.json.

    For a user id: their events (audit and validation_fail rows included), state, state
    history and the runs that named them, and as a tenant their users row (the attribution salt
    withheld), prospects, surface metrics, aggregates, touchpoints, attribution credits and
    ingestion sessions. For --prospect: the prospect, its touchpoints (and the anonymous ones of the
    same tenant with the same identifier hash) and their credits. Read-only, from one snapshot.
    Connected as a role that cannot become service_role (a tenant), row-level security decides
    what is exported; tables the role cannot read are listed in the manifest. An unknown id
    writes nothing and exits 0.
    """
    from derive.io.database import open_db
    from derive.jobs.privacy import export_subject, nothing_stored

    kind, subject = subject_of(user, prospect)
    target = out_dir if out_dir is not None else Path(f"export-{subject}")
    with open_db(dsn) as db:
        result = export_subject(
            db, kind=kind, subject=subject, out=target, fmt=output.value, force=force
        )
    if as_json:
        print_json(result.as_dict())
        return
    if result.rows == 0:
        out.print(nothing_stored(kind, subject, result.role), markup=False)
        return
    rows = [[t, n, result.file_name(t)] for t, n in result.tables.items()]
    rows += [[t, "-", "not readable by this role"] for t in result.not_readable]
    out.print(table(f"export of {kind} {subject} -> {target}", ["table", "rows", "file"], rows))
    out.print(
        f"{result.rows} rows as of {result.exported_at} (role {result.role}); manifest.json lists them",
        markup=False,
    )


@examples(
    "derive erase --user 3f2b8c1e-0b7a-4d7e-9a52-1c3e5f7a9b0d --dry-run",
    "derive erase --prospect 9d1c7a52-4e3b-4f0a-8b6d-2a5c7e9f1b3d",
)
def erase_cmd(
    user: UserOpt = None,
    prospect: ProspectOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")
    ] = False,
    dsn: DsnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete everything stored about one person, everywhere, in one transaction.

    The same rows `derive export` finds: deleted (runs that named the id keep their row, the id
    in their arguments becomes "erased"). Logged as an `erase` run that holds the derivation's
    lock, so no derive run can read the person before and write them back after; exits 75 when
    a run holds it. Leaves one `subject_erased` system event with the subject kind, the tables,
    the row counts, the time and the run id, and no id of the person. A crash at any point leaves
    everything in place. An unknown id deletes nothing and exits 0.
    """
    from derive.config import utc_now
    from derive.io.database import open_db
    from derive.jobs.privacy import erase_subject, nothing_stored

    kind, subject = subject_of(user, prospect)
    with open_db(dsn) as db:
        result = erase_subject(db, kind=kind, subject=subject, as_of=utc_now(), dry_run=dry_run)
    if as_json:
        print_json(result.as_dict())
        return
    if result.rows == 0:
        out.print(nothing_stored(kind, subject), markup=False)
        return
    verb = "would delete" if dry_run else "deleted"
    rows = [[t, n] for t, n in result.tables.items() if n]
    head = "dry run (nothing deleted)" if dry_run else f"erase run {result.run_id}"
    out.print(table(f"{head}: {kind} {subject}", ["table", "rows"], rows))
    out.print(f"{verb} {result.rows} rows", markup=False)


def _when(cutoff: datetime | None) -> str:
    return "kept forever" if cutoff is None else f"{cutoff:%Y-%m-%d %H:%M}"


@examples("derive prune --dry-run", "derive prune --archive /var/lib/derive/archive")
def prune_cmd(
    rules: RulesOpt = None,
    lookback: Annotated[
        str | None,
        typer.Option(
            "--lookback",
            help=f"The lookback your derive runs use, if longer than any in the run log and "
            f"than 120d: {DURATION_FORMS}.",
            metavar="DURATION",
        ),
    ] = None,
    archive: Annotated[
        Path | None,
        typer.Option(
            "--archive",
            help="Write what is deleted to Parquet here first (one file per batch).",
            metavar="DIR",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would go; change nothing.")
    ] = False,
    dsn: DsnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply the retention of the rules file's [retention] section (`derive schedule` runs it nightly).

    Deletes non-system events older than the longest lookback derive has used plus
    events_margin_days (counted back from the last full run, so no run's window is touched),
    audit and validation_fail rows older than system_events_days (never the audit row a stored
    state points at, never a subject_erased record), clears raw payload_jsonb of surface_metrics
    and prospect_touchpoints older than payload_days (a conversion keeps its amount and
    currency), and drops audience_state_history steps older than state_history_days. Batches of
    batch_rows rows, each in its own short transaction; logged as a `prune` run; a second prune
    removes nothing. Exit codes: 0 done, 1 failed, 2 usage error, 75 skipped (another prune runs).
    """
    from derive.io.database import open_db
    from derive.jobs.prune import run_prune

    loaded = rules_from(rules)
    window = None if lookback is None else duration(lookback, "--lookback")  # before connecting
    with open_db(dsn) as db:
        result = run_prune(db, rules=loaded, lookback=window, archive=archive, dry_run=dry_run)
    if as_json:
        print_json(result.as_dict())
        return
    head = "dry run (nothing removed)" if dry_run else f"prune run {result.run_id}"
    out.print(
        f"[bold]{head}[/]  now {result.now.isoformat()}  longest lookback "
        f"{result.lookback.days}d  rules {loaded.tag}"
    )
    rows = [[name, _when(result.cutoffs[name]), n] for name, n in result.rows.items()]
    out.print(table("", ["target", "older than", "would go" if dry_run else "removed"], rows))
    if result.archived:
        out.print(f"archived {len(result.archived)} parquet file(s) under {archive}", markup=False)
