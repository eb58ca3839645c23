"""``derive ingest metrics``: adapter output -> validated, insert-only ``surface_metrics`` rows.

Wiring: read the file (``derive.io.metrics``) -> validate every row (pure,
``derive.transforms.metrics_contract``) -> one transaction as ``service_role``: owner rows, bulk
insert of the valid rows, one ingestion session per ``FetchMetricsOutput`` object with its steps.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import polars as pl

from derive.config import utc_now
from derive.errors import ContractError, UsageError
from derive.io.connect import Db
from derive.io.metrics import (
    FetchOutput,
    ensure_owner_rows,
    insert_sessions,
    insert_surface_metrics,
    read_fetch_output,
)
from derive.metrics_rules import MetricsRules
from derive.transforms.metrics_contract import validate_metric_rows

Source = Literal["native_scrape", "native_api", "manual"]
SOURCES: tuple[str, ...] = ("native_scrape", "native_api", "manual")
TS = pl.Datetime("us", "UTC")


@dataclass(frozen=True)
class IngestResult:
    """What an ingestion did: one summary per session, and every rejected row."""

    sessions: pl.DataFrame
    rejected: pl.DataFrame
    inserted: int
    strict_rejected: bool

    @property
    def rows_rejected(self) -> int:
        """Number of rejected rows in the file."""
        return self.rejected.height


def _owner(
    objects: list[FetchOutput], attr: str, option: str | None, flag: str
) -> list[str | None]:
    owners: list[str | None] = []
    for obj in objects:
        from_file = getattr(obj, attr)
        if from_file is not None and option is not None and from_file != option:
            raise ContractError(
                f"object {obj.object} names {attr} {from_file} but {flag} says {option}; "
                f"drop one of them"
            )
        owners.append(from_file or option)
    return owners


def _reject_nul_objects(
    objects: list[FetchOutput], valid: pl.DataFrame, rejected: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Reject every otherwise valid row of an object whose surface or health_note holds U+0000."""
    bad = pl.DataFrame(
        {
            "object": [o.object for o in objects if o.nul_fields],
            "detail": [
                f"{' and '.join(o.nul_fields)} of object {o.object} contains a NUL character"
                " (\\u0000), which PostgreSQL text cannot store; remove it from the adapter output"
                for o in objects
                if o.nul_fields
            ],
        },
        schema={"object": pl.Int32, "detail": pl.String},
    )
    if bad.is_empty():
        return valid, rejected
    moved = valid.join(bad, on="object").select(
        "object", "row", reasons=pl.lit(["nul_character"]), detail="detail"
    )
    return (
        valid.join(bad, on="object", how="anti"),
        pl.concat([rejected, moved.cast(rejected.schema)]).sort("object", "row"),
    )


def _canonical_uuid(value: str | None, flag: str) -> str | None:
    if value is None:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise UsageError(f"{flag} {value!r} is not a UUID") from None


