"""Timing one ``derive`` command as a child process, shared by the per-job benchmark modules."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

Run = tuple[float, float, dict[str, Any]]


def derive_command() -> list[str]:
    """The ``derive`` console script of this interpreter (or an equivalent ``-c`` call)."""
    script = Path(sys.executable).with_name("derive")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from derive.cli import main; sys.exit(main())"]


def run_json(*args: str) -> Run:
    """Run ``derive ARGS`` (which must print JSON): (seconds, peak RSS MiB, the JSON report)."""
    argv = [*derive_command(), *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"derive {args[0]} failed: {err.read().decode()[-2000:]}")
        report: dict[str, Any] = json.loads(out.read())
    return seconds, usage.ru_maxrss / 1024, report


def figure(case: str, rows: int, runs: list[Run], summary: str) -> dict[str, Any]:
    """One row of the "other jobs" table: median/min/max seconds, peak RSS and a note.

    Args:
        summary: what the last run did (its counts), put before the phase timings.
    """
    seconds = [s for s, _, _ in runs]
    phases = " ".join(f"{k} {v:.2f}s" for k, v in runs[-1][2]["timings"].items())
    return {
        "case": case,
        "rows": rows,
        "median_s": round(statistics.median(seconds), 3),
        "min_s": round(min(seconds), 3),
        "max_s": round(max(seconds), 3),
        "peak_rss_mb": round(max(r for _, r, _ in runs), 1),
        "note": f"{summary}; median of {len(runs)}; last run: {phases}",
    }
