"""Operating the jobs: ``derive status``, ``report``, ``backfill`` and ``schedule``."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from derive.commands.common import (
    TIME_FORM,
    AsOfOpt,
    DsnOpt,
    ExecutorOpt,
    JsonOpt,
    MemoryLimitOpt,
    RayAddressOpt,
    ReadDsnOpt,
    RulesOpt,
    ShardsOpt,
    duration,
    err,
    examples,
    executor_from,
    memory_size,
    out,
    print_json,
    print_timings,
    rules_from,
    table,
    timestamp,
)
from derive.config import DURATION_FORMS
from derive.errors import UsageError


class StatusFormat(StrEnum):
    """``derive status --format`` values."""

    table = "table"
    json = "json"
    openmetrics = "openmetrics"


@examples(
    "derive status", "derive status --check --max-lag 2h", "derive status --format openmetrics"
)
def status_cmd(
    max_lag: Annotated[
        list[str] | None,
        typer.Option(
            "--max-lag",
            help="Late when the last successful full run is older: DURATION for derive (default "
            "30m) or JOB=DURATION for another job, e.g. prune=26h (repeatable).",
            metavar="[JOB=]DURATION",
        ),
    ] = None,
    runs: Annotated[
        int,
        typer.Option(
            "--runs", min=1, max=100_000, help="How many recent runs to list.", metavar="N"
        ),
    ] = 10,
    output: Annotated[
        StatusFormat,
        typer.Option(
            "--format",
            help="table, json, or openmetrics (Prometheus text, for a node-exporter textfile "
            "collector or a push gateway).",
            metavar="FORMAT",
        ),
    ] = StatusFormat.table,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Health check: exit 1 when a job is failing or late. With the table format, "
            "print only the verdict (one line per problem).",
        ),
    ] = False,
    dsn: DsnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show every job's health, the last derive runs, the state distribution and rejections.

    A job is failing when its last run (skipped runs aside) failed, and late when its last
    successful full-scope run finished longer than its --max-lag ago (or never). Runs given a
    user list (`derive run --user`) do not reset the lag. Exit code 0 whatever the health,
    unless --check: then 1 when any job is failing or late, for cron wrappers and health checks.
    """
    from derive.io.database import open_db
    from derive.jobs.status import collect_status, openmetrics, parse_max_lags

    lags = parse_max_lags(max_lag or [])
    with open_db(dsn) as db:
        report = collect_status(db, max_lag=lags, limit=runs)
    chosen = StatusFormat.json if as_json else output
    if chosen is StatusFormat.json:
        print_json(report.as_dict())
    elif chosen is StatusFormat.openmetrics:
        sys.stdout.write(openmetrics(report))
    elif check:
        _print_verdict(report)
    else:
        _print_status(report)
    if check and not report.healthy:
        raise typer.Exit(1)


def _print_verdict(report: Any) -> None:
    from derive.jobs.status import human_duration

    if report.healthy:
        lag = "never" if report.lag is None else human_duration(report.lag)
        out.print(f"ok: {report.database}, derive lag {lag}", markup=False)
    for problem in report.problems:
        out.print(f"problem: {problem}", markup=False)


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
    out.print(
        table(
            "jobs",
            ["job", "last run", "last success", "lag", "24 h ok/failed/skipped"],
            [
                [
                    j["job"],
                    j["last_status"] or "-",
                    "-" if j["last_success"] is None else f"{j['last_success']:%m-%d %H:%M:%S}",
                    "never"
                    if j["last_success"] is None
                    else human_duration(report.lag_of(j["job"])),
                    f"{j['succeeded_24h']}/{j['failed_24h']}/{j['skipped_24h']}",
                ]
                for j in report.jobs.iter_rows(named=True)
            ],
        )
    )
    out.print(table("states", ["", *report.states], [["users", *report.states.values()]]))
    out.print(
        table(
            "rejections logged",
            ["reason", "24 h", "7 d", "users 7 d"],
            [list(r) for r in report.rejections.iter_rows()],
        )
    )


@examples(
    "derive report",
    "derive report --out /tmp/derive.html --days 7",
    "derive report --as-of 2026-11-22T00:00:00Z --top 50",
)
def report_cmd(
    out_file: Annotated[
        Path,
        typer.Option(
            "--out", help="Where to write the HTML page (its folder must exist).", metavar="FILE"
        ),
    ] = Path("report.html"),
    days: Annotated[
        int,
        typer.Option("--days", min=1, max=36500, help="Days of history to show.", metavar="N"),
    ] = 30,
    top: Annotated[
        int,
        typer.Option("--top", min=1, max=100_000, help="Rejected users to list.", metavar="N"),
    ] = 20,
    as_of: AsOfOpt = None,
    dsn: DsnOpt = None,
) -> None:
    """Write the failure dashboard: one self-contained HTML page (inline SVG, opens offline).

    Sections: the state funnel S0..S5 with what each state means, the score distribution,
    states over time (from audience_state_history, written by `derive backfill --table`), audit
    transitions per day, rejections per day by reason, run durations, and the most rejected
    users (ties: latest rejection first) with their latest evidence, folded. The window is the
    --days before --as-of; without --as-of it ends at the as_of of the latest successful
    `derive run` (else now), and the page's header says which. Days are those of the audit
    rows' derived_at (the as_of of the run that wrote them).
    """
    from derive.io.database import open_db
    from derive.jobs.report import collect_report, write_report

    when = timestamp(as_of, "--as-of")  # a usage error before any connection
    if not out_file.parent.is_dir():
        raise typer.BadParameter(
            f"{str(out_file)!r}: folder {str(out_file.parent)!r} does not exist; create it or "
            "write elsewhere",
            param_hint="--out",
        )
    with open_db(dsn) as db:
        data = collect_report(db, as_of=when, days=days, top=top)
    size = write_report(data, out_file)
    out.print(f"wrote {out_file} ({size:,} bytes)")


