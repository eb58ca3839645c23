"""Reads behind ``derive status --format openmetrics`` and ``--check``: one summary row per job.

Every read runs as ``service_role`` (RLS is forced on ``derivation_runs``) and binds its values.
The run log is small (one row per run), so one grouped pass over it is cheap. Two anomalies are
counted per job: running rows whose lease expired (the process died; the job's next start marks
them failed) and runs that wrote audience_state (``derive_run_writes``, filled by the guard) but
never finished, which legitimate runs cannot leave (they finish in their write transaction; the
problem text for those comes from ``derive.io.history.unfinished_writers``).
"""

from __future__ import annotations

from datetime import datetime

import polars as pl

from derive.io.connect import Db
from derive.io.jsonsql import array_length_at, time_in_range

# A run "covers every user" unless it was given a user list (``derive run --user``); only such
# runs count as a job's last success (a subset run cannot stand in for the scheduled one).
# Run rows can be written by any service_role client: ``args.users`` that is not an array
# reads as no list (a full run) instead of failing the query.
_FULL_SCOPE = f"coalesce({array_length_at('r.args', 'users')}, 0) = 0"

_JOB_SUMMARY = f"""
SELECT j.job,
       s.last_success,
       s.last_success_as_of,
       s.last_any_success,
       d.run_id AS last_run_id,
       d.status AS last_status,
       d.as_of AS last_as_of,
       d.started_at AS last_started_at,
       d.finished_at AS last_finished_at,
       extract(epoch FROM d.finished_at - d.started_at)::float8 AS last_seconds,
       d.error AS last_error,
       d.counts::text AS last_counts,
       d.mode AS last_mode,
       s.running,
       s.expired_leases,
       (SELECT count(DISTINCT w.run_id)
          FROM derive_run_writes w
          JOIN derivation_runs r ON r.run_id = w.run_id
         WHERE r.job = j.job
           AND r.status <> 'succeeded'
           AND NOT (r.status = 'running' AND r.lease_expires_at >= clock_timestamp()))
         AS unfinished_writers,
       s.succeeded_24h,
       s.failed_24h,
       s.skipped_24h
  FROM (SELECT DISTINCT r.job FROM derivation_runs r) j
 CROSS JOIN LATERAL (
       SELECT max(r.finished_at) FILTER (WHERE r.status = 'succeeded' AND {_FULL_SCOPE})
                AS last_success,
              (array_agg({time_in_range("r.as_of")} ORDER BY r.finished_at DESC)
                 FILTER (WHERE r.status = 'succeeded' AND {_FULL_SCOPE}))[1] AS last_success_as_of,
              max(r.finished_at) FILTER (WHERE r.status = 'succeeded') AS last_any_success,
              count(*) FILTER (WHERE r.status = 'running') AS running,
              count(*) FILTER (WHERE r.status = 'running'
                                 AND r.lease_expires_at < clock_timestamp()) AS expired_leases,
              count(*) FILTER (WHERE r.status = 'succeeded' AND r.started_at >= $1) AS succeeded_24h,
              count(*) FILTER (WHERE r.status = 'failed' AND r.started_at >= $1) AS failed_24h,
              count(*) FILTER (WHERE r.status = 'skipped' AND r.started_at >= $1) AS skipped_24h
         FROM derivation_runs r
        WHERE r.job = j.job) s
  -- The decisive run: the newest that was not skipped (a skip only says another run held the lock).
  LEFT JOIN LATERAL (
       SELECT r.run_id::text AS run_id, r.status, {time_in_range("r.as_of")} AS as_of,
              r.started_at, r.finished_at, r.error, r.counts, r.mode
         FROM derivation_runs r
        WHERE r.job = j.job AND r.status <> 'skipped'
        ORDER BY r.started_at DESC
        LIMIT 1) d ON true
 ORDER BY j.job
"""

JOB_SUMMARY = pl.Schema(
    {
        "job": pl.String(),
        "last_success": pl.Datetime("us", "UTC"),
        "last_success_as_of": pl.Datetime("us", "UTC"),
        "last_any_success": pl.Datetime("us", "UTC"),
        "last_run_id": pl.String(),
        "last_status": pl.String(),
        "last_as_of": pl.Datetime("us", "UTC"),
        "last_started_at": pl.Datetime("us", "UTC"),
        "last_finished_at": pl.Datetime("us", "UTC"),
        "last_seconds": pl.Float64(),
        "last_error": pl.String(),
        "last_counts": pl.String(),
        "last_mode": pl.String(),
        "running": pl.Int64(),
        "expired_leases": pl.Int64(),
        "unfinished_writers": pl.Int64(),
        "succeeded_24h": pl.Int64(),
        "failed_24h": pl.Int64(),
        "skipped_24h": pl.Int64(),
    }
)


def job_summary(db: Db, *, since: datetime) -> pl.DataFrame:
    """One row per job in the run log: last full-scope success, the decisive last run, run counts.

    Args:
        since: start of the window of the ``*_24h`` run counts.
    """
    with db.transaction(role="service_role"):
        rows = db.fetch_all(_JOB_SUMMARY, (since,))
    return pl.DataFrame(rows, schema=JOB_SUMMARY, orient="row")
