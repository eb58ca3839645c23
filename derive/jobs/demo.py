"""Fill a database with synthetic events (``derive demo-data``, the demo and the benchmarks)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl

from derive.config import Rules
from derive.io.connect import Db
from derive.io.load import append_events, append_users
from derive.io.migrate import ensure_migrated
from derive.jobs.demo_data import demo_users, generate_events

# Users generated and loaded at a time: bounds memory at the 1M-user scale (~23M events).
BLOCK_USERS = 250_000


def block_seeds(users: int, seed: int) -> list[tuple[int, int]]:
    """``(users, seed)`` of each block; a single block keeps ``seed`` itself."""
    if users <= BLOCK_USERS:
        return [(users, seed)]
    sizes = [BLOCK_USERS] * (users // BLOCK_USERS)
    if users % BLOCK_USERS:
        sizes.append(users % BLOCK_USERS)
    return [
        (size, int(np.random.SeedSequence([seed, i]).generate_state(1)[0] >> 1))
        for i, size in enumerate(sizes)
    ]


def load_demo_data(
    db: Db,
    *,
    users: int,
    as_of: datetime,
    rules: Rules,
    days: int = 120,
    seed: int = 0,
    dirty: bool = False,
    bursts: bool = True,
) -> dict[str, Any]:
    """Generate events for ``users`` users (see :mod:`derive.jobs.demo_data`) and append them.

    Also inserts the users' ``users`` rows (id and attribution salt) for the jobs that need them.

    Returns:
        Counts: ``users``, ``events``, ``anonymous`` (rows without user), ``seconds`` (total),
        ``generate_seconds`` and ``load_seconds``.

    Raises:
        SchemaError: the database is not migrated.
        SourceError: the database rejected the load (nothing of it is kept).
    """
    start = time.perf_counter()
    ensure_migrated(db)
    # Blocks bound the generator's working memory; the events are appended in one call so a load
    # into an empty table rebuilds its indexes once, after all blocks (see derive.io.load).
    event_blocks: list[pl.DataFrame] = []
    people: list[pl.DataFrame] = []
    for size, block_seed in block_seeds(users, seed):
        event_blocks.append(
            generate_events(
                size,
                as_of=as_of,
                rules=rules,
                days=days,
                seed=block_seed,
                dirty=dirty,
                bursts=bursts,
            )
        )
        people.append(demo_users(size, seed=block_seed))
    events = pl.concat(event_blocks, rechunk=False)
    del event_blocks
    generating = time.perf_counter() - start
    tick = time.perf_counter()
    counts = {
        "users": append_users(db, pl.concat(people)),
        "events": append_events(db, events),
        "anonymous": events["user_id"].null_count(),
    }
    loading = time.perf_counter() - tick
    return {
        **counts,
        "seconds": round(time.perf_counter() - start, 2),
        "generate_seconds": round(generating, 2),
        "load_seconds": round(loading, 2),
    }
