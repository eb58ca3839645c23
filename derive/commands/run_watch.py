"""``derive run`` (Mode A, one batch) and ``derive watch`` (Mode B, as events arrive)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from derive.commands.common import (
    AsOfOpt,
    DsnOpt,
    JsonOpt,
    RulesOpt,
    UsersOpt,
    duration,
    err,
    print_json,
    print_run_summary,
    rules_from,
    timestamp,
    uuids,
)
from derive.config import DURATION_FORMS


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

    window = duration(lookback)
    assert window is not None
    when = timestamp(as_of) or utc_now()
    users = uuids(user)
    loaded = rules_from(rules)
    with open_db(dsn) as db:
        report = run_derivation(
            db, as_of=when, lookback=window, rules=loaded, users=users, dry_run=dry_run
        )
    if as_json:
        print_json(report.as_dict())
    else:
        print_run_summary(report)


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

    wait = duration(debounce)
    window = duration(lookback)
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
