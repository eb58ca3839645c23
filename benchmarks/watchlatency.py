"""Mode B latency: from an insert's commit to the derived audience_state row, ``derive watch``.

``python -m benchmarks.watchlatency [--server DSN] [--repeat N] [--debounce 1s]`` makes a scratch
database (migrated, empty), starts ``derive watch --debounce`` on it as the console command,
waits for its first run, then N times: inserts one event of a new user (autocommit), polls
audience_state every 10 ms until the user's row is visible and records the time since the insert
returned; a pause of twice the debounce separates the inserts so that each one is a burst of its
own. Prints each latency and the median; the database is dropped at the end.

What the figure holds: the notification's delivery, the debounce (the watcher runs once no
notification arrived for that long), the two-probe "anything new" check and one incremental run
of a single user. The interpreter's start is not in it (the watcher is already running).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
import uuid

import psycopg

from benchmarks.harness import DEFAULT_SERVER, drop_database, recreate_database
from derive.io.connect import connect
from derive.io.migrate import migrate

_INSERT = (
    "INSERT INTO audience_events (user_id, session_id, event_type, event_category)"
    " VALUES (%s, 's1', 'scroll_depth_75', 'engagement')"
)


def measure(server: str, *, repeat: int = 10, debounce: float = 1.0) -> list[float]:
    """Seconds from each insert's commit to its derived row (see the module docstring)."""
    name = f"derive_bench_watch_{uuid.uuid4().hex[:8]}"
    dsn = recreate_database(server, name)
    try:
        with connect(dsn) as db:
            migrate(db)
        watch = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "derive.cli",
                "watch",
                f"--debounce={debounce:g}s",
                "--dsn",
                dsn,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        assert watch.stderr is not None
        stream = watch.stderr
        reader = threading.Thread(target=lambda: lines.extend(stream), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 120
            while not any("full run" in line for line in lines):
                if watch.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("derive watch did not start:\n" + "".join(lines))
                time.sleep(0.05)
            return [_one(dsn, debounce) for _ in range(repeat)]
        finally:
            watch.terminate()
            watch.wait(timeout=120)
            reader.join(timeout=10)
            stream.close()
    finally:
        drop_database(server, name)


def _one(dsn: str, debounce: float) -> float:
    user = uuid.uuid4()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(_INSERT, (user,))
        inserted = time.monotonic()
        deadline = inserted + 60
        while (
            conn.execute("SELECT 1 FROM audience_state WHERE user_id = %s", (user,)).fetchone()
            is None
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"user {user} was not derived within 60 s")
            time.sleep(0.01)
        latency = time.monotonic() - inserted
    time.sleep(2 * debounce)
    return latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=DEFAULT_SERVER)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--debounce", type=float, default=1.0, help="seconds")
    args = parser.parse_args()
    seconds = measure(args.server, repeat=args.repeat, debounce=args.debounce)
    print(" ".join(f"{s:.3f}" for s in seconds))
    print(
        f"watch latency, insert commit to derived row (--debounce {args.debounce:g}s):"
        f" median {statistics.median(seconds):.3f}s, min {min(seconds):.3f}s,"
        f" max {max(seconds):.3f}s over {len(seconds)}"
    )


if __name__ == "__main__":
    main()
