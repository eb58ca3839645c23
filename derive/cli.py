"""Command-line interface: the app, the group wiring, and errors turned into exit codes.

The commands live in :mod:`derive.commands`, one module per group (it mirrors ``derive/jobs``);
this module only puts them together and turns the project's errors into one-line messages.

Exit codes: 0 success, 1 failure, 2 usage error, 75 skipped (another run holds the lock). Each
error class of :mod:`derive.errors` carries its code; :func:`main` is the one place that applies it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated

import typer

from derive import __version__
from derive.commands import db, demo, ingest, jobs, ops, privacy, run_watch
from derive.commands.common import Command, Group, epilog, epilog_of, err, out
from derive.errors import DeriveError

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
    cls=Group,
    epilog=epilog_of(
        "derive demo",
        "derive run --dsn postgresql://postgres@127.0.0.1:5432/app --dry-run",
        "derive status --dsn postgresql://postgres@127.0.0.1:5432/app",
    ),
)


def add(group: typer.Typer, name: str, func: Callable[..., None]) -> None:
    """Register ``func`` as command ``name`` of ``group``, its examples closing its help."""
    group.command(name, cls=Command, epilog=epilog(func))(func)


db_app = typer.Typer(
    help="Create, verify and manage the schema.",
    no_args_is_help=True,
    cls=Group,
    epilog=epilog_of("derive db migrate --dsn postgresql://postgres@127.0.0.1:5432/app"),
)
app.add_typer(db_app, name="db")
add(db_app, "migrate", db.db_migrate)
add(db_app, "check", db.db_check)
add(db_app, "adopt", db.db_adopt)
add(db_app, "stop", db.db_stop)

ingest_app = typer.Typer(
    help="Load adapter output into the raw tables.",
    no_args_is_help=True,
    cls=Group,
    epilog=epilog_of("derive ingest touchpoints touchpoints.jsonl"),
)
app.add_typer(ingest_app, name="ingest")

add(app, "demo-data", demo.demo_data)
add(app, "demo", demo.demo_cmd)
add(app, "run", run_watch.run_cmd)
add(ingest_app, "touchpoints", ingest.ingest_touchpoints_cmd)
add(app, "attribution", jobs.attribution_cmd)
add(ingest_app, "metrics", ingest.ingest_metrics_cmd)
add(app, "rollup", jobs.rollup_cmd)
add(app, "status", ops.status_cmd)
add(app, "report", ops.report_cmd)
add(app, "watch", run_watch.watch_cmd)
add(app, "backfill", ops.backfill_cmd)
add(app, "schedule", ops.schedule_cmd)
add(app, "export", privacy.export_cmd)
add(app, "erase", privacy.erase_cmd)
add(app, "prune", privacy.prune_cmd)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out.print(f"derive {__version__}")
        raise typer.Exit(0)


INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped with Ctrl-C


def cancelled_by_user(exc: BaseException) -> bool:
    """Whether ``exc`` comes from Ctrl-C: a KeyboardInterrupt, or the query the driver cancelled.

    During a blocking ADBC call the driver's own SIGINT handler cancels the statement, and the
    interruption surfaces as PostgreSQL's query_canceled error (57014, "user request") instead of
    a KeyboardInterrupt.
    """
    from derive.io.connect import sqlstate

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, KeyboardInterrupt):
            return True
        if sqlstate(cause) == "57014" and "user request" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def main() -> None:
    """Console-script entry point: run the app, turn project errors into one-line messages."""
    try:
        app()  # standalone: typer prints usage errors itself and exits 2
    except DeriveError as exc:
        if cancelled_by_user(exc):
            err.print(INTERRUPTED_MESSAGE, markup=False)
            sys.exit(INTERRUPTED)
        err.print(f"error: {exc}", markup=False)
        sys.exit(exc.exit_code)
    except SystemExit as exc:
        if exc.code == INTERRUPTED:  # typer's answer to a KeyboardInterrupt, silent otherwise
            err.print(INTERRUPTED_MESSAGE, markup=False)
        raise


INTERRUPTED_MESSAGE = "interrupted, nothing written: the transaction in progress was rolled back"


if __name__ == "__main__":
    main()
