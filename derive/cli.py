"""Command-line interface: parse, call a job, print, map errors to exit codes.

Exit codes: 0 success, 1 failure, 2 usage error, 75 skipped (another run holds the lock).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from derive import __version__
from derive.config import (
    DURATION_FORMS,
    Rules,
    load_rules,
    parse_duration,
    parse_timestamp,
)
from derive.errors import DeriveError, UsageError

app = typer.Typer(
    name="derive",
    help=(
        "Derive audience state, surface-metric rollups and attribution credits from raw event "
        "tables in PostgreSQL, as columnar batch jobs.\n\n"
        "Without --dsn or DERIVE_DSN every command uses an embedded PostgreSQL in DERIVE_HOME "
        "(default: the user data directory), started and migrated on first use."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Create, verify and manage the schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
ingest_app = typer.Typer(help="Load adapter output into the raw tables.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


# -- shared option types ------------------------------------------------------------------------------


def _duration(value: str | None) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except UsageError:
        raise typer.BadParameter(f"{value!r} is not a duration; use {DURATION_FORMS}") from None


def _timestamp(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except UsageError as exc:
        raise typer.BadParameter(str(exc)) from None


DsnOpt = Annotated[
    str | None,
    typer.Option(
        "--dsn",
        envvar="DERIVE_DSN",
        show_envvar=True,
        help="PostgreSQL URL, e.g. postgresql://user@host:5432/db (default: the embedded server).",
    ),
]
RulesOpt = Annotated[
    Path | None,
    typer.Option("--rules", help="Rules file (TOML); default: the packaged canonical rules."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
AsOfOpt = Annotated[
    str | None,
    typer.Option("--as-of", help="Reference time, ISO-8601 (default: now).", metavar="TS"),
]


def rules_from(path: Path | None) -> Rules:
    """Load the rules named by ``--rules`` (or the canonical ones)."""
    return load_rules(path)


def print_json(payload: Any) -> None:
    """Print ``payload`` as JSON on stdout (datetimes as ISO-8601)."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


# -- db ------------------------------------------------------------------------------------------------


@db_app.command("migrate")
def db_migrate(dsn: DsnOpt = None) -> None:
    """Apply the missing schema migrations (idempotent)."""
    from derive.io.connect import connect
    from derive.io.database import resolve_dsn
    from derive.io.migrate import migrate

    with connect(resolve_dsn(dsn)) as db:
        done = migrate(db)
        out.print(f"applied: {', '.join(done)}" if done else f"{db.label}: schema is up to date")


