"""``derive demo`` and ``derive demo-data``: synthetic events, and a derivation run over them."""

from __future__ import annotations

from typing import Annotated

import typer

from derive.commands.common import (
    AsOfOpt,
    DsnOpt,
    JsonOpt,
    RulesOpt,
    examples,
    out,
    print_json,
    print_run_summary,
    rules_from,
    table,
    timestamp,
)


@examples("derive demo-data --users 1000", "derive demo-data --users 5000 --dirty --seed 7")
def demo_data(
    users: Annotated[
        int, typer.Option("--users", min=1, help="Number of users to generate.", metavar="N")
    ] = 10_000,
    days: Annotated[
        int,
        typer.Option(
            "--days", min=1, max=36500, help="Days of history up to --as-of.", metavar="N"
        ),
    ] = 120,
    seed: Annotated[
        int,
        typer.Option("--seed", min=0, help="Random seed; same seed, same data.", metavar="N"),
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

    reference = timestamp(as_of, "--as-of") or utc_now()
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


@examples("derive demo", "derive demo --users 2000 --dirty")
def demo_cmd(
    users: Annotated[
        int, typer.Option("--users", min=1, help="Synthetic users to generate.", metavar="N")
    ] = 10_000,
    seed: Annotated[
        int, typer.Option("--seed", help="Random seed of the generator.", metavar="N")
    ] = 0,
    dirty: Annotated[
        bool, typer.Option("--dirty", help="Mix in malformed rows, unknown categories and spam.")
    ] = False,
    rules: RulesOpt = None,
    dsn: DsnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate realistic events for N users and run the derivation on them.

    Without --dsn it uses a fresh `derive_demo` database on the embedded server (made anew on each
    call; your `derive` database is not touched) and leaves the server running. With --dsn the
    database must be empty. It ends with the commands to type next, with the demo's DSN.
    """
    from derive.jobs.demo_run import run_demo

    result = run_demo(dsn, users=users, seed=seed, dirty=dirty, rules=rules_from(rules))
    if as_json:
        from derive.io.connect import redact

        print_json(
            {
                "database": result.database,
                "dsn": redact(result.dsn),
                "loaded": result.loaded,
                **result.report.as_dict(),
            }
        )
        return
    loaded = result.loaded
    out.print(
        f"[bold]demo[/] {result.database}: loaded {loaded['events']:,} events "
        f"({loaded['anonymous']:,} anonymous) for {loaded['users']:,} users "
        f"in {loaded['seconds']:.1f}s"
    )
    print_run_summary(result.report)
    print_next_steps(result.dsn, embedded=result.embedded)


def print_next_steps(dsn: str, *, embedded: bool) -> None:
    """The commands to type next, verbatim, on the demo's database (never showing a password).

    The embedded server's password stays in its file: the DSN reads it with ``$(cat ...)``.
    """
    import os
    import shlex
    from urllib.parse import urlsplit

    from derive.config import derive_home
    from derive.io.connect import redact, without_password
    from derive.io.embedded import PASSWORD_FILE

    shown = shlex.quote(redact(dsn))
    bare = without_password(dsn)
    if embedded:
        parts = urlsplit(dsn)
        secret = (
            f":$(cat {shlex.quote(str(derive_home() / PASSWORD_FILE))})" if parts.password else ""
        )
        shown = (
            f'"{parts.scheme}://{parts.username}{secret}@{parts.hostname}:{parts.port}{parts.path}"'
        )
        out.print(
            "\nThe embedded server keeps running (`derive db stop` stops it). Your `derive` "
            "database is not the demo's: to look at the demo's data next, run",
            markup=False,
        )
        lines = [f"export DERIVE_DSN={shown}", *NEXT_COMMANDS]
    elif os.environ.get("DERIVE_DSN") == dsn:
        out.print("\nDERIVE_DSN names the demo's database; next, run", markup=False)
        lines = list(NEXT_COMMANDS)
    elif bare != dsn:
        # Runnable as printed without echoing the password: libpq reads it from the environment.
        out.print(
            "\nNext, on the demo's database (its password is not shown: set PGPASSWORD, or put it"
            " in ~/.pgpass, for these commands):",
            markup=False,
        )
        lines = [f"{command} --dsn {shlex.quote(bare)}" for command in NEXT_COMMANDS]
    else:
        out.print("\nNext, on the demo's database:", markup=False)
        lines = [f"{command} --dsn {shown}" for command in NEXT_COMMANDS]
    for line in lines:
        out.print(f"  {line}", markup=False)


NEXT_COMMANDS = ("derive status", "derive report --out report.html", "derive run")
