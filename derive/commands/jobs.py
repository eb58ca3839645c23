"""``derive attribution`` and ``derive rollup``: the jobs over touchpoints and surface metrics."""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer

from derive.commands.common import (
    TIME_FORM,
    AsOfOpt,
    DsnOpt,
    JsonOpt,
    MetricsRulesOpt,
    duration,
    examples,
    iso,
    out,
    print_json,
    print_timings,
    table,
    timestamp,
)
from derive.config import DURATION_FORMS


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


@examples(
    "derive attribution",
    "derive attribution --model all --window 14d --format csv > credits.csv",
    "derive attribution --since 2026-11-01 --as-of 2026-11-22T00:00:00Z",
)
def attribution_cmd(
    model: Annotated[
        AttributionModel,
        typer.Option(
            "--model",
            help="Attribution model: time_decay, first_touch, last_touch, linear, "
            "position_based, or all of them.",
            metavar="MODEL",
        ),
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
            "--since",
            help=f"Only conversions at or after this time, {TIME_FORM} (default: all).",
            metavar="TIME",
        ),
    ] = None,
    as_of: AsOfOpt = None,
    dsn: DsnOpt = None,
    output: Annotated[
        OutputFormat,
        typer.Option("--format", help="table for people, csv or json for tools.", metavar="FORMAT"),
    ] = OutputFormat.table,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Recompute every credit even when no touchpoint changed since the previous run "
            "with the same options.",
        ),
    ] = False,
) -> None:
    """Credit each conversion's value to the surfaces of the prospect's prior touchpoints.

    Conversions are subscription_new, tip, booking_confirmed and booking_completed touchpoints
    up to --as-of (value: payload amount, 0 if absent). Their prior touchpoints of the same
    prospect in [conversion - window, conversion) share the credit under the model: first_touch,
    last_touch, linear, time_decay (2^(-age/half-life), normalised) or position_based (40/20/40).
    No prior touch: full credit to the conversion's own surface. Anonymous touchpoints are only
    counted. Credits go to attribution_credits (re-runs replace, never duplicate); prints the
    attributed value per surface. A run with the options of the previous run, when no
    touchpoint was inserted, updated or deleted since it read and no conversion entered the
    window by time, reads nothing and reports that run's totals (--full recomputes anyway).
    Exit codes: 0 done, 1 failed, 2 usage error, 75 skipped.
    """
    from derive.config import utc_now
    from derive.io.database import open_db
    from derive.jobs.attribution import run_attribution
    from derive.schema import MODELS

    models = MODELS if model is AttributionModel.all else (model.value,)
    span = duration(window, "--window")
    decay = duration(half_life, "--half-life")
    start = timestamp(since, "--since")
    when = timestamp(as_of, "--as-of") or utc_now()
    with open_db(dsn) as db:
        report = run_attribution(
            db, models=models, window=span, half_life=decay, since=start, as_of=when, full=full
        )
    if output is OutputFormat.json:
        print_json(report.as_dict())
        return
    if output is OutputFormat.csv:
        sys.stdout.write(report.surfaces_text().write_csv())
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
        out.print(
            f"{c['conversions_bad_amount']} conversions have an amount that is not a number or exceeds 18 decimal places / 20 digits (value 0)"
        )
    print_timings(report.timings)


@examples("derive rollup", "derive rollup --as-of 2026-11-22T00:00:00Z --json")
def rollup_cmd(
    as_of: AsOfOpt = None,
    rules: MetricsRulesOpt = None,
    dsn: DsnOpt = None,
    as_json: JsonOpt = False,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Read every source row and every aggregate instead of only what is new since "
            "the previous rollup (same result, slower).",
        ),
    ] = False,
) -> None:
    """Roll surface_metrics up into cross-surface metric_aggregates.

    Per (user, metric_kind, window) the newest fetch of each surface counts; kinds aggregate as
    the rules say (sums, mean of rates, best rank), with surfaces_included and surface_breakdown.
    Monetary kinds are summed only within one currency; mixed currencies are reported and not
    aggregated; a stored aggregate whose sources come to mix currencies is removed (counted as
    removed), so no total contradicts its sources. Ties on fetched_at go to the later ingest,
    then the later object and row of the file. Incremental: only source rows committed after
    the previous rollup's read snapshot are read (--full reads all). Identical re-fetches count
    as refreshed (refreshed_refetched_identical). Missing aggregates are created with
    stale_after = computed_at + 15m for windows that ended within 24h, +1h within 7d, +1d
    within 90d, 'infinity' beyond; due ones (stale_after <= --as-of) are recomputed when their
    sources changed, otherwise only their stale_after moves, to the next quarter hour, hour or
    UTC midnight after --as-of by the same bands, without rewriting the row (the run records its
    clock in rollup_clock; metric_aggregates is a view that reads it). Logged in
    derivation_runs. Exit codes: 0 done, 1 failed, 2 usage error,
    75 skipped (another rollup holds the lock).
    """
    from derive.config import utc_now
    from derive.io.database import open_db
    from derive.jobs.rollup import run_rollup
    from derive.metrics_rules import load_metrics_rules

    metrics_rules = load_metrics_rules(rules)
    when = timestamp(as_of, "--as-of") or utc_now()
    with open_db(dsn) as db:
        result = run_rollup(db, as_of=when, rules=metrics_rules, full=full)
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
        f"rules {result.rules_version}  {result.counts['mode']} ({result.counts['mode_reason']})"
    )
    shown = [[k, v] for k, v in result.counts.items() if isinstance(v, int)]
    out.print(table("aggregates", ["", "count"], shown))
    for item in result.skipped[:20]:
        currencies = ", ".join(c or "none" for c in item["currencies"])
        out.print(
            f"not aggregated ({item['status']}): user {item['user_id']} {item['metric_kind']} "
            f"{iso(item['window_start'])} .. {iso(item['window_end'])}"
            + (f" currencies {currencies}" if item["status"] == "mixed_currency" else ""),
            markup=False,
        )
    if len(result.skipped) > 20:
        out.print(f"... {len(result.skipped) - 20} more (--json lists them all)")
    print_timings(result.timings)
