"""Benchmark of ``derive rollup``: 1M ``surface_metrics`` rows at M and L (100k at S).

The data is generated with numpy (vectorized, fixed seed) and loaded with ADBC bulk ingest:
1,000 users, three surfaces, all 15 metric kinds, daily windows over the 120 days before
``AS_OF`` (so every cadence band and final windows occur), re-fetches of the same window (the
rollup keeps the newest), 5 % of monetary rows in EUR instead of USD (mixed-currency keys), and
1 % extra rows fetched 12 h after ``AS_OF`` (invisible to a rollup at ``AS_OF``, new at the
next day's rollup).

Cases, each run as a child process (``derive rollup --json``) so the peak RSS is the job's own:

- first run: ``metric_aggregates`` emptied before each repetition, every aggregate is inserted;
- steady state: the same ``as_of`` again, nothing is due and nothing is written;
- next day: ``as_of`` + 1 day after a first run (untimed): every non-final aggregate is due, the
  keys with new fetches are recomputed, the rest only get a new ``stale_after``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from benchmarks import writepath
from benchmarks.child import Run, figure, run_json
from derive.io.connect import connect
from derive.metrics_rules import load_metrics_rules

AS_OF = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
NEXT_DAY = AS_OF + timedelta(days=1)
DAYS = 120
SEED = 20261122
REPEAT = 3
#: scale -> (surface_metrics rows, users)
SIZES: dict[str, tuple[int, int]] = {
    "S": (100_000, 100),
    "M": (1_000_000, 1_000),
    "L": (1_000_000, 1_000),
}
SURFACES = ("tryst", "onlyfans", "x")
DAY_US = 86_400_000_000


def _uuids(rng: np.random.Generator, n: int) -> pl.Series:
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(raw)])
    return pl.Series(fixed.cast(pa.binary()))


def generate(scale: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(users, surface_metrics rows) of a scale, deterministic for ``SEED``."""
    rows, users = SIZES[scale]
    rules = load_metrics_rules()
    kinds = np.array(rules.kind_names)
    monetary = np.isin(kinds, rules.monetary_kinds)
    rng = np.random.default_rng(SEED)
    user_ids = _uuids(rng, users)
    late = rows // 100
    kind = rng.integers(0, len(kinds), rows)
    midnight = int(AS_OF.replace(hour=0).timestamp() * 1_000_000)
    window_end = midnight - rng.integers(0, DAYS, rows) * DAY_US
    fetched = np.where(
        np.arange(rows) < rows - late,
        np.minimum(
            window_end + rng.integers(0, 6 * 3_600_000_000, rows),
            int(AS_OF.timestamp() * 1_000_000),
        ),
        int(AS_OF.timestamp() * 1_000_000) + 12 * 3_600_000_000,
    )
    rate = kinds[kind] == "reply_rate"
    value = np.where(rate, np.round(rng.random(rows), 4), rng.integers(0, 5_000, rows))
    currency = np.where(rng.random(rows) < 0.05, "EUR", "USD")
    frame = pl.DataFrame(
        {
            "user_id": user_ids.gather(rng.integers(0, users, rows)),
            "surface": rng.choice(SURFACES, rows),
            "metric_kind": kinds[kind],
            "window_start": pl.Series(window_end - DAY_US).cast(pl.Datetime("us", "UTC")),
            "window_end": pl.Series(window_end).cast(pl.Datetime("us", "UTC")),
            "value_numeric": pl.Series(value).cast(pl.String),
            "currency": currency,
            "monetary": monetary[kind],
            "fetched_at": pl.Series(fetched).cast(pl.Datetime("us", "UTC")),
        }
    )
    frame = frame.with_columns(currency=pl.when(pl.col("monetary")).then(pl.col("currency"))).drop(
        "monetary"
    )
    return pl.DataFrame({"id": user_ids}), frame