def ingest_metrics(
    db: Db,
    path: str,
    *,
    rules: MetricsRules,
    user_id: str | None = None,
    org_id: str | None = None,
    source: str = "native_scrape",
    strict: bool = False,
    fetched_at: datetime | None = None,
) -> IngestResult:
    """Validate and insert one file of ``FetchMetricsOutput`` and record its sessions.

    The users (and orgs) row the foreign keys need is created when missing. Valid rows are
    inserted (insert-only: a re-ingest adds newer fetches; the rollup reads the newest), unless
    ``strict`` and any row is rejected: then nothing is inserted and every session is recorded as
    ``rejected``.

    Args:
        path: the file, or ``-`` for stdin.
        user_id: owner of rows whose object has no ``user_id``.
        fetched_at: the fetch time stamped on every row (default: now).

    Raises:
        UsageError: a bad ``--user``/``--org``/``--source``, or no user for an object.
        ContractError: the file breaks the contract at object level.
    """
    if source not in SOURCES:
        raise UsageError(f"--source {source!r} is not one of {', '.join(SOURCES)}")
    user_id = _canonical_uuid(user_id, "--user")
    org_id = _canonical_uuid(org_id, "--org")
    started = fetched_at or utc_now()
    clock = [time.perf_counter()]

    def stamp() -> datetime:
        return started + timedelta(seconds=time.perf_counter() - clock[0])

    t_fetch = stamp()
    objects, raw = read_fetch_output(path)
    t_parse = stamp()
    users = _owner(objects, "user_id", user_id, "--user")
    orgs = _owner(objects, "org_id", org_id, "--org")
    missing = [o.object for o, u in zip(objects, users, strict=True) if u is None]
    if missing:
        raise UsageError(
            f"object(s) {', '.join(map(str, missing))} name no user_id: pass --user UUID"
        )
    owners = pl.DataFrame(
        {
            "object": [o.object for o in objects],
            "user_id": users,
            "org_id": orgs,
            "surface": [o.surface for o in objects],
        },
        schema={
            "object": pl.Int32,
            "user_id": pl.String,
            "org_id": pl.String,
            "surface": pl.String,
        },
    )
    valid_lf, rejected_lf = validate_metric_rows(
        raw.lazy(), kinds=rules.kind_names, monetary_kinds=rules.monetary_kinds
    )
    valid, rejected = pl.collect_all([valid_lf, rejected_lf])
    valid, rejected = _reject_nul_objects(objects, valid, rejected)
    strict_rejected = strict and rejected.height > 0
    to_insert = valid.clear() if strict_rejected else valid
    rows = to_insert.join(owners, on="object", how="left").select(
        "object",
        "row",
        "user_id",
        "org_id",
        "surface",
        "metric_kind",
        "window_start",
        "window_end",
        "value_numeric",
        "value_text",
        "currency",
        source=pl.lit(source),
        fetched_at=pl.lit(started, TS),
        payload_jsonb="payload_jsonb",
    )
    t_persist = stamp()
    file_name = "-" if path == "-" else path
    session_ids = [str(uuid.uuid4()) for _ in objects]
    with db.transaction(role="service_role"):
        ensure_owner_rows(
            db,
            user_ids=sorted({u for u in users if u is not None}),
            org_ids=sorted({o for o in orgs if o is not None}),
        )
        inserted = insert_surface_metrics(db, rows)
        t_audit = stamp()
        sessions, steps = _session_frames(
            objects,
            owners,
            session_ids,
            valid,
            rejected,
            inserted_objects=to_insert,
            source=source,
            file_name=file_name,
            started=started,
            marks=(t_fetch, t_parse, t_persist, t_audit, stamp()),
        )
        insert_sessions(db, sessions, steps)
    summary = sessions.select(
        "id",
        "surface",
        "status",
        "rows_received",
        "rows_inserted",
        "rows_rejected",
        "health_note",
        "next_poll_after",
    )
    return IngestResult(summary, rejected, inserted, strict_rejected)


