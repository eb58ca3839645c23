"""``derive ingest``: touchpoint events and surface metrics from adapter output."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from derive.commands.common import (
    DsnOpt,
    JsonOpt,
    MetricsRulesOpt,
    examples,
    out,
    print_json,
    table,
)
from derive.errors import UsageError

FileArg = Annotated[
    str,
    typer.Argument(
        help="The file to ingest; - reads standard input.",
        metavar="FILE",
    ),
]
AllowPartialOpt = Annotated[
    bool,
    typer.Option(
        "--allow-partial",
        help="Exit 0 when some rows were rejected and the others stored (still 1 when none was "
        "valid).",
    ),
]
StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help="Store nothing when any row is rejected (exit 1)."),
]


def _check_modes(strict: bool, allow_partial: bool) -> None:
    if strict and allow_partial:
        raise UsageError("--strict and --allow-partial contradict each other: pick one")


def ingest_exit_code(*, rejected: int, valid: int, strict: bool, allow_partial: bool) -> int:
    """The exit code both ingest commands share (see their help)."""
    if not rejected:
        return 0
    if strict or not allow_partial or valid == 0:
        return 1
    return 0


@examples(
    "derive ingest touchpoints touchpoints.jsonl",
    "derive ingest touchpoints touchpoints.jsonl --json",
)
def ingest_touchpoints_cmd(
    file: FileArg,
    allow_partial: AllowPartialOpt = False,
    strict: StrictOpt = False,
    dsn: DsnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Store surface-side touchpoint events; a second ingest of the same events inserts nothing.

    Each line is a JSON object with user_id, surface, touchpoint (the kind, e.g. dm_inbound or
    tip), external_id, occurred_at (ISO-8601 with a zone) and optionally org_id, prospect_id,
    identifier, payload (an object; conversions carry amount and currency; an amount with more
    than 18 decimal places or 20 integer digits is refused, so credits always sum to it exactly)
    and ingestion_source (adapter_poll, webhook or manual). Events are unique on (surface,
    external_id). A raw identifier is never stored: only sha256(lower(surface:identifier) || the
    user's salt). Refused lines are reported as "line N: field: 'value' is not ...".
    Exit codes (both ingest commands): 0 every line stored (or --allow-partial and at least one
    line valid), 1 lines refused, nothing valid, --strict refused the file, or the file is not
    UTF-8, 2 usage error (bad option, missing or unreadable FILE).
    """
    from derive.io.database import open_db
    from derive.jobs.ingest_touchpoints import ingest_touchpoints

    _check_modes(strict, allow_partial)
    with open_db(dsn) as db:
        report = ingest_touchpoints(db, file, strict=strict)
    if as_json:
        print_json(report.as_dict())
    else:
        rows: list[list[Any]] = [
            ["lines", report.lines],
            ["inserted", report.inserted],
            ["duplicates in file", report.duplicates_in_file],
            ["already stored", report.already_stored],
            ["salts created", report.salts_created],
            *[[f"rejected: {reason}", n] for reason, n in report.rejected_by_reason().items()],
        ]
        out.print(table(f"touchpoints from {report.file}", ["", "count"], rows))
        for line_no, _reason, detail in report.rejected.head(50).iter_rows():
            out.print(f"line {line_no}: {detail}", markup=False)
        if report.rejected.height > 50:
            out.print(
                f"... {report.rejected.height - 50} more refused lines (--json lists them all)"
            )
        if report.strict_rejected:
            out.print("--strict: nothing was inserted because lines were refused")
    code = ingest_exit_code(
        rejected=report.rejected.height,
        valid=report.accepted,
        strict=strict,
        allow_partial=allow_partial,
    )
    if code:
        raise typer.Exit(code)


