"""Benchmark of ``derive attribution --model all``: 1M touchpoints / 100k conversions at M and L.

The data is generated with numpy (vectorized, fixed seed) and loaded with ADBC bulk ingest:
1,000 users, 100,000 prospects, touchpoints spread over 120 days before ``AS_OF`` on five
surfaces (about 5 % anonymous, about 3 % block/unblock/subscription_cancel), and one conversion
in ten with an amount (tip, subscription_new, booking_confirmed or booking_completed).

Cases, each run as a child process (``derive attribution --model all --format json``) so the peak
RSS is the job's own:

- first run: ``attribution_credits`` emptied before each repetition, every credit is inserted;
- re-run: the same data again, nothing changes and nothing is written (the watermark finds no
  touchpoint changed since the first run's read, so no touchpoint is read);
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from benchmarks import writepath
from benchmarks.child import Run, figure, run_json
from derive.io.connect import connect

AS_OF = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
DAYS = 120
SEED = 20261122
REPEAT = 3
#: scale -> (touchpoints, conversions, prospects, users)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "S": (100_000, 10_000, 10_000, 100),
    "M": (1_000_000, 100_000, 100_000, 1_000),
    "L": (1_000_000, 100_000, 100_000, 1_000),
}
SURFACES = ("tryst", "onlyfans", "x", "fansly", "instagram")
TOUCH_KINDS = (
    "profile_view",
    "dm_inbound",
    "dm_outbound",
    "reply",
    "reaction",
    "subscription_renew",
    "booking_inquiry",
)
NO_CREDIT = ("block", "unblock", "subscription_cancel")
CONVERSIONS = ("tip", "subscription_new", "booking_confirmed", "booking_completed")


def _uuids(rng: np.random.Generator, n: int) -> pl.Series:
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(raw)])
    series = pl.Series(fixed.cast(pa.binary()))
    return series


def generate(scale: str) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(users, prospects, touchpoints) of a scale, deterministic for ``SEED``."""
    touchpoints, conversions, prospects, users = SIZES[scale]
    rng = np.random.default_rng(SEED)
    user_ids = _uuids(rng, users)
    prospect_ids = _uuids(rng, prospects)
    owner = rng.integers(0, users, prospects)
    people = pl.DataFrame({"id": user_ids})
    leads = pl.DataFrame({"id": prospect_ids, "user_id": user_ids.gather(owner)})

    touches = touchpoints - conversions
    # Skewed (log-normal): some prospects are touched, and convert, far more often than others;
    # a conversion sees about 7 prior touches in a 30-day window on average.
    weights = rng.lognormal(0.0, 1.0, prospects)
    who = rng.choice(prospects, size=touchpoints, p=weights / weights.sum())
    start = int(AS_OF.timestamp() * 1_000_000) - DAYS * 86_400_000_000
    when = start + rng.integers(0, DAYS * 86_400_000_000, touchpoints)
    kind = np.concatenate(
        [
            np.where(
                rng.random(touches) < 0.03,
                rng.choice(NO_CREDIT, touches),
                rng.choice(TOUCH_KINDS, touches),
            ),
            rng.choice(CONVERSIONS, conversions),
        ]
    )
    anonymous = np.concatenate([rng.random(touches) < 0.05, np.zeros(conversions, dtype=bool)])
    amount = np.round(rng.uniform(5, 500, touchpoints), 2)
    currency = np.where(rng.random(touchpoints) < 0.9, "USD", "EUR")
    is_conversion = np.isin(kind, CONVERSIONS)
    frame = pl.DataFrame(
        {
            "user_id": user_ids.gather(owner[who]),
            "prospect_id": prospect_ids.gather(who),
            "surface": rng.choice(SURFACES, touchpoints),
            "touchpoint": kind,
            "external_id": pl.int_range(touchpoints, eager=True).cast(pl.String),
            "occurred_at": pl.Series(when).cast(pl.Datetime("us", "UTC")),
            "anonymous": anonymous,
            "is_conversion": is_conversion,
            "amount": amount,
            "currency": currency,
        }
    ).select(
        "user_id",
        prospect_id=pl.when(pl.col("anonymous")).then(None).otherwise(pl.col("prospect_id")),
        surface="surface",
        touchpoint="touchpoint",
        external_id="bench-" + pl.col("external_id"),
        occurred_at="occurred_at",
        payload=pl.when(pl.col("is_conversion")).then(
            pl.concat_str(
                pl.lit('{"amount": '),
                pl.col("amount").cast(pl.String),
                pl.lit(', "currency": "'),
                pl.col("currency"),
                pl.lit('"}'),
            )
        ),
    )
    return people, leads, frame


