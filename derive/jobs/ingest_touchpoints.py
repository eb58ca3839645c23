"""``derive ingest touchpoints FILE``: validate JSON lines of surface events and store the new ones.

parse + validate (pure, ``derive.transforms.touchpoints``) -> one transaction: bulk COPY into a
temporary table, refuse lines whose user/org/prospect is unknown, create missing salts, insert
the events not stored yet (idempotent on (surface, external_id)) with their identifier hashes.
The run holds the job's advisory lock and is logged in ``derivation_runs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl

from derive.config import utc_now
from derive.io.connect import Db
from derive.io.runlog import job_run
from derive.io.touchpoints import insert_touchpoints, read_lines
from derive.transforms.touchpoints import parse_touchpoint_lines

JOB = "ingest_touchpoints"


@dataclass
class IngestReport:
    """What an ingest read, refused and stored."""

    run_id: str
    file: str
    lines: int
    inserted: int
    duplicates_in_file: int
    already_stored: int
    salts_created: int
    rejected: pl.DataFrame  # line_no, reason, detail (the field and its value)
    strict_rejected: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        """Lines that were valid (stored now, stored before, or repeated in the file)."""
        return self.lines - self.rejected.height

    def rejected_by_reason(self) -> dict[str, int]:
        """How many lines were refused for each reason."""
        counts = self.rejected.group_by("reason").len().sort("reason")
        return {str(r): int(n) for r, n in counts.iter_rows()}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (rejected lines listed with their line numbers)."""
        return {
            "run_id": self.run_id,
            "file": self.file,
            "lines": self.lines,
            "inserted": self.inserted,
            "duplicates_in_file": self.duplicates_in_file,
            "already_stored": self.already_stored,
            "salts_created": self.salts_created,
            "rejected": self.rejected_by_reason(),
            "rejected_lines": self.rejected.to_dicts(),
            "strict_rejected": self.strict_rejected,
            "timings": self.timings,
        }


def ingest_touchpoints(db: Db, path: str, *, strict: bool = False) -> IngestReport:
    """Ingest the touchpoints of ``path`` (JSON lines, ``-``: stdin); a second ingest inserts
    nothing. ``strict``: insert nothing when any line is refused.

    Raises:
        UsageError: the file cannot be read.
        ContractError: the file is not UTF-8.
        LockBusy: another ingest holds the lock.
        SourceError: the database refused the transaction (nothing is kept).
    """
    lines = read_lines(path)
    with job_run(db, job=JOB, as_of=utc_now(), args={"file": path}) as run:
        with run.phase("parse"):
            parsed = parse_touchpoint_lines(lines.lazy()).collect()
            valid = parsed.filter(pl.col("reason").is_null())
            invalid = parsed.filter(pl.col("reason").is_not_null()).select(
                "line_no", "reason", "detail"
            )
        with run.phase("persist"), db.transaction(role="service_role"):
            stored = insert_touchpoints(
                db, valid.clear() if strict and invalid.height else valid, strict=strict
            )
        rejected = pl.concat([invalid, stored.rejected]).sort("line_no")
        strict_rejected = strict and rejected.height > 0
        report = IngestReport(
            run_id=run.run_id,
            file="stdin" if path == "-" else path,
            lines=parsed.height,
            inserted=stored.inserted,
            duplicates_in_file=stored.duplicates_in_file,
            already_stored=stored.already_stored,
            salts_created=stored.salts_created,
            rejected=rejected,
            strict_rejected=strict_rejected,
        )
        run.counts = {
            k: v
            for k, v in report.as_dict().items()
            if k not in ("rejected_lines", "timings", "run_id", "strict_rejected")
        }
        report.timings = run.timings
    return report
