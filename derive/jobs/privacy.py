"""``derive export`` and ``derive erase``: a person's data out, or gone (GDPR / CCPA).

Export reads every row about the subject from ONE read-only REPEATABLE READ snapshot and writes one
file per table (JSON lines or Parquet) plus ``manifest.json`` (row counts, file names, the snapshot
time). It runs as ``service_role`` when the connection may switch to it, else as the connecting
role, whose row-level security then decides what is visible (a tenant exports only its own rows).

Erase deletes the same rows in ONE transaction under a logged ``erase`` run that holds the
derivation's lock (no derive run can read the person before and write them back after), and leaves
one ``subject_erased`` system event without personal data. Neither the run row nor the event holds
the id.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from derive import __version__
from derive.errors import UsageError
from derive.io import privacy
from derive.io.connect import Db
from derive.io.privacy import SubjectKind
from derive.io.runlog import job_run
from derive.jobs.derivation import JOB as DERIVE_JOB

JOB = "erase"
ExportFormat = Literal["jsonl", "parquet"]
MANIFEST = "manifest.json"


def nothing_stored(kind: SubjectKind, subject: uuid.UUID, role: str | None = None) -> str:
    """The message for a subject without rows (exit 0: that is an answer, not an error)."""
    seen = f" (visible to role {role})" if role and role != "service_role" else ""
    return f"nothing stored about {kind} {subject}{seen}"


@dataclass
class ExportResult:
    """What an export found and wrote."""

    kind: SubjectKind
    subject: uuid.UUID
    format: ExportFormat
    role: str
    exported_at: str
    directory: Path | None
    tables: dict[str, int] = field(default_factory=dict)
    not_readable: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Rows exported over all tables."""
        return sum(self.tables.values())

    def file_name(self, table: str) -> str:
        """The file that holds a table's rows."""
        return f"{table}.{self.format}"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form; also the manifest."""
        return {
            "subject": {"kind": self.kind, "id": str(self.subject)},
            "exported_at": self.exported_at,
            "format": self.format,
            "role": self.role,
            "directory": None if self.directory is None else str(self.directory),
            "rows": self.rows,
            "tables": {t: {"rows": n, "file": self.file_name(t)} for t, n in self.tables.items()},
            "not_readable": self.not_readable,
            "withheld": {
                s.table: list(s.withheld) for s in privacy.SELECTIONS[self.kind] if s.withheld
            },
            "derived_by": f"derive {__version__}",
        }


def check_out_dir(out: Path, *, force: bool) -> None:
    """Refuse an existing non-empty directory (or a file) unless ``force``.

    Raises:
        UsageError: naming the path and what to do.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(
            f"export directory {out} exists and is not empty; choose another --out or pass"
            " --force to write into it (files of the same name are replaced)"
        )


def _write_atomically(target: Path, data: bytes) -> None:
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, target)


def _write_table(target: Path, table: pa.Table, fmt: ExportFormat) -> None:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        _write_atomically(target, sink.getvalue().to_pybytes())
        return
    lines = table.column("line").to_pylist() if table.num_rows else []
    _write_atomically(target, "".join(f"{line}\n" for line in lines).encode())


def export_subject(
    db: Db,
    *,
    kind: SubjectKind,
    subject: uuid.UUID,
    out: Path,
    fmt: ExportFormat = "jsonl",
    force: bool = False,
) -> ExportResult:
    """Export everything stored about one subject into ``out``; nothing is written when no row is.

    Raises:
        UsageError: ``out`` exists and is not empty (without ``force``).
    """
    check_out_dir(out, force=force)
    data: dict[str, pa.Table] = {}
    try:
        role = privacy.begin_subject(db, subject=str(subject), read_only=True)
        result = ExportResult(
            kind=kind,
            subject=subject,
            format=fmt,
            role=role,
            exported_at=privacy.database_time(db),
            directory=None,
        )
        for selection in privacy.SELECTIONS[kind]:
            visible = privacy.readable(db, selection.table)
            if visible is None:
                continue
            if not visible:
                result.not_readable.append(selection.table)
                continue
            data[selection.table] = privacy.read_rows(db, selection, typed=fmt == "parquet")
            result.tables[selection.table] = data[selection.table].num_rows
    finally:
        db.rollback()
    if result.rows == 0:
        return result
    out.mkdir(parents=True, exist_ok=True)
    for table, rows in data.items():
        _write_table(out / result.file_name(table), rows, fmt)
    result.directory = out
    manifest = json.dumps(result.as_dict(), indent=2) + "\n"
    _write_atomically(out / MANIFEST, manifest.encode())
    return result


@dataclass
class EraseResult:
    """What an erase deleted (or, dry, would delete)."""

    kind: SubjectKind
    subject: uuid.UUID
    dry_run: bool
    run_id: str | None
    tables: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows deleted (or scrubbed) over all tables."""
        return sum(self.tables.values())

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "subject": {"kind": self.kind, "id": str(self.subject)},
            "dry_run": self.dry_run,
            "run_id": self.run_id,
            "rows": self.rows,
            "tables": self.tables,
        }


def count_subject(db: Db, *, kind: SubjectKind, subject: uuid.UUID) -> dict[str, int]:
    """Rows about the subject per table, from one snapshot (what an erase would delete)."""
    counts: dict[str, int] = {}
    try:
        privacy.begin_subject(db, subject=str(subject), read_only=True)
        for selection in privacy.SELECTIONS[kind]:
            if privacy.readable(db, selection.table) is not None:
                counts[selection.table] = privacy.count_rows(db, selection)
    finally:
        db.rollback()
    return counts


def erase_subject(
    db: Db, *, kind: SubjectKind, subject: uuid.UUID, as_of: datetime, dry_run: bool = False
) -> EraseResult:
    """Delete everything stored about one subject in one transaction (or count it, dry).

    Nothing is logged when nothing is stored. The run row records the subject kind and the
    counts, never the id.

    Raises:
        LockBusy: a derive run holds the derivation's lock (exit 75; retry later).
    """
    counts = count_subject(db, kind=kind, subject=subject)
    result = EraseResult(kind=kind, subject=subject, dry_run=dry_run, run_id=None, tables=counts)
    if dry_run or result.rows == 0:
        return result
    with job_run(db, job=JOB, as_of=as_of, args={"subject": kind}, lock=DERIVE_JOB) as run:
        result.run_id = run.run_id
        result.tables = privacy.delete_subject(
            db, kind=kind, subject=str(subject), run=run, derived_by=f"derive {__version__}"
        )
    return result