def load(dsn: str, scale: str) -> int:
    """Generate and bulk-load a scale's data; returns the number of touchpoints."""
    people, leads, touchpoints = generate(scale)
    with connect(dsn) as db, db.transaction():
        db.ingest("bench_users", people)
        db.ingest("bench_prospects", leads)
        db.ingest("bench_touchpoints", touchpoints)
        db.execute("INSERT INTO users (id) SELECT encode(id, 'hex')::uuid FROM bench_users")
        db.execute(
            "INSERT INTO prospects (id, user_id) SELECT encode(id, 'hex')::uuid,"
            " encode(user_id, 'hex')::uuid FROM bench_prospects"
        )
        db.execute(
            "INSERT INTO prospect_touchpoints (user_id, prospect_id, surface, touchpoint,"
            " external_id, occurred_at, payload_jsonb, ingestion_source)"
            " SELECT encode(user_id, 'hex')::uuid, encode(prospect_id, 'hex')::uuid, surface,"
            " touchpoint::touchpoint_kind, external_id, occurred_at, payload::jsonb,"
            " 'adapter_poll' FROM bench_touchpoints"
        )
    with connect(dsn, autocommit=True) as db:
        db.execute("ANALYZE")
    return touchpoints.height


def run_once(dsn: str, *, full: bool = False) -> Run:
    """One ``derive attribution --model all`` child: (seconds, peak RSS MiB, its JSON report)."""
    flags = ["--full"] if full else []
    return run_json(
        "attribution",
        "--model",
        "all",
        "--dsn",
        dsn,
        "--as-of",
        AS_OF.isoformat(),
        "--format",
        "json",
        *flags,
    )


def _figure(case: str, rows: int, runs: list[Run]) -> dict[str, Any]:
    counts = runs[-1][2]["counts"]
    return figure(
        case,
        rows,
        runs,
        f"{counts['conversions']:,} conversions, {counts['credits']:,} credits (5 models); "
        f"inserted {counts['credits_inserted']:,}, updated {counts['credits_updated']:,}"
        f" ({counts.get('mode', '?')})",
    )


def measure(dsn: str, *, scale: str) -> list[dict[str, Any]]:
    """Load the scale's touchpoints into the (migrated, empty) database and time the job."""
    rows = load(dsn, scale)
    first = []
    for _ in range(REPEAT):
        with connect(dsn, autocommit=True) as db:
            db.execute("TRUNCATE attribution_credits")
            db.execute("VACUUM ANALYZE attribution_credits")
        first.append(run_once(dsn, full=True))
    last = first[-1][2]
    with tempfile.TemporaryDirectory() as scratch:
        write = writepath.measure_table(
            dsn,
            writepath.Step(
                "attribution credits (first run)",
                "attribution_credits",
                "run_id = %s::uuid",
                ("write",),
            ),
            last["run_id"],
            last["timings"],
            Path(scratch),
            repeat=REPEAT,
        )
    again = [run_once(dsn) for _ in range(REPEAT)]
    return [
        _figure("attribution --model all, first run (all credits new)", rows, first),
        _figure("attribution --model all, re-run (nothing changed)", rows, again),
        {"case": "write path", "write": write},
    ]


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DERIVE_BENCH_DSN", "")
    for figure in measure(target, scale=sys.argv[2] if len(sys.argv) > 2 else "S"):
        print(json.dumps(figure))
