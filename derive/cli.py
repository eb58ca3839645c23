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
    rich_markup_mode="markdown",
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
        print_json({"database": label, "ok": not failed, "checks": [c.__dict__ for c in results]})
    else:
        for c in results:
            mark = "[green]pass[/]" if c.ok else "[red]FAIL[/]"
            out.print(f"{mark}  {c.name}" + (f"  ({c.detail})" if c.detail else ""))
        out.print(f"{label}: {len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


@db_app.command("adopt")
def db_adopt(dsn: DsnOpt = None) -> None:
    """Give states written by another system an audit trail (one state_adopted row each).

    Without it, the state_jump fail-safe rejects every user whose stored state has no audit row.
    Safe to repeat: states that already have a consistent trail are left alone.
    """
    from derive.config import utc_now
    from derive.io.database import open_db
    from derive.jobs.adopt import adopt

    with open_db(dsn) as db:
        adopted = adopt(db, as_of=utc_now())
    out.print(f"adopted {adopted} state(s)")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL server (it is started again on demand)."""
    from derive.config import derive_home
    from derive.io.embedded import stop_server

    out.print("stopped" if stop_server(derive_home()) else "the embedded server was not running")


# -- demo-data -------------------------------------------------------------------------------------------


@app.command("demo-data")
def demo_data(
    users: Annotated[
        int, typer.Option("--users", min=1, help="Number of users to generate.")
    ] = 10_000,
    days: Annotated[
        int, typer.Option("--days", min=1, help="Days of history up to --as-of.")
    ] = 120,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="Random seed; same seed, same data.")
    ] = 0,
    dirty: Annotated[
        bool,
        typer.Option(
            "--dirty",
            help="Add malformed metadata, unknown categories, missing consent and spam users.",
        ),
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
        counts = load_demo_data(
            db,
            users=users,
            as_of=reference,
            rules=rules,
            days=days,
            seed=seed,
            dirty=dirty,
            bursts=not no_bursts,
        )
        label = db.label
    if as_json:
        print_json({"database": label, "as_of": reference.isoformat(), **counts})
        return
    out.print(
        table(
            f"demo data -> {label}", ["", "value"], [[key, value] for key, value in counts.items()]
        )
    )


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


@app.command("demo")
def demo_cmd(
    users: Annotated[
        int, typer.Option("--users", min=1, help="Synthetic users to generate.")
    ] = 10_000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the generator.")] = 0,
    dirty: Annotated[
        bool, typer.Option("--dirty", help="Mix in malformed rows, unknown categories and spam.")
    ] = False,
    rules: RulesOpt = None,
    dsn: DsnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate realistic events for N users and run the derivation on them.

    Without --dsn it uses a fresh `derive_demo` database on the embedded server (made anew on each
    call; your `derive` database is not touched). With --dsn the database must be empty.
    """
    from derive.jobs.demo_run import run_demo

    result = run_demo(dsn, users=users, seed=seed, dirty=dirty, rules=rules_from(rules))
    if as_json:
        print_json(
            {"database": result.database, "loaded": result.loaded, **result.report.as_dict()}
        )
        return
    loaded = result.loaded
    out.print(
        f"[bold]demo[/] {result.database}: loaded {loaded['events']:,} events "
        f"({loaded['anonymous']:,} anonymous) for {loaded['users']:,} users "
        f"in {loaded['seconds']:.1f}s"
    )
    print_run_summary(result.report)


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
        [
            "  changed (rows written)" if not report.dry_run else "  would change",
            c["users_changed"],
        ],
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
def attribution_cmd(
    model: Annotated[
        AttributionModel, typer.Option("--model", help="Attribution model, or all of them.")
    ] = AttributionModel.time_decay,
    window: Annotated[
        str,
        typer.Option(
            "--window",
            help=f"Look-back before each conversion: {DURATION_FORMS}.",
            metavar="DURATION",
        ),
    ] = "30d",
    half_life: Annotated[
        str,
        typer.Option("--half-life", help="Half-life of time_decay weights.", metavar="DURATION"),
    ] = "7d",
    since: Annotated[
        str | None,
        typer.Option(
            "--since", help="Only conversions at or after TS (default: all).", metavar="TS"
        ),
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
    from derive.schema import MODELS

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
            "attributed value per surface (exact values: --format csv or json)",
            ["model", "surface", "currency", "conversions", "credits", "attributed value"],
            [
                [m, s, cur or "-", n, k, f"{v:,.2f}"]
                for m, s, cur, n, k, v in report.surfaces.iter_rows()
            ],
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


# -- surface metrics ------------------------------------------------------------------------------------

MetricsRulesOpt = Annotated[
    Path | None,
    typer.Option(
        "--rules",
        help="Surface-metric rules (TOML): kinds, aggregation, monetary kinds, cadence; "
        "default: the packaged derive/rules/metrics.toml.",
    ),
]


@ingest_app.command("metrics")
def ingest_metrics_cmd(
    file: Annotated[
        str,
        typer.Argument(
            help="FetchMetricsOutput as one JSON object or JSON lines of them; - for stdin.",
            metavar="FILE",
        ),
    ],
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
            "--source", help="How the adapter got the numbers: native_scrape, native_api or manual."
        ),
    ] = "native_scrape",
    allow_partial: Annotated[
        bool, typer.Option("--allow-partial", help="Exit 0 even when some rows were rejected.")
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Insert nothing when any row is rejected.")
    ] = False,
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
    Exit codes: 0 all rows stored (or --allow-partial), 1 rows rejected or a bad file, 2 usage.
    """
    from derive.io.database import open_db
    from derive.jobs.ingest_metrics import ingest_metrics
    from derive.metrics_rules import load_metrics_rules

    if strict and allow_partial:
        raise UsageError("--strict and --allow-partial contradict each other: pick one")
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
    if result.rows_rejected and not allow_partial:
        raise typer.Exit(1)


@app.command("rollup")
def rollup_cmd(
    as_of: AsOfOpt = None,
    rules: MetricsRulesOpt = None,
    dsn: DsnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Roll surface_metrics up into cross-surface metric_aggregates.

    Per (user, metric_kind, window) the newest fetch of each surface counts; kinds aggregate as
    the rules say (sums, mean of rates, best rank), with surfaces_included and surface_breakdown.
    Monetary kinds are summed only within one currency; mixed currencies are reported and not
    aggregated. Missing aggregates are created; due ones (stale_after <= --as-of) are recomputed
    when their sources changed, otherwise only their stale_after moves (+15m for windows that
    ended within 24h, +1h within 7d, +1d within 90d, 'infinity' beyond). Aggregates not yet due
    are not touched. Logged in derivation_runs. Exit codes: 0 done, 1 failed, 2 usage error,
    75 skipped (another rollup holds the lock).
    """
    from derive.config import utc_now
    from derive.io.database import open_db
    from derive.jobs.rollup import run_rollup
    from derive.metrics_rules import load_metrics_rules

    metrics_rules = load_metrics_rules(rules)
    when = _timestamp(as_of) or utc_now()
    with open_db(dsn) as db:
        result = run_rollup(db, as_of=when, rules=metrics_rules)
    if as_json:
        print_json(
            {
                "run_id": result.run_id,
                "as_of": result.as_of,
                "rules_version": result.rules_version,
                "counts": result.counts,
                "timings": result.timings,
                "not_aggregated": result.skipped,
            }
        )
        return
    out.print(
        f"[bold]rollup run {result.run_id}[/]  as_of {result.as_of.isoformat()}  "
        f"rules {result.rules_version}"
    )
    out.print(table("aggregates", ["", "count"], [[k, v] for k, v in result.counts.items()]))
    for item in result.skipped[:20]:
        currencies = ", ".join(c or "none" for c in item["currencies"])
        out.print(
            f"not aggregated ({item['status']}): user {item['user_id']} {item['metric_kind']} "
            f"{item['window_start']} .. {item['window_end']}"
            + (f" currencies {currencies}" if item["status"] == "mixed_currency" else ""),
            markup=False,
        )
    if len(result.skipped) > 20:
        out.print(f"... {len(result.skipped) - 20} more (--json lists them all)")
    timings = "  ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    out.print(f"timings: {timings}")


# -- operating: status, report, watch, backfill, schedule ----------------------------------------------


@app.command("status")
def status_cmd(
    max_lag: Annotated[
        str,
        typer.Option("--max-lag", help="Unhealthy when the last successful full run is older."),
    ] = "30m",
    runs: Annotated[int, typer.Option("--runs", min=1, help="How many recent runs to list.")] = 10,
    dsn: DsnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the last runs, the state distribution, recent rejections and the lag.

    Exits 1 when the last derive run failed (skipped runs aside) or when the last successful
    full run finished longer than --max-lag ago (or never), so it can serve as a monitoring
    check. Runs of `derive watch` (user subsets) do not reset the lag.
    """
    from derive.io.database import open_db
    from derive.jobs.status import collect_status

    lag = _duration(max_lag)
    assert lag is not None
    with open_db(dsn) as db:
        report = collect_status(db, max_lag=lag, limit=runs)
    if as_json:
        print_json(report.as_dict())
    else:
        _print_status(report)
    if not report.healthy:
        raise typer.Exit(1)


def _print_status(report: Any) -> None:
    from rich.markup import escape

    from derive.config import format_duration
    from derive.jobs.status import human_duration

    lag = report.lag
    lag_text = "never" if lag is None else human_duration(lag)
    head = "[green]healthy[/]" if report.healthy else "[red]UNHEALTHY[/]"
    out.print(
        f"[bold]{report.database}[/]  {head}  lag {lag_text} (max {format_duration(report.max_lag)})"
    )
    for problem in report.problems:
        out.print(f"[red]problem:[/] {escape(problem)}")
    rows = [
        [
            r["started_at"].strftime("%m-%d %H:%M:%S"),
            r["status"],
            r["as_of"].strftime("%Y-%m-%d %H:%M"),
            "-" if r["seconds"] is None else f"{r['seconds']:.2f}s",
            r["scope"],
            "-" if r["users_changed"] is None else r["users_changed"],
            "-" if r["users_rejected"] is None else r["users_rejected"],
        ]
        for r in report.runs.iter_rows(named=True)
    ]
    out.print(
        table(
            "last runs",
            ["started", "status", "as_of", "took", "scope", "changed", "rejected"],
            rows,
        )
    )
    for r in report.runs.filter(report.runs["error"].is_not_null()).iter_rows(named=True):
        out.print(f"  {r['started_at']:%m-%d %H:%M:%S} {r['status']}: {escape(r['error'])}")
    out.print(table("states", ["", *report.states], [["users", *report.states.values()]]))
    out.print(
        table(
            "rejections logged",
            ["reason", "24 h", "7 d", "users 7 d"],
            [list(r) for r in report.rejections.iter_rows()],
        )
    )


@app.command("report")
def report_cmd(
    out_file: Annotated[
        Path, typer.Option("--out", help="Where to write the HTML page.", metavar="FILE")
    ] = Path("report.html"),
    days: Annotated[int, typer.Option("--days", min=1, help="Days of history to show.")] = 30,
    top: Annotated[int, typer.Option("--top", min=1, help="Rejected users to list.")] = 20,
    as_of: AsOfOpt = None,
    dsn: DsnOpt = None,
) -> None:
    """Write the failure dashboard: one self-contained HTML page (inline SVG, opens offline).

    Sections: the state funnel S0..S5, audit transitions per day, rejections per day by reason,
    run durations, and the most rejected users with their latest evidence. The window is the
    --days before --as-of (default: now), by the derived_at of the audit rows.
    """
    from derive.io.database import open_db
    from derive.jobs.report import collect_report, write_report

    with open_db(dsn) as db:
        data = collect_report(db, as_of=_timestamp(as_of), days=days, top=top)
    size = write_report(data, out_file)
    out.print(f"wrote {out_file} ({size:,} bytes)")


@app.command("watch")
def watch_cmd(
    debounce: Annotated[
        str, typer.Option("--debounce", help="Derive once no new event arrived for this long.")
    ] = "2s",
    lookback: Annotated[
        str, typer.Option("--lookback", help=f"Window to read: {DURATION_FORMS}.")
    ] = "120d",
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, help="Users per derivation run.")
    ] = 5000,
    rules: RulesOpt = None,
    dsn: DsnOpt = None,
) -> None:
    """Mode B: derive users as their events arrive (LISTEN on the insert trigger's channel).

    Batches the notified user ids (debounce) and derives just those users with the same code,
    lock and audit trail as `derive run`. When a scheduled run holds the lock the batch waits
    and is retried. Reconnects with backoff when the database goes away and then derives every
    user with events stamped since it was last listening. SIGTERM or Ctrl-C: finishes the
    batch in progress, derives what is pending and exits 0.
    """
    import signal

    from derive.config import utc_now
    from derive.io.database import resolve_dsn
    from derive.jobs.watch import Watcher

    wait = _duration(debounce)
    window = _duration(lookback)
    assert wait is not None
    assert window is not None
    watcher = Watcher(
        lambda: resolve_dsn(dsn),
        rules=rules_from(rules),
        lookback=window,
        debounce=wait.total_seconds(),
        max_batch=max_batch,
        log=lambda line: err.print(f"{utc_now():%Y-%m-%dT%H:%M:%SZ} {line}", markup=False),
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: watcher.stop())
    stats = watcher.run()
    err.print(f"stopped: {json.dumps(stats.as_dict())}", markup=False)


@app.command("backfill")
def backfill_cmd(
    from_: Annotated[str, typer.Option("--from", help="First as-of point.", metavar="DATE")],
    to: Annotated[str, typer.Option("--to", help="Last as-of point (inclusive).", metavar="DATE")],
    step: Annotated[str, typer.Option("--step", help="Distance between as-of points.")] = "1d",
    lookback: Annotated[
        str, typer.Option("--lookback", help=f"Window of each step: {DURATION_FORMS}.")
    ] = "120d",
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Write one parquet file per step here.", metavar="DIR"),
    ] = None,
    table_name: Annotated[
        str | None,
        typer.Option(
            "--table", help="Write into this table (audience_state_history).", metavar="TABLE"
        ),
    ] = None,
    rules: RulesOpt = None,
    dsn: DsnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replay the state machine over past as-of points; audience_state is not touched.

    Starts from an empty prior state at --from and derives every user at each step, feeding
    each step's states into the next, exactly as successive `derive run --as-of` calls would.
    Events are read once. Each step is stored whole (a parquet file, or the table's rows plus a
    marker), so an interrupted backfill resumes after its last complete step.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from derive.io.database import open_db
    from derive.io.history import Backfill, ParquetHistory, TableHistory
    from derive.jobs.backfill import StepResult, run_backfill

    if (out_dir is None) == (table_name is None):
        raise UsageError("give exactly one of --out DIR or --table audience_state_history")
    if table_name is not None and table_name != "audience_state_history":
        raise typer.BadParameter(
            f"{table_name!r}: the history table is audience_state_history", param_hint="--table"
        )
    start, end = parse_timestamp(from_), parse_timestamp(to)
    stride, window = _duration(step), _duration(lookback)
    assert stride is not None
    assert window is not None
    loaded = rules_from(rules)
    identity = Backfill(origin=start, step=stride, lookback=window, rules_version=loaded.tag)
    with (
        open_db(dsn) as db,
        Progress(
            TextColumn("backfill {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=err,
            disable=as_json,
            transient=False,
        ) as bar,
    ):
        store = (
            ParquetHistory(out_dir, identity) if out_dir is not None else TableHistory(db, identity)
        )
        task = bar.add_task("", total=None)

        def on_step(result: StepResult) -> None:
            bar.update(
                task,
                total=result.total,
                completed=result.index + 1,
                description=f"{result.as_of:%Y-%m-%d %H:%M}"
                + (" (done before)" if result.skipped else f" {result.users:,} users"),
            )

        report = run_backfill(
            db,
            start=start,
            end=end,
            step=stride,
            lookback=window,
            rules=loaded,
            store=store,
            progress=on_step,
        )
    if as_json:
        print_json(report.as_dict())
        return
    out.print(
        f"[bold]backfill {report.run_id}[/] -> {report.target}: {report.steps} steps "
        f"({report.steps - report.steps_skipped} written, {report.steps_skipped} done "
        f"before), {report.events_read:,} events read"
    )
    states = list(report.final)
    out.print(
        table(f"states at {end.isoformat()}", ["", *states], [["users", *report.final.values()]])
    )
    out.print("timings: " + "  ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()))


@app.command("schedule")
def schedule_cmd(
    every: Annotated[
        str, typer.Option("--every", help="Cadence (divides an hour or a day).")
    ] = "15m",
    lookback: Annotated[
        str, typer.Option("--lookback", help=f"Window of each run: {DURATION_FORMS}.")
    ] = "120d",
    env_file: Annotated[
        Path, typer.Option("--env-file", help="File that sets DERIVE_DSN (KEY=value lines).")
    ] = Path("/etc/derive/derive.env"),
) -> None:
    """Print a crontab line and systemd units for Mode A (scheduled `derive run`) and Mode B.

    Install the timer with: copy derive-run.service and derive-run.timer to /etc/systemd/system/,
    then `systemctl daemon-reload && systemctl enable --now derive-run.timer`. Exit code 75
    (another run held the lock) counts as success. derive-watch.service (optional) runs
    `derive watch` next to the timer.
    """
    import shutil

    from derive.jobs.watch import schedule_units

    cadence, window = _duration(every), _duration(lookback)
    assert cadence is not None
    assert window is not None
    executable = shutil.which("derive") or f"{sys.executable} -m derive.cli"
    try:
        units = schedule_units(
            executable=executable, every=cadence, lookback=window, env_file=env_file
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--every") from None
    for name, text in units.items():
        sys.stdout.write(f"# ---- {name} ----\n{text}\n")


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