def load(dsn: str, scale: str) -> int:
    """Generate and bulk-load a scale's data; returns the number of surface_metrics rows."""
    people, metrics = generate(scale)
    with connect(dsn) as db, db.transaction():
        db.ingest("bench_users", people)
        db.ingest("bench_metrics", metrics)
        db.execute("INSERT INTO users (id) SELECT encode(id, 'hex')::uuid FROM bench_users")
        db.execute(
            "INSERT INTO surface_metrics (user_id, surface, metric_kind, window_start, window_end,"
            " value_numeric, currency, source, fetched_at)"
            " SELECT encode(user_id, 'hex')::uuid, surface, metric_kind::surface_metric_kind,"
            " window_start, window_end, value_numeric::numeric(18, 4), currency,"
            " 'native_scrape', fetched_at FROM bench_metrics"
        )
    with connect(dsn, autocommit=True) as db:
        db.execute("VACUUM ANALYZE")
    return metrics.height


def run_once(dsn: str, as_of: datetime, *, full: bool = False) -> Run:
    """One ``derive rollup`` child: (seconds, peak RSS MiB, its JSON report)."""
    flags = ["--full"] if full else []
    return run_json("rollup", "--dsn", dsn, "--as-of", as_of.isoformat(), "--json", *flags)


def _vacuum(dsn: str) -> None:
    """What autovacuum would have done before the next scheduled rollup."""
    with connect(dsn, autocommit=True) as db:
        db.execute("VACUUM ANALYZE metric_aggregate_rows")


def _reset(dsn: str) -> None:
    with connect(dsn, autocommit=True) as db:
        db.execute("TRUNCATE metric_aggregate_rows, rollup_clock")
        db.execute("VACUUM ANALYZE metric_aggregate_rows")


def _figure(case: str, rows: int, runs: list[Run]) -> dict[str, Any]:
    counts = runs[-1][2]["counts"]
    return figure(
        case,
        rows,
        runs,
        f"sources read {counts['sources_read']:,}; inserted {counts['inserted']:,}, "
        f"recomputed {counts['recomputed']:,}, refreshed {counts['refreshed']:,}, "
        f"removed {counts['removed']:,}, identical re-fetches {counts['refreshed_refetched_identical']:,},"
        f" final {counts['final']:,}, mixed currency {counts['not_aggregated_mixed_currency']:,}"
        f" ({counts['mode']})",
    )


def measure(dsn: str, *, scale: str) -> list[dict[str, Any]]:
    """Load the scale's surface metrics into the (migrated, empty) database and time the job."""
    rows = load(dsn, scale)
    first = []
    # --full: after the truncation the previous run is no base (a first run reads everything).
    for _ in range(REPEAT):
        _reset(dsn)
        first.append(run_once(dsn, AS_OF, full=True))
    with tempfile.TemporaryDirectory() as scratch:
        write = writepath.measure_table(
            dsn,
            writepath.Step(
                "metric aggregates (first run)",
                "metric_aggregate_rows",
                "%s::text IS NOT NULL",
                ("write",),
            ),
            first[-1][2]["run_id"],
            first[-1][2]["timings"],
            Path(scratch),
            repeat=REPEAT,
        )
    _vacuum(dsn)
    steady = [run_once(dsn, AS_OF) for _ in range(REPEAT)]
    next_day = []
    for _ in range(REPEAT):
        _reset(dsn)
        run_once(dsn, AS_OF, full=True)
        _vacuum(dsn)
        next_day.append(run_once(dsn, NEXT_DAY))
    return [
        _figure("rollup, first run (every aggregate new)", rows, first),
        _figure("rollup, steady state (same as_of, incremental: nothing new)", rows, steady),
        _figure("rollup, next day (incremental; all due, 1 % of keys new fetches)", rows, next_day),
        {"case": "write path", "write": write},
    ]


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DERIVE_BENCH_DSN", "")
    for figure in measure(target, scale=sys.argv[2] if len(sys.argv) > 2 else "S"):
        print(json.dumps(figure))
