"""Reading N listed users' windows: the path of ``derive run --user`` and of incremental runs.

On the work database after the full runs, for N = 10, 1k, 10k and 100k users (those the scale has;
a fixed-seed choice), times in this process (median of the repeats):

* ``read``: :func:`derive.jobs.derivation.read_inputs` of those users (one snapshot; the users'
  events and stored states, joined against the list);
* ``dry run``: :func:`derive.jobs.derivation.run_derivation` with those users and ``dry_run``, i.e.
  what ``derive run --user ... --dry-run`` does after the interpreter has started.

The figure to read is seconds per 1,000 users: constant when the read scales linearly.
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timedelta
from typing import Any

import psycopg

from derive.config import load_rules
from derive.io.connect import connect
from derive.jobs.derivation import read_inputs, run_derivation

SIZES = (10, 1_000, 10_000, 100_000)


def _chosen(dsn: str, n: int) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT user_id::text FROM audience_state ORDER BY md5(user_id::text || 'users')"
            " LIMIT %s",
            (n,),
        ).fetchall()
    return [str(r[0]) for r in rows]


def _median(seconds: list[float]) -> float:
    return statistics.median(seconds) if seconds else float("nan")


def measure(
    dsn: str,
    *,
    as_of: datetime,
    lookback: timedelta,
    users: int,
    repeat: int,
    sizes: tuple[int, ...] = SIZES,
) -> list[dict[str, Any]]:
    """One row per size: users, events read, read and dry-run seconds (median, min, max)."""
    rules = load_rules()
    rows: list[dict[str, Any]] = []
    for n in (size for size in sizes if size <= users):
        ids = _chosen(dsn, n)
        reads: list[float] = []
        dries: list[float] = []
        events = 0
        for _ in range(repeat):
            with connect(dsn) as db:
                start = time.perf_counter()
                inputs = read_inputs(db, as_of=as_of, lookback=lookback, rules=rules, users=ids)
                reads.append(time.perf_counter() - start)
                events = inputs.events.height
                start = time.perf_counter()
                run_derivation(
                    db, as_of=as_of, lookback=lookback, rules=rules, users=ids, dry_run=True
                )
                dries.append(time.perf_counter() - start)
        rows.append(
            {
                "users": len(ids),
                "events": events,
                "read_s": _median(reads),
                "read_min_s": min(reads),
                "read_max_s": max(reads),
                "dry_run_s": _median(dries),
            }
        )
    return rows