@examples(
    "derive ingest metrics fetch.json --user 3f2b8c1e-0b7a-4d7e-9a52-1c3e5f7a9b0d",
    "cat fetch.jsonl | derive ingest metrics - --allow-partial",
)
def ingest_metrics_cmd(
    file: FileArg,
    user: Annotated[
        str | None,
        typer.Option(
            "--user",
            help="Owner of the rows (needed unless each object has user_id).",
            metavar="UUID",
        ),
    ] = None,
    org: Annotated[
        str | None, typer.Option("--org", help="Org of the rows (optional).", metavar="UUID")
    ] = None,
    source: Annotated[
        str,
        typer.Option(
            "--source",
            help="How the adapter got the numbers: native_scrape, native_api or manual.",
            metavar="SOURCE",
        ),
    ] = "native_scrape",
    allow_partial: AllowPartialOpt = False,
    strict: StrictOpt = False,
    rules: MetricsRulesOpt = None,
    dsn: DsnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate an adapter's metric rows and append the valid ones to surface_metrics.

    Each object is {surface, rows: [{metric_kind, window_start, window_end, value_numeric |
    value_text, currency, payload_jsonb}], next_poll_after_ms, health_note} and may carry user_id
    and org_id. A row is rejected, with its object and row number and every reason, when its
    metric_kind is unknown, a window bound is not ISO-8601, window_end <= window_start, it has
    no value, a field has the wrong JSON type, or a monetary kind lacks an ISO-4217 currency.
    Rows are insert-only (stamped fetched_at = now; the rollup reads the newest fetch). The
    users row (and orgs row) the rows belong to is created when missing. Every object is recorded
    as an ingestion session with its steps, its health_note verbatim and next_poll_after; an
    empty rows list (e.g. "Basic tier - analytics require Standard+") is a valid session.
    A NUL character (\\u0000) in a row's value_text or payload_jsonb, or in an object's surface
    or health_note, rejects that row (or that object's rows); the other objects still land.
    Exit codes (both ingest commands): 0 every row stored (or --allow-partial and at least one
    row valid), 1 rows rejected, nothing valid, --strict refused the file, or the file breaks
    the format, 2 usage error (bad option, missing or unreadable FILE).
    """
    from derive.io.database import open_db
    from derive.jobs.ingest_metrics import ingest_metrics
    from derive.metrics_rules import load_metrics_rules

    _check_modes(strict, allow_partial)
    metrics_rules = load_metrics_rules(rules)
    with open_db(dsn) as db:
        result = ingest_metrics(
            db,
            file,
            rules=metrics_rules,
            user_id=user,
            org_id=org,
            source=source,
            strict=strict,
        )
    if as_json:
        print_json(
            {
                "inserted": result.inserted,
                "rejected": result.rows_rejected,
                "strict_rejected": result.strict_rejected,
                "sessions": result.sessions.to_dicts(),
                "rejected_rows": result.rejected.to_dicts(),
            }
        )
    else:
        out.print(
            table(
                f"ingested {file}",
                [
                    "surface",
                    "status",
                    "rows",
                    "inserted",
                    "rejected",
                    "next poll after",
                    "health note",
                ],
                [
                    [
                        s["surface"],
                        s["status"],
                        s["rows_received"],
                        s["rows_inserted"],
                        s["rows_rejected"],
                        s["next_poll_after"],
                        s["health_note"],
                    ]
                    for s in result.sessions.iter_rows(named=True)
                ],
            )
        )
        for obj, row, _reasons, detail in result.rejected.head(50).iter_rows():
            out.print(f"object {obj} row {row}: {detail}", markup=False)
        if result.rows_rejected > 50:
            out.print(f"... {result.rows_rejected - 50} more rejected rows (--json lists them all)")
        if result.strict_rejected:
            out.print("--strict: nothing was inserted because rows were rejected")
    code = ingest_exit_code(
        rejected=result.rows_rejected,
        valid=int(result.sessions["rows_received"].sum()) - result.rows_rejected,
        strict=strict,
        allow_partial=allow_partial,
    )
    if code:
        raise typer.Exit(code)