@examples(
    "derive backfill --from 2026-09-01 --to 2026-11-01 --out history/",
    "derive backfill --from 2026-10-01 --to 2026-11-01 --step 6h --table audience_state_history",
)
def backfill_cmd(
    from_: Annotated[
        str,
        typer.Option("--from", help=f"First as-of point, {TIME_FORM}.", metavar="DATE"),
    ],
    to: Annotated[
        str, typer.Option("--to", help="Last as-of point (inclusive), same form.", metavar="DATE")
    ],
    step: Annotated[
        str,
        typer.Option("--step", help="Distance between as-of points.", metavar="DURATION"),
    ] = "1d",
    lookback: Annotated[
        str,
        typer.Option(
            "--lookback", help=f"Window of each step: {DURATION_FORMS}.", metavar="DURATION"
        ),
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
    shards: ShardsOpt = None,
    memory_limit: MemoryLimitOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    read_dsn: ReadDsnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replay the state machine over past as-of points; audience_state is not touched.

    Starts from an empty prior state at --from and derives every user at each step, feeding
    each step's states into the next, exactly as successive `derive run --as-of` calls would.
    Events are read once, in user_id ranges (shards) that fit in `--memory-limit`; each shard
    replays every step for its users (`--executor ray`: as Ray tasks). Each step is stored whole (a parquet file, or the table's rows plus a
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
    start, end = timestamp(from_, "--from"), timestamp(to, "--to")
    assert start is not None
    assert end is not None
    if end < start:
        raise typer.BadParameter(
            f"{to!r} is before --from {from_!r}: give a --to at or after --from", param_hint="--to"
        )
    stride, window = duration(step, "--step"), duration(lookback, "--lookback")
    loaded = rules_from(rules)
    limit = memory_size(memory_limit)
    identity = Backfill(origin=start, step=stride, lookback=window, rules_version=loaded.tag)
    # The bar appears with the first step, when its total is known (not as "0/?" before a
    # refusal).
    bar = Progress(
        TextColumn("backfill {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=as_json,
        transient=False,
    )
    with open_db(dsn) as db:
        store = (
            ParquetHistory(out_dir, identity) if out_dir is not None else TableHistory(db, identity)
        )
        task = bar.add_task("", total=None, start=False)

        def on_step(result: StepResult) -> None:
            if not bar.live.is_started:
                bar.start()
                bar.start_task(task)
            bar.update(
                task,
                total=result.total,
                completed=result.index + 1,
                description=f"{result.as_of:%Y-%m-%d %H:%M}"
                + (" (done before)" if result.skipped else f" {result.users:,} users"),
            )

        tasks = executor_from(executor, ray_address)
        try:
            report = run_backfill(
                db,
                start=start,
                end=end,
                step=stride,
                lookback=window,
                rules=loaded,
                store=store,
                progress=on_step,
                shards=shards,
                memory_limit=limit,
                executor=tasks,
                read_dsn=read_dsn or None,
            )
        finally:
            bar.stop()
            tasks.close()
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
    print_timings(report.timings)


@examples("derive schedule", "derive schedule --every 1h --run-as analytics")
def schedule_cmd(
    every: Annotated[
        str,
        typer.Option("--every", help="Cadence (divides an hour or a day).", metavar="DURATION"),
    ] = "15m",
    lookback: Annotated[
        str,
        typer.Option(
            "--lookback", help=f"Window of each run: {DURATION_FORMS}.", metavar="DURATION"
        ),
    ] = "120d",
    env_file: Annotated[
        Path,
        typer.Option(
            "--env-file",
            help="File that must set DERIVE_DSN=postgresql://... (KEY=value lines).",
            metavar="FILE",
        ),
    ] = Path("/etc/derive/derive.env"),
    run_as: Annotated[
        str,
        typer.Option("--run-as", help="System user the units run as (User=).", metavar="USER"),
    ] = "derive",
) -> None:
    """Print a crontab line and systemd units for Mode A (scheduled `derive run`) and Mode B.

    The --env-file must set DERIVE_DSN=postgresql://... (without it derive would start an embedded
    server of its own) and be readable by the --run-as user. The crontab line appends to
    /var/log/derive/run.log: create that folder first (cron does not). Install the timer with:
    copy derive-run.service and derive-run.timer to /etc/systemd/system/, then
    `systemctl daemon-reload && systemctl enable --now derive-run.timer`. Exit code 75 (another
    run held the lock) counts as success. derive-watch.service (optional) runs `derive watch`
    next to the timer. derive-prune.service and derive-prune.timer (and the
    second crontab line) run `derive prune` nightly at 03:30.
    """
    import shutil

    from derive.jobs import prune
    from derive.jobs.watch import schedule_units

    cadence, window = duration(every, "--every"), duration(lookback, "--lookback")
    executable = shutil.which("derive") or f"{sys.executable} -m derive.cli"
    try:
        units = schedule_units(
            executable=executable, every=cadence, lookback=window, env_file=env_file, user=run_as
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--every") from None
    units.update(prune.schedule_units(executable=executable, env_file=env_file))
    for name, text in units.items():
        sys.stdout.write(f"# ---- {name} ----\n{text}\n")
