"""``derive run`` (Mode A, one batch) and ``derive watch`` (Mode B, as events arrive)."""

from __future__ import annotations

from typing import Annotated

import typer

from derive.commands.common import (
    AsOfOpt,
    DsnOpt,
    ExecutorOpt,
    JsonOpt,
    MemoryLimitOpt,
    RayAddressOpt,
    ReadDsnOpt,
    RulesOpt,
    ShardsOpt,
    UsersOpt,
    duration,
    err,
    examples,
    executor_from,
    memory_size,
    print_json,
    print_run_summary,
    print_verify,
    rules_from,
    timestamp,
    uuids,
)
from derive.config import DURATION_FORMS
from derive.errors import UsageError

LookbackOpt = Annotated[
    str, typer.Option("--lookback", help=f"Window to read: {DURATION_FORMS}.", metavar="DURATION")
]


@examples(
    "derive run",
    "derive run --dry-run --as-of 2026-11-01T00:00:00Z",
    "derive run --user 3f2b8c1e-0b7a-4d7e-9a52-1c3e5f7a9b0d --json",
)
def run_cmd(
    lookback: LookbackOpt = "120d",
    as_of: AsOfOpt = None,
    rules: RulesOpt = None,
    dsn: DsnOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Compute and report; write nothing.")
    ] = False,
    user: UsersOpt = None,
    full: Annotated[
        bool,
        typer.Option("--full", help="Evaluate every user, even when an incremental run could."),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Recompute every user (a full dry run at the last run's as_of unless --as-of is"
            " given) and compare with what is stored: exit 0 equal, 1 with the differing users.",
        ),
    ] = False,
    shards: ShardsOpt = None,
    memory_limit: MemoryLimitOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    read_dsn: ReadDsnOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Derive every user's audience state (S0..S5), score and last event type.

    Incremental once a full run has succeeded: only the users whose output can differ are read
    (rows the last run did not see, events entering or leaving the window, retention thresholds
    crossed, rejected users, pending requests); a full run otherwise, or with `--full`, and the
    summary's first line says why. Validates and deduplicates events, applies the fail-safes,
    climbs the gates from each stored state and applies the retention rules, then writes only
    the changed states plus one audit event per state step, in one transaction.
    A full run (and `--verify`) derives its users in user_id ranges (shards) so that one shard's
    rows fit in `--memory-limit`, and commits all shards' writes in one transaction.
    With `--executor ray` the shards are Ray tasks (each reads its users in the run's snapshot,
    from `--read-dsn` when given, and returns Arrow); the driver still writes to --dsn.
    Exit codes: 0 done (`--verify`: equal), 1 failed (`--verify`: differences), 2 usage error
    (also: a --user that is unknown),
    75 skipped (another run holds the lock).
    """
    from derive.config import utc_now
    from derive.io.database import open_db
    from derive.io.lookup import unknown_users
    from derive.jobs.derivation import run_derivation, verify_derivation

    window = duration(lookback, "--lookback")
    users = uuids(user)
    loaded = rules_from(rules)
    limit = memory_size(memory_limit)
    if verify:
        if users or dry_run or full:
            raise UsageError("--verify compares every user: drop --user, --dry-run and --full")
        with open_db(dsn) as db:
            tasks = executor_from(executor, ray_address)
            try:
                result = verify_derivation(
                    db,
                    lookback=window,
                    rules=loaded,
                    as_of=timestamp(as_of, "--as-of"),
                    shards=shards,
                    memory_limit=limit,
                    executor=tasks,
                    read_dsn=read_dsn or None,
                )
            finally:
                tasks.close()
        print_verify(result, as_json=as_json)
        if not result.equal:
            raise typer.Exit(1)
        return
    when = timestamp(as_of, "--as-of") or utc_now()
    with open_db(dsn) as db:
        unknown = unknown_users(db, users)
        if unknown:
            raise UsageError(
                f"--user {', '.join(unknown)}: no such user in {db.label} (no users row and no "
                "events); nothing was derived. Check the uuid."
            )
        tasks = executor_from(executor, ray_address)
        try:
            report = run_derivation(
                db,
                as_of=when,
                lookback=window,
                rules=loaded,
                users=users,
                dry_run=dry_run,
                full=full,
                shards=shards,
                memory_limit=limit,
                executor=tasks,
                read_dsn=read_dsn or None,
            )
        finally:
            tasks.close()
    if as_json:
        print_json(report.as_dict())
    else:
        print_run_summary(report)


@examples("derive watch", "derive watch --debounce 5s --max-idle 1h", "derive watch --poll 10s")
def watch_cmd(
    debounce: Annotated[
        str,
        typer.Option(
            "--debounce", help="Run once no notification arrived for this long.", metavar="DURATION"
        ),
    ] = "2s",
    poll: Annotated[
        str | None,
        typer.Option(
            "--poll",
            help="Look for new rows this often instead of listening (the fallback when LISTEN"
            " does not deliver, e.g. behind a transaction-mode pooler).",
            metavar="DURATION",
        ),
    ] = None,
    max_idle: Annotated[
        str,
        typer.Option(
            "--max-idle", help="Run at least this often, even with nothing new.", metavar="DURATION"
        ),
    ] = "15m",
    lookback: LookbackOpt = "120d",
    rules: RulesOpt = None,
    dsn: DsnOpt = None,
) -> None:
    """Mode B: the incremental `derive run`, started as events arrive.

    A notification of the insert trigger (or a poll tick) only wakes the watcher; it then asks
    the database whether anything arrived that the last run did not see, and if so runs the
    same incremental run as `derive run`: same lease, run log and audit trail. Notifications
    are untrusted (any role may NOTIFY): their payload is never read, a flood costs at most one
    probe per debounce interval. When a scheduled run holds the lock, the run is retried with a
    growing, capped backoff. Reconnects with backoff when the database goes away; nothing needs
    catching up (the next run finds every row the last one did not see). SIGTERM or Ctrl-C:
    finishes the run in progress and exits 0.
    """
    import signal

    from derive.config import utc_now
    from derive.io.database import resolve_dsn
    from derive.jobs.watch import Watcher

    wait = duration(debounce, "--debounce")
    window = duration(lookback, "--lookback")
    idle = duration(max_idle, "--max-idle")
    every = duration(poll, "--poll") if poll else None
    watcher = Watcher(
        lambda: resolve_dsn(dsn),
        rules=rules_from(rules),
        lookback=window,
        debounce=wait.total_seconds(),
        poll=every.total_seconds() if every else None,
        max_idle=idle.total_seconds(),
        log=lambda line: err.print(f"{utc_now():%Y-%m-%dT%H:%M:%SZ} {line}", markup=False),
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: watcher.stop())
    stats = watcher.run()
    summary = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stats.as_dict().items())
    err.print(f"stopped: {summary}", markup=False)
