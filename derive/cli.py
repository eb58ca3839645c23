"""Command-line interface: parse, call a job, print, map errors to exit codes.

Exit codes: 0 success, 1 failure, 2 usage error, 75 skipped (another run holds the lock).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta
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
