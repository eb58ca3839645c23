"""``python -m benchmarks run --scale S M``: measure, print the tables, rewrite the README."""

from __future__ import annotations

import argparse
import re
import sys

SCALES = ("S", "M", "L")


def _require_extras() -> None:
    """Fail before any work when the bench extra is missing, saying how to install it."""
    missing = []
    for module in ("matplotlib", "psycopg"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SystemExit(
            f"{' and '.join(missing)} not installed: the benchmark needs the bench extra;"
            " run: pip install -e '.[bench]'"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark `derive run` against the seed's PL/pgSQL loop and the read floor.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="generate data, measure (a)-(g), the write path and the insert overhead,"
        " check agreement, rewrite benchmarks/README.md",
    )
    run.add_argument(
        "--scale",
        nargs="+",
        choices=SCALES,
        default=["S"],
        help="one or more scales: S = 10k users, M = 100k, L = 1M (default: S)",
    )
    run.add_argument(
        "--dsn",
        help="superuser URL of the server (default: DERIVE_BENCH_DSN, "
        "DERIVE_DSN, postgresql://postgres@127.0.0.1:5432/postgres)",
    )
    run.add_argument(
        "--repeat", type=int, default=3, help="runs per figure, median reported (>= 1)"
    )
    run.add_argument("--only", choices=["derive"], help="`derive`: skip the other jobs' benchmarks")
    run.add_argument(
        "--baseline-cap",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="skip the full baseline loop when a sample projects it beyond this",
    )
    run.add_argument(
        "--db-prefix",
        default="derive_bench",
        metavar="NAME",
        help="name the databases NAME_loaded, NAME and NAME_* (default: derive_bench);"
        " a second prefix keeps two benchmark runs on one server apart",
    )
    run.add_argument(
        "--no-readme",
        action="store_true",
        help="print the results without rewriting README.md and the plot",
    )
    jobs = commands.add_parser(
        "jobs",
        help="measure only the rollup and/or attribution benchmarks (print JSON lines, no README)",
        description="Run benchmarks/bench_rollup.py and/or benchmarks/bench_attribution.py on a"
        " fresh migrated database each, print one JSON object per row (with the load average"
        " before and after), and leave README.md alone. `run` measures the same rows.",
    )
    jobs.add_argument("--scale", nargs="+", choices=SCALES, default=["S"], help="(default: S)")
    jobs.add_argument(
        "--job",
        nargs="+",
        choices=["rollup", "attribution"],
        default=["rollup", "attribution"],
        help="which jobs (default: both)",
    )
    jobs.add_argument("--dsn", help="superuser URL of the server (as for `run`)")
    jobs.add_argument("--db-prefix", default="derive_bench", metavar="NAME", help="as for `run`")
    return parser


def _jobs(args: argparse.Namespace) -> int:
    """``python -m benchmarks jobs``: only the other jobs' rows, as JSON lines."""
    import json
    import os

    from benchmarks import harness

    server = harness.server_dsn(args.dsn)
    names = harness.Names(args.db_prefix)
    for scale in sorted(dict.fromkeys(args.scale), key=SCALES.index):
        for job in args.job:
            before = os.getloadavg()
            rows = harness.measure_others(server, scale, names, jobs=[f"bench_{job}"])
            load = {"before": before, "after": os.getloadavg()}
            for found in rows:
                row = found
                if "write" in found:
                    w = found["write"]
                    ratio = (w.rows / w.indexed) / w.job_rate if w.indexed and w.job_rate else None
                    row = {
                        "job": job,
                        "case": f"write path: {w.step}",
                        "rows": w.rows,
                        "job_s": w.job_seconds,
                        "plain_copy_s": w.indexed,
                        "copy_without_indexes_s": w.bare,
                        "job_s_over_plain_copy_s": None if ratio is None else round(ratio, 2),
                    }
                sys.stdout.write(json.dumps({"scale": scale, **row, "load_avg": load}) + "\n")
                sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (1 when a step fails or (a) and (c) disagree)."""
    args = _parser().parse_args(argv)
    if args.command == "jobs":
        _require_extras()
        return _jobs(args)
    if args.repeat < 1:
        sys.stderr.write("--repeat must be at least 1\n")
        return 2
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", args.db_prefix):
        sys.stderr.write(
            f"--db-prefix {args.db_prefix!r}: use lower-case letters, digits and _ (at most 41)\n"
        )
        return 2
    _require_extras()
    from benchmarks import harness, report

    scales = sorted(dict.fromkeys(args.scale), key=SCALES.index)
    env = report.environment(harness.server_dsn(args.dsn))
    try:
        results = harness.run(
            scales,
            dsn=args.dsn,
            repeat=args.repeat,
            baseline_cap=args.baseline_cap,
            with_others=args.only != "derive",
            prefix=args.db_prefix,
        )
    except harness.BenchError as exc:
        sys.stderr.write(f"benchmark failed: {exc}\n")
        return 1
    command = "python -m benchmarks run --scale " + " ".join(scales)
    if args.repeat != 3:
        command += f" --repeat {args.repeat}"
    if args.only:
        command += f" --only {args.only}"
    text = report.render(results, env, command=command, repeat=args.repeat)
    sys.stdout.write(text)
    if not args.no_readme:
        report.plot(results)
        report.README.write_text(text)
        harness.log(f"wrote {report.README} and {report.PLOT}")
    disagreements = [r.scale for r in results if r.agreement is not None and not r.agreement.ok]
    if disagreements:
        sys.stderr.write(f"(a) and (c) disagree at scale {', '.join(disagreements)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
