"""Command-line interface: the app, the group wiring, and errors turned into exit codes.

The commands live in :mod:`derive.commands`, one module per group (it mirrors ``derive/jobs``);
this module only puts them together and turns the project's errors into one-line messages.

Exit codes: 0 success, 1 failure, 2 usage error, 75 skipped (another run holds the lock). Each
error class of :mod:`derive.errors` carries its code; :func:`main` is the one place that applies it.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from derive import __version__
from derive.commands import db, demo, ingest, jobs, ops, privacy, run_watch
from derive.commands.common import err, out
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
)

db_app = typer.Typer(help="Create, verify and manage the schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
db_app.command("migrate")(db.db_migrate)
db_app.command("check")(db.db_check)
db_app.command("adopt")(db.db_adopt)
db_app.command("stop")(db.db_stop)

ingest_app = typer.Typer(help="Load adapter output into the raw tables.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")

app.command("demo-data")(demo.demo_data)
app.command("demo")(demo.demo_cmd)
app.command("run")(run_watch.run_cmd)
ingest_app.command("touchpoints")(ingest.ingest_touchpoints_cmd)
app.command("attribution")(jobs.attribution_cmd)
ingest_app.command("metrics")(ingest.ingest_metrics_cmd)
app.command("rollup")(jobs.rollup_cmd)
app.command("status")(ops.status_cmd)
app.command("report")(ops.report_cmd)
app.command("watch")(run_watch.watch_cmd)
app.command("backfill")(ops.backfill_cmd)
app.command("schedule")(ops.schedule_cmd)
app.command("export")(privacy.export_cmd)
app.command("erase")(privacy.erase_cmd)
app.command("prune")(privacy.prune_cmd)


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
