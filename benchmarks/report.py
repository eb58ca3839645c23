"""Rendering of the benchmark results: the README tables, the environment block and the plot."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.harness import (
    AS_OF,
    CASES,
    LOOKBACK_TEXT,
    SEED,
    ScaleResult,
    with_database,
)

README = Path(__file__).resolve().parent / "README.md"
PLOT = Path(__file__).resolve().parent / "scaling.png"
PLOTTED = ("a", "b", "c", "d")
TARGETS = "targets at M: (c)/(b) <= 2, (d)/(b) <= 1.5, (a)/(c) >= 10, peak RSS <= 2 GiB"


@dataclass(frozen=True)
class Environment:
    """Machine and versions the figures were measured with."""

    date: str
    cpu: str
    cores: int
    ram_gib: float
    system: str
    postgres: str
    pg_settings: str
    python: str
    packages: dict[str, str]
    revision: str = "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _revision() -> str:
    """Commit of the checkout being measured, marked when the working tree has local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} (with uncommitted changes)" if dirty else head


def environment(server: str) -> Environment:
    """Describe this machine and the server at ``server``."""
    with psycopg.connect(with_database(server, "postgres"), autocommit=True) as conn:
        pg = conn.execute("SHOW server_version").fetchone()
        buffers = conn.execute("SHOW shared_buffers").fetchone()
        work_mem = conn.execute("SHOW work_mem").fetchone()
    return Environment(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        cpu=_cpu_model(),
        cores=os.cpu_count() or 0,
        ram_gib=_ram_gib(),
        system=platform.platform(),
        postgres=str(pg[0]) if pg else "unknown",
        pg_settings=(
            f"shared_buffers {buffers[0] if buffers else '?'},"
            f" work_mem {work_mem[0] if work_mem else '?'}"
        ),
        python=sys.version.split()[0],
        packages={
            name: _version(name)
            for name in ("polars", "connectorx", "adbc-driver-postgresql", "pyarrow", "derive")
        },
        revision=_revision(),
    )


# -- tables ----------------------------------------------------------------------------------------


