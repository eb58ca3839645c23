"""``derive db``: migrate, check, adopt and stop the embedded server."""

from __future__ import annotations

import typer

from derive.commands.common import (
    DsnOpt,
    JsonOpt,
    examples,
    out,
    print_json,
)


@examples("derive db migrate", "derive db migrate --dsn postgresql://postgres@127.0.0.1:5432/app")
def db_migrate(dsn: DsnOpt = None) -> None:
    """Apply the missing schema migrations (idempotent)."""
    from derive.io.connect import connect
    from derive.io.database import resolve_dsn
    from derive.io.migrate import migrate

    with connect(resolve_dsn(dsn)) as db:
        done = migrate(db)
        out.print(f"applied: {', '.join(done)}" if done else f"{db.label}: schema is up to date")


@examples(
    "derive db check", "derive db check --dsn postgresql://postgres@127.0.0.1:5432/app --json"
)
def db_check(dsn: DsnOpt = None, as_json: JsonOpt = False) -> None:
    """Verify tables, RLS flags, grants, tenant policies and the audience_state guard.

    Exits 1 when any check fails.
    """
    from derive.io.database import open_db
    from derive.io.migrate import check

    with open_db(dsn, migrated=False) as db:
        results = check(db)
        label = db.label
    failed = [c for c in results if not c.ok]
    if as_json:
        print_json({"database": label, "ok": not failed, "checks": [c.__dict__ for c in results]})
    else:
        for c in results:
            mark = (
                "[yellow]warn[/]"
                if c.ok and c.warn
                else "[green]pass[/]"
                if c.ok
                else "[red]FAIL[/]"
            )
            out.print(f"{mark}  {c.name}" + (f"  ({c.detail})" if c.detail else ""))
        out.print(f"{label}: {len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


@examples("derive db adopt --dsn postgresql://postgres@127.0.0.1:5432/app")
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


@examples("derive db stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL server (it is started again on demand)."""
    from derive.config import derive_home
    from derive.io.embedded import stop_server

    out.print("stopped" if stop_server(derive_home()) else "the embedded server was not running")