def _session_frames(
    objects: list[FetchOutput],
    owners: pl.DataFrame,
    session_ids: list[str],
    valid: pl.DataFrame,
    rejected: pl.DataFrame,
    *,
    inserted_objects: pl.DataFrame,
    source: str,
    file_name: str,
    started: datetime,
    marks: tuple[datetime, datetime, datetime, datetime, datetime],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One session row per object and its five steps, as frames ready for bulk insert."""
    t_fetch, t_parse, t_persist, t_audit, t_end = marks
    per_object = pl.DataFrame(
        {
            "object": [o.object for o in objects],
            "id": session_ids,
            "health_note": [o.health_note for o in objects],
            "next_poll_after_ms": [o.next_poll_after_ms for o in objects],
            "rows_received": [o.rows for o in objects],
        },
        schema={
            "object": pl.Int32,
            "id": pl.String,
            "health_note": pl.String,
            "next_poll_after_ms": pl.Int64,
            "rows_received": pl.Int32,
        },
    )
    counts = (
        per_object.select("object")
        .join(valid.group_by("object").agg(rows_valid=pl.len()), on="object", how="left")
        .join(
            inserted_objects.group_by("object").agg(rows_inserted=pl.len()), on="object", how="left"
        )
        .join(
            rejected.group_by("object").agg(
                rows_rejected=pl.len(),
                rejections=pl.format(
                    "[{}]",
                    pl.struct("row", "reasons", "detail").struct.json_encode().str.join(","),
                ),
            ),
            on="object",
            how="left",
        )
        .join(
            rejected.explode("reasons")
            .group_by("object", "reasons")
            .agg(n=pl.len())
            .sort("object", "reasons")
            .group_by("object", maintain_order=True)
            .agg(
                rejected_by_reason=pl.concat_str(
                    pl.lit("{"), pl.format('"{}": {}', "reasons", "n").str.join(", "), pl.lit("}")
                )
            ),
            on="object",
            how="left",
        )
        .with_columns(
            pl.col("rows_valid", "rows_inserted", "rows_rejected").fill_null(0).cast(pl.Int32),
            pl.col("rejections").fill_null("[]"),
            pl.col("rejected_by_reason").fill_null("{}"),
        )
    )
    status = (
        pl.when(pl.col("rows_rejected") == 0)
        .then(pl.lit("succeeded"))
        .when(pl.col("rows_inserted") > 0)
        .then(pl.lit("partial"))
        .otherwise(pl.lit("rejected"))
    )
    sessions = (
        per_object.join(counts, on="object")
        .join(owners, on="object")
        .with_columns(status=status)
        .select(
            "object",
            "id",
            kind=pl.lit("surface_metrics"),
            user_id="user_id",
            org_id="org_id",
            surface="surface",
            source=pl.lit(source),
            file_name=pl.lit(file_name),
            status="status",
            rows_received="rows_received",
            rows_valid="rows_valid",
            rows_inserted="rows_inserted",
            rows_rejected="rows_rejected",
            rejected_by_reason="rejected_by_reason",
            rejections="rejections",
            health_note="health_note",
            next_poll_after_ms="next_poll_after_ms",
            next_poll_after=pl.lit(started, TS)
            + pl.duration(milliseconds=pl.col("next_poll_after_ms")),
            started_at=pl.lit(started, TS),
        )
        .sort("object")
    )
    step_rows = sessions.select(
        "id",
        pl.struct(
            step=pl.lit("tier_check"),
            ordinal=pl.lit(1),
            status=pl.when(pl.col("rows_received") == 0)
            .then(pl.lit("empty"))
            .otherwise(pl.lit("ok")),
            started_at=pl.lit(started, TS),
            finished_at=pl.lit(t_fetch, TS),
            detail=pl.struct(rows_offered="rows_received").struct.json_encode(),
        ).alias("s1"),
        pl.struct(
            step=pl.lit("fetch"),
            ordinal=pl.lit(2),
            status=pl.lit("ok"),
            started_at=pl.lit(t_fetch, TS),
            finished_at=pl.lit(t_parse, TS),
            detail=pl.struct(
                file=pl.lit(file_name), objects=pl.lit(len(objects))
            ).struct.json_encode(),
        ).alias("s2"),
        pl.struct(
            step=pl.lit("parse"),
            ordinal=pl.lit(3),
            status=pl.when(pl.col("rows_rejected") == 0)
            .then(pl.lit("ok"))
            .when(pl.col("rows_valid") > 0)
            .then(pl.lit("partial"))
            .otherwise(pl.lit("rejected")),
            started_at=pl.lit(t_parse, TS),
            finished_at=pl.lit(t_persist, TS),
            detail=pl.concat_str(
                pl.lit('{"valid": '),
                pl.col("rows_valid").cast(pl.String),
                pl.lit(', "rejected": '),
                pl.col("rows_rejected").cast(pl.String),
                pl.lit(', "rejected_by_reason": '),
                "rejected_by_reason",
                pl.lit("}"),
            ),
        ).alias("s3"),
        pl.struct(
            step=pl.lit("persist"),
            ordinal=pl.lit(4),
            status=pl.when(pl.col("rows_inserted") > 0)
            .then(pl.lit("ok"))
            .otherwise(pl.lit("skipped")),
            started_at=pl.lit(t_persist, TS),
            finished_at=pl.lit(t_audit, TS),
            detail=pl.struct(
                inserted="rows_inserted", table=pl.lit("surface_metrics")
            ).struct.json_encode(),
        ).alias("s4"),
        pl.struct(
            step=pl.lit("audit"),
            ordinal=pl.lit(5),
            status=pl.lit("ok"),
            started_at=pl.lit(t_audit, TS),
            finished_at=pl.lit(t_end, TS),
            detail=pl.struct(session_status="status").struct.json_encode(),
        ).alias("s5"),
    )
    steps = (
        step_rows.unpivot(index="id", on=["s1", "s2", "s3", "s4", "s5"])
        .unnest("value")
        .select(
            session_id="id",
            ordinal=pl.col("ordinal").cast(pl.Int16),
            step="step",
            status="status",
            started_at="started_at",
            finished_at="finished_at",
            detail="detail",
        )
        .sort("session_id", "ordinal")
    )
    return sessions.drop("object", "rows_valid"), steps
