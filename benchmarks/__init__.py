"""Benchmarks of the derive jobs against their baselines; ``python -m benchmarks run --scale S``.

The harness generates a fixed-seed dataset, measures the seed's per-user PL/pgSQL derivation
(a), the read floor of the job's window query (b: psql streaming its COPY to /dev/null),
``derive run`` on new users (c), in steady state (d), as a dry run (e), 15 minutes after a base run
with new events for 1 % of users (f) and with nothing new (g); the write path of (c) against a
plain COPY of the same rows, and what the incremental run's watermark costs the application's
inserts. It checks that (a) and (c) agree on every user's state, and rewrites
``benchmarks/README.md`` with the tables and a log-log plot.
"""