def _s(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _ratio(
    value: float | None, *, at_most: float | None = None, at_least: float | None = None
) -> str:
    if value is None:
        return "—"
    if at_most is not None:
        verdict = "met" if value <= at_most else "missed"
    elif at_least is not None:
        verdict = "met" if value >= at_least else "missed"
    else:
        return f"{value:.2f}"
    return f"{value:.2f} ({verdict})"


def results_table(results: list[ScaleResult], repeat: int) -> str:
    """The main table: one row per scale and case."""
    lines = [
        f"Wall-clock seconds, median (min, max) of {repeat} runs. In-job seconds: the run's own"
        " `derivation_runs` row (finished_at - started_at), i.e. without interpreter start-up.",
        "",
        "| scale | case | median s | min s | max s | in-job s | peak RSS MiB | note |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        for case, label in CASES.items():
            figure = result.figures.get(case)
            if figure is None:
                lines.append(f"| {result.scale} | {label} | — | — | — | — | — | not measured |")
                continue
            median = f"~{figure.median:,.2f}" if figure.projected else _s(figure.median)
            low = "—" if figure.projected else _s(min(figure.seconds))
            high = "—" if figure.projected else _s(max(figure.seconds))
            lines.append(
                f"| {result.scale} | {label} | {median} | {low} | {high} | {_s(figure.job_median)}"
                f" | {_s(figure.rss_max, 0)} | {figure.note} |"
            )
    return "\n".join(lines)


def ratios_table(results: list[ScaleResult]) -> str:
    """Ratios computed from the medians of the same run, with the targets of SPEC §5."""
    lines = [
        f"Verdicts against the {TARGETS} (shown at every scale; they bind at M).",
        "",
        "| scale | basis | (c)/(b) | (d)/(b) | (a)/(c) | peak RSS of (c)-(e) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for result in results:
        rss = [f.rss_max for k, f in result.figures.items() if k in "cde" and f.rss_max is not None]
        peak = max(rss) if rss else None
        peak_text = (
            "—" if peak is None else f"{peak:,.0f} MiB ({'met' if peak <= 2048 else 'missed'})"
        )
        projected = result.figures.get("a") is not None and result.figures["a"].projected
        for basis, job_time in (("wall clock", False), ("in-job", True)):
            ac = result.ratio("a", "c", job_time=job_time)
            ac_text = _ratio(ac, at_least=10)
            if projected and ac is not None:
                ac_text = "~" + ac_text + ", (a) projected"
            lines.append(
                f"| {result.scale} | {basis}"
                f" | {_ratio(result.ratio('c', 'b', job_time=job_time), at_most=2)}"
                f" | {_ratio(result.ratio('d', 'b', job_time=job_time), at_most=1.5)}"
                f" | {ac_text} | {peak_text if not job_time else ''} |"
            )
    return "\n".join(lines)


def phases_table(results: list[ScaleResult]) -> str:
    """Median phase timings of the job's runs."""
    lines = [
        "Median seconds per phase, from `derivation_runs.timings` ((c), (d)) and the `--json`"
        " output ((e), which records no run row).",
        "",
        "| scale | case | phases (median s) |",
        "|---|---|---|",
    ]
    for result in results:
        for case in ("c", "d", "e"):
            figure = result.figures.get(case)
            if figure is None:
                continue
            phases = figure.phase_medians()
            text = ", ".join(f"{name} {seconds:.3f}" for name, seconds in phases.items()) or "—"
            lines.append(f"| {result.scale} | ({case}) | {text} |")
    return "\n".join(lines)


def dataset_table(results: list[ScaleResult]) -> str:
    """What was generated at each scale."""
    lines = [
        "| scale | users generated | events stored | users in window | window rows"
        " | window as binary COPY | generate + load s | 1-min load avg at scale start / end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.scale} | {r.users:,} | {r.events_total:,} | {r.users_in_window:,}"
            f" | {r.window_rows:,} | {r.window_bytes / 2**20:,.0f} MiB | {r.load_seconds:,.1f}"
            f" | {r.load_avg[0]:.1f} / {r.load_avg[1]:.1f} |"
        )
    return "\n".join(lines)


def agreement_table(results: list[ScaleResult]) -> str:
    """Whether (a) and (c) reached the same state for every user both derived."""
    lines = [
        "After the first run on clean data (no near-duplicate bursts, no invalid rows) SPEC §2.9"
        " expects the seed's logic and the job to agree on every user's state: every user is new,"
        " so the seed's memoryless climb from S0 and the job's climb from S0 coincide,"
        " calendar-second and 3-second dedupe keep the same events, and the baseline's log rows"
        " go to its own table.",
        "",
        "| scale | users compared | same state | same score"
        " | only in baseline (rejected by a fail-safe) | only in derive | verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        a = r.agreement
        if a is None:
            lines.append(
                f"| {r.scale} | — | — | — | — | — | not checked (baseline not run in full) |"
            )
            continue
        verdict = "agree" if a.ok else "DISAGREE: " + "; ".join(a.examples)
        lines.append(
            f"| {r.scale} | {a.compared:,} | {a.states_equal:,} | {a.scores_equal:,}"
            f" | {a.only_baseline:,} | {a.only_derive:,} | {verdict} |"
        )
    return "\n".join(lines)


def others_table(results: list[ScaleResult]) -> str:
    """Rows reported by benchmarks/bench_rollup.py and benchmarks/bench_attribution.py."""
    rows = [(r.scale, row) for r in results for row in r.others]
    if not rows:
        return "Not measured in this run (modules absent or `--only derive`)."
    lines = [
        "| scale | job | case | rows | median s | min s | max s | peak RSS MiB | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for scale, row in rows:
        lines.append(
            f"| {scale} | {row.get('job', '')} | {row.get('case', '')} | {_int(row.get('rows'))}"
            f" | {_num(row.get('median_s'))} | {_num(row.get('min_s'))} | {_num(row.get('max_s'))}"
            f" | {_num(row.get('peak_rss_mb'), 0)} | {_cell(row.get('note'))} |"
        )
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """Text safe inside one markdown table cell."""
    return " ".join(str(value or "").replace("|", "/").split())


def _int(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "—"


def _num(value: Any, digits: int = 2) -> str:
    return _s(float(value), digits) if isinstance(value, int | float) else "—"


# -- document --------------------------------------------------------------------------------------


def render(results: list[ScaleResult], env: Environment, *, command: str, repeat: int) -> str:
    """The whole README."""
    packages = ", ".join(f"{name} {v}" for name, v in env.packages.items())
    scales = " ".join(r.scale for r in results)
    return f"""# Benchmarks

Generated by `{command}` on {env.date}; rerun it to regenerate this file and `scaling.png`.

## Machine and versions

| | |
|---|---|
| CPU | {env.cpu}, {env.cores} cores |
| RAM | {env.ram_gib:.1f} GiB |
| OS | {env.system} |
| PostgreSQL | {env.postgres} ({env.pg_settings}), same machine |
| Python | {env.python} |
| packages | {packages} |
| derive checkout | {env.revision} |

## Dataset

Generated by `derive.jobs.demo.load_demo_data` with seed {SEED}, as of {AS_OF.isoformat()},
clean (`dirty=False`) and without near-duplicate bursts (`bursts=False`), so that (a) and (c) are
comparable. Lookback {LOOKBACK_TEXT}.

{dataset_table(results)}

The load average is the machine's (all processes, {env.cores} cores): other work running at the same
time widens the spread between min and max and raises the medians of every case alike.

## Results

{results_table(results, repeat)}

## Ratios

{ratios_table(results)}

## Phase timings of the job

{phases_table(results)}

## Agreement of (a) and (c)

{agreement_table(results)}

## Other jobs

{others_table(results)}

## Time vs scale

![time vs scale, log-log](scaling.png)

## What is measured

- (a) `bench_baseline.run_batch(as_of)` from `benchmarks/baseline.sql`: seed 001's per-user
  derivation, fixed so that it compiles and takes `as_of` instead of `now()`, one call per user
  with an event in the window, in one statement. It writes to its own schema `bench_baseline`
  (state and log tables).
  When a 1,000-user sample projects the loop beyond `--baseline-cap` seconds, the full loop is
  skipped and the projection is shown with `~`.
- (b) `COPY (derive.io.read.EVENTS_WINDOW_SQL) TO STDOUT (FORMAT binary)`, streamed to the client
  and discarded: the least any job reading that window can cost.
- (c) `derive run --as-of ... --lookback {LOOKBACK_TEXT} --json` on a fresh copy of the loaded
  database (`CREATE DATABASE derive_bench TEMPLATE derive_bench_loaded`), every user new.
- (d) the same command again on the result of (c), after a `VACUUM ANALYZE` (as autovacuum would
  have done before the next cron run): nothing changes, nothing is written.
- (e) the same with `--dry-run`.
- (c)-(e) run as child processes; wall time includes interpreter start-up, peak RSS is the child's
  `ru_maxrss` (`os.wait4`).

## How to reproduce

From the repository root:

```
pip install -e '.[bench]'
python -m benchmarks run --scale {scales}
```

It uses the server named by `--dsn`, `DERIVE_BENCH_DSN` or `DERIVE_DSN` (a superuser URL), else
`postgresql://postgres@127.0.0.1:5432/postgres`, and (re)creates the databases `derive_bench_loaded`
and `derive_bench` there. `--repeat N` sets the runs per figure (default 3), `--only derive` skips
the other jobs, `--baseline-cap SECONDS` caps the baseline loop (default 1800).
"""


def plot(results: list[ScaleResult], path: Path = PLOT) -> None:
    """Log-log plot of median time against users for (a)-(d)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for case in PLOTTED:
        points = [(r.users, r.figures[case]) for r in results if case in r.figures]
        if not points:
            continue
        xs = [users for users, _ in points]
        ys = [figure.median for _, figure in points]
        (line,) = ax.plot(xs, ys, marker="o", label=CASES[case])
        hollow = [
            (x, y)
            for (x, y), (_, f) in zip(zip(xs, ys, strict=True), points, strict=True)
            if f.projected
        ]
        if hollow:
            ax.plot(
                *zip(*hollow, strict=True),
                marker="o",
                linestyle="none",
                markerfacecolor="white",
                color=line.get_color(),
                label=f"{case}: projected",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("users")
    ax.set_ylabel("seconds (median)")
    ax.set_title("derive: time vs scale")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