@db_app.command("check")
def db_check(dsn: DsnOpt = None, as_json: JsonOpt = False) -> None:
    """Verify tables, RLS flags, grants, tenant policies and the audience_state guard.

    Exits 1 when any check fails.
    """
    from derive.io.database import open_db
    from derive.io.migrate import check

    with open_db(dsn) as db:
        results = check(db)
        label = db.label
    failed = [c for c in results if not c.ok]
    if as_json:
        print_json({"database": label, "ok": not failed,
                    "checks": [c.__dict__ for c in results]})
    else:
        for c in results:
            mark = "[green]pass[/]" if c.ok else "[red]FAIL[/]"
            out.print(f"{mark}  {c.name}" + (f"  ({c.detail})" if c.detail else ""))
        out.print(f"{label}: {len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL server (it is started again on demand)."""
    from derive.config import derive_home
    from derive.io.embedded import stop_server

    out.print("stopped" if stop_server(derive_home()) else "the embedded server was not running")


# -- demo-data -------------------------------------------------------------------------------------------


@app.command("demo-data")
def demo_data(
    users: Annotated[int, typer.Option("--users", min=1, help="Number of users to generate.")] = 10_000,
    days: Annotated[int, typer.Option("--days", min=1, help="Days of history up to --as-of.")] = 120,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Random seed; same seed, same data.")] = 0,
    dirty: Annotated[
        bool,
        typer.Option("--dirty", help="Add malformed metadata, unknown categories, missing consent "
                     "and spam users."),
    ] = False,
    no_bursts: Annotated[
        bool, typer.Option("--no-bursts", help="No near-duplicate bursts (< 3 s apart).")
    ] = False,
    as_of: AsOfOpt = None,
    dsn: DsnOpt = None,
    rules_file: RulesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Append realistic synthetic events to audience_events (and their users rows).

    About 23 events per user over 120 days: heavy-tailed activity, sessions, every catalog event
    type, near-duplicate bursts and about 5 % anonymous rows. Deterministic for a seed.
    """
    from derive.config import utc_now
    from derive.io.database import open_db
    from derive.jobs.demo import load_demo_data

    reference = parse_timestamp(as_of) if as_of is not None else utc_now()
    rules = rules_from(rules_file)
    with open_db(dsn) as db:
        counts = load_demo_data(db, users=users, as_of=reference, rules=rules, days=days,
                                seed=seed, dirty=dirty, bursts=not no_bursts)
        label = db.label
    if as_json:
        print_json({"database": label, "as_of": reference.isoformat(), **counts})
        return
    out.print(table(f"demo data -> {label}", ["", "value"],
                    [[key, value] for key, value in counts.items()]))


UsersOpt = Annotated[
    list[str] | None,
    typer.Option("--user", help="Derive only this user (repeatable).", metavar="UUID"),
]


def _uuids(values: list[str] | None) -> list[str]:
    import uuid

    out_ids = []
    for value in values or []:
        try:
            out_ids.append(str(uuid.UUID(value)))
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not a UUID", param_hint="--user") from None
    return out_ids


@app.command("run")
def run_cmd(
    lookback: Annotated[
        str, typer.Option("--lookback", help=f"Window to read: {DURATION_FORMS}.")
    ] = "120d",
    as_of: AsOfOpt = None,
    rules: RulesOpt = None,
    dsn: DsnOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Compute and report; write nothing.")
    ] = False,
    user: UsersOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Derive every user's audience state (S0..S5), score and last event type.

    Reads the lookback window in one query, validates and deduplicates events, applies the
    fail-safes, climbs the gates from each stored state and applies the retention rules, then
    writes only the changed states plus one audit event per state step, in one transaction.
    Exit codes: 0 done, 1 failed, 2 usage error, 75 skipped (another run holds the lock).
    """
    from derive.config import utc_now
    from derive.io.database import open_db
    from derive.jobs.derivation import run_derivation

    window = _duration(lookback)
    assert window is not None
    when = _timestamp(as_of) or utc_now()
    users = _uuids(user)
    loaded = rules_from(rules)
    with open_db(dsn) as db:
        report = run_derivation(
            db, as_of=when, lookback=window, rules=loaded, users=users, dry_run=dry_run
        )
    if as_json:
        print_json(report.as_dict())
    else:
        print_run_summary(report)


def print_run_summary(report: Any) -> None:
    """The one-screen summary of a derivation run."""
    c = report.counts
    head = "dry run (nothing written)" if report.dry_run else f"run {report.run_id}"
    out.print(
        f"[bold]{head}[/]  as_of {report.as_of.isoformat()}  lookback "
        f"{int(report.lookback.total_seconds() // 86400)}d  rules {report.rules_version}"
    )
    invalid = c["events_invalid"]
    rows = [
        ["events read", c["events_read"]],
        ["  invalid", sum(invalid.values())],
        *[[f"    {reason}", n] for reason, n in invalid.items()],
        ["  deduplicated", c["events_deduplicated"]],
        ["  anonymous (not derived)", c["events_anonymous"]],
        ["  after as_of (ignored)", c["events_future"]],
        ["users evaluated", c["users_evaluated"]],
        ["  changed (rows written)" if not report.dry_run else "  would change", c["users_changed"]],
        ["  state changes", c["state_changes"]],
        ["  rejected", c["users_rejected"]],
        *[[f"    {reason}", n] for reason, n in c["rejected_by_reason"].items()],
        ["audit rows", c["audit_rows"]],
        ["validation_fail rows", c["rejections_logged"]],
    ]
    out.print(table("", ["counts", ""], rows))
    states = list(report.before)
    out.print(
        table(
            "",
            ["state", *states],
            [
                ["before", *[report.before[s] for s in states]],
                ["after", *[report.after[s] for s in states]],
            ],
        )
    )
    timings = "  ".join(f"{k} {v:.2f}s" for k, v in report.timings.items())
    out.print(f"timings: {timings}")


# -- touchpoints and attribution ------------------------------------------------------------------------


@ingest_app.command("touchpoints")
def ingest_touchpoints_cmd(
    file: Annotated[
        Path, typer.Argument(help="JSON lines, one touchpoint event per line.", metavar="FILE")
    ],
    dsn: DsnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Store surface-side touchpoint events; a second ingest of the same events inserts nothing.

    Each line is a JSON object with user_id, surface, touchpoint (the kind, e.g. dm_inbound or
    tip), external_id, occurred_at (ISO-8601 with a zone) and optionally org_id, prospect_id,
    identifier, payload (an object; conversions carry amount and currency) and ingestion_source
    (adapter_poll, webhook or manual). Events are unique on (surface, external_id). A raw
    identifier is never stored: only sha256(lower(surface:identifier) || the user's salt).
    Refused lines are reported with their line number and reason.
    """
    from derive.io.database import open_db
    from derive.jobs.ingest_touchpoints import ingest_touchpoints

    with open_db(dsn) as db:
        report = ingest_touchpoints(db, file)
    if as_json:
        print_json(report.as_dict())
        return
    rows: list[list[Any]] = [
        ["lines", report.lines],
        ["inserted", report.inserted],
        ["duplicates in file", report.duplicates_in_file],
        ["already stored", report.already_stored],
        ["salts created", report.salts_created],
        *[[f"rejected: {reason}", n] for reason, n in report.rejected_by_reason().items()],
    ]
    out.print(table(f"touchpoints from {report.file}", ["", "count"], rows))
    for line_no, reason in report.rejected.head(20).iter_rows():
        out.print(f"line {line_no}: {reason}")
    if report.rejected.height > 20:
        out.print(f"... {report.rejected.height - 20} more refused lines (--json lists them all)")


class AttributionModel(StrEnum):
    """``--model`` values."""

    time_decay = "time_decay"
    first_touch = "first_touch"
    last_touch = "last_touch"
    linear = "linear"
    position_based = "position_based"
    all = "all"


class OutputFormat(StrEnum):
    """``--format`` values."""

    table = "table"
    csv = "csv"
    json = "json"


@app.command("attribution")
def attribution_cmd(  # noqa: PLR0917 - typer maps each parameter to an option
    model: Annotated[
        AttributionModel, typer.Option("--model", help="Attribution model, or all of them.")
    ] = AttributionModel.time_decay,
    window: Annotated[
        str, typer.Option("--window", help=f"Look-back before each conversion: {DURATION_FORMS}.")
    ] = "30d",
    half_life: Annotated[
        str, typer.Option("--half-life", help="Half-life of time_decay weights.")
    ] = "7d",
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only conversions at or after TS (default: all).",
                     metavar="TS"),
    ] = None,
    as_of: AsOfOpt = None,
    dsn: DsnOpt = None,
    output: Annotated[
        OutputFormat, typer.Option("--format", help="table for people, csv or json for tools.")
    ] = OutputFormat.table,
) -> None:
    """Credit each conversion's value to the surfaces of the prospect's prior touchpoints.

    Conversions are subscription_new, tip, booking_confirmed and booking_completed touchpoints
    up to --as-of (value: payload amount, 0 if absent). Their prior touchpoints of the same
    prospect in [conversion - window, conversion) share the credit under the model: first_touch,
    last_touch, linear, time_decay (2^(-age/half-life), normalised) or position_based (40/20/40).
    No prior touch: full credit to the conversion's own surface. Anonymous touchpoints are only
    counted. Credits go to attribution_credits (re-runs replace, never duplicate); prints the
    attributed value per surface. Exit codes: 0 done, 1 failed, 2 usage error, 75 skipped.
    """
    from derive.config import utc_now
    from derive.io.database import open_db
    from derive.jobs.attribution import run_attribution
    from derive.transforms.attribution import MODELS

    models = MODELS if model is AttributionModel.all else (model.value,)
    span = _duration(window)
    decay = _duration(half_life)
    assert span is not None
    assert decay is not None
    start = _timestamp(since)
    when = _timestamp(as_of) or utc_now()
    with open_db(dsn) as db:
        report = run_attribution(
            db, models=models, window=span, half_life=decay, since=start, as_of=when
        )
    if output is OutputFormat.json:
        print_json(report.as_dict())
        return
    if output is OutputFormat.csv:
        sys.stdout.write(report.surfaces.write_csv())
        return
    c = report.counts
    out.print(
        f"[bold]attribution run {report.run_id}[/]  as_of {report.as_of.isoformat()}  window "
        f"{window}  half-life {half_life}  conversions {c['conversions']}  credits {c['credits']} "
        f"(+{c['credits_inserted']} ~{c['credits_updated']} -{c['credits_deleted']})"
    )
    out.print(
        table(
            "attributed value per surface",
            ["model", "surface", "currency", "conversions", "credits", "attributed value"],
            [[m, s, cur or "-", n, k, v] for m, s, cur, n, k, v in report.surfaces.iter_rows()],
        )
    )
    if report.anonymous.height:
        out.print(
            table(
                "anonymous touchpoints (counted only, never attributed)",
                ["surface", "touchpoints", "conversions"],
                [list(r) for r in report.anonymous.iter_rows()],
            )
        )
    if c["conversions_bad_amount"]:
        out.print(f"{c['conversions_bad_amount']} conversions have a non-numeric amount (value 0)")
    timings = "  ".join(f"{k} {v:.2f}s" for k, v in report.timings.items())
    out.print(f"timings: {timings}")


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A compact rich table."""
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[str(v) for v in row])
    return t


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out.print(f"derive {__version__}")
        raise typer.Exit(0)


def main() -> None:
    """Console-script entry point: run the app, turn project errors into one-line messages."""
    try:
        app()  # standalone: typer prints usage errors itself and exits 2
    except DeriveError as exc:
        err.print(f"error: {exc}", markup=False)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
