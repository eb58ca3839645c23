"""ADBC against connectorx on the rollup's and the attribution's source reads.

``python -m benchmarks.readers --dsn postgresql://postgres@127.0.0.1:5432/postgres --scale S M``
loads each job's benchmark data (benchmarks.bench_rollup / bench_attribution) into a fresh
database and times, on the same SQL (median of REPEAT reads, Arrow table in memory):

* ``adbc``: the job's own path, one ADBC query on the connection the job already holds;
* ``connectorx``: the same query through connectorx, which opens its own connection per read;
* ``connectorx x2``: the query split in two halves by user (connectorx reads a list of queries
  in parallel, one connection each; these tables have uuid keys, so no ``partition_on``).

connectorx cannot run the jobs' transaction-local settings (``SET LOCAL derive.as_of``), role or
REPEATABLE READ snapshot, so the settings are written into its SQL as literals.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import connectorx as cx
import psycopg

from benchmarks import bench_attribution, bench_rollup
from derive.io import metrics as metrics_io
from derive.io import touchpoints as touchpoints_io
from derive.io.connect import connect
from derive.io.migrate import migrate

REPEAT = 5


def _median(read: Callable[[], int]) -> tuple[float, int]:
    seconds, rows = [], 0
    for _ in range(REPEAT):
        start = time.perf_counter()
        rows = read()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), rows


def _halves(sql: str, column: str) -> list[str]:
    return [
        f"SELECT * FROM ({sql}) q WHERE get_byte(uuid_send(q.{column}), 0) % 2 = {k}"
        for k in (0, 1)
    ]


def _compare(dsn: str, sql_adbc: str, settings: dict[str, str], sql_cx: str) -> dict[str, Any]:
    job = connect(dsn)  # the job reads on the connection it already holds

    def adbc() -> int:
        job.set_local(**settings)
        rows = job.fetch_arrow(sql_adbc).num_rows
        job.rollback()
        return int(rows)

    def connectorx() -> int:
        return int(cx.read_sql(dsn, sql_cx, return_type="arrow").num_rows)

    def connectorx_x2() -> int:
        return int(cx.read_sql(dsn, _halves(sql_cx, "user_id"), return_type="arrow").num_rows)

    figures: dict[str, Any] = {}
    for name, read in (
        ("adbc", adbc),
        ("connectorx", connectorx),
        ("connectorx x2", connectorx_x2),
    ):
        seconds, rows = _median(read)
        figures[name] = round(seconds, 3)
        figures["rows"] = rows
    return figures


def _fresh(admin: str) -> str:
    name = f"bench_readers_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = admin.rsplit("/", 1)[0] + f"/{name}"
    with connect(dsn) as db:
        migrate(db)
    return dsn


def _drop(admin: str, dsn: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')


def measure(admin: str, scale: str) -> dict[str, Any]:
    """Both reads at one scale; each on its own fresh database, dropped afterwards."""
    result: dict[str, Any] = {"scale": scale}
    dsn = _fresh(admin)
    try:
        bench_rollup.load(dsn, scale)
        as_of = bench_rollup.AS_OF.isoformat()
        literal = metrics_io._SOURCES_SQL.replace(
            "current_setting('derive.as_of')::timestamptz", f"'{as_of}'::timestamptz"
        )
        result["rollup sources"] = _compare(dsn, metrics_io._SOURCES_SQL, {"as_of": as_of}, literal)
    finally:
        _drop(admin, dsn)
    dsn = _fresh(admin)
    try:
        bench_attribution.load(dsn, scale)
        as_of = bench_attribution.AS_OF
        captured: list[str] = []
        with connect(dsn) as db:
            real = db.fetch_df

            def capture(sql: str, params: Any = None) -> Any:
                captured.append(sql)
                return real(sql, params)

            db.fetch_df = capture  # type: ignore[method-assign]
            touchpoints_io.read_attribution_touchpoints(
                db, since=None, as_of=as_of, window=timedelta(days=30)
            )
            db.rollback()
        sql = captured[0]
        literal = sql.replace(
            "current_setting('derive.touch_from')::timestamptz", "'-infinity'::timestamptz"
        ).replace(
            "current_setting('derive.as_of')::timestamptz", f"'{as_of.isoformat()}'::timestamptz"
        )
        result["attribution touchpoints"] = _compare(
            dsn, sql, {"touch_from": "-infinity", "as_of": as_of.isoformat()}, literal
        )
    finally:
        _drop(admin, dsn)
    return result


def main() -> None:
    """Print one JSON line of figures per scale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True, help="a superuser DSN (databases are made here)")
    parser.add_argument("--scale", nargs="+", default=["S"], choices=["S", "M"])
    args = parser.parse_args()
    for scale in args.scale:
        print(json.dumps(measure(args.dsn, scale)), flush=True)


if __name__ == "__main__":
    main()
