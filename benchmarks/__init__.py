"""Benchmarks of the derive jobs against their baselines; ``python -m benchmarks run --scale S``.

The harness generates a fixed-seed dataset, measures the seed's per-user PL/pgSQL derivation
(a), the read floor of the job's window query (b), ``derive run`` on new users (c), in steady
state (d) and as a dry run (e), checks that (a) and (c) agree on every user's state, and rewrites
``benchmarks/README.md`` with the tables and a log-log plot.
"""
