"""Reads behind ``derive status`` / ``derive report`` and the state-history stores of the backfill.

Every read runs as ``service_role`` (RLS is forced on every table) and binds its values. The
report's reads aggregate per day in SQL so only small frames cross the wire.

State history (``derive backfill``) lives either in a directory of per-step parquet files or in
the ``audience_state_history`` table (migration 0005). In both a step is written atomically
(temporary file + rename; one transaction with its marker row), so a step is either complete or
absent and an interrupted backfill resumes after the last complete step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from derive.errors import SourceError, UsageError
from derive.io.connect import Db
from derive.io.jsonsql import array_length_at, bigint_at, time_in_range, timestamptz_at

# -- status ------------------------------------------------------------------------------------------

# Run rows can be written by any service_role client: their JSON is read with checks, a
# malformed value reads as NULL (``args.users`` not an array counts as a full run).
_USERS = f"coalesce({array_length_at('r.args', 'users')}, 0)"

_RECENT_RUNS = f"""
SELECT r.run_id::text AS run_id,
       r.job,
       r.status,
       {time_in_range("r.as_of")} AS as_of,
       r.started_at,
       r.finished_at,
       extract(epoch FROM coalesce(r.finished_at, clock_timestamp()) - r.started_at)::float8
         AS seconds,
       CASE WHEN r.mode = 'incremental'
            THEN 'incremental: ' || coalesce({bigint_at("(r.counts -> 'candidates')", "total")}, 0)
                 || ' users'
            WHEN r.mode = 'full' THEN 'full'
            WHEN {_USERS} > 0 THEN {_USERS} || ' users'
            ELSE 'all' END AS scope,
       r.mode,
       r.full_reason,
       r.base_run_id::text AS base_run_id,
       r.read_snapshot::text AS watermark,
       {bigint_at("r.counts", "users_changed")} AS users_changed,
       {bigint_at("r.counts", "users_rejected")} AS users_rejected,
       r.error
  FROM derivation_runs r
 WHERE r.job = $1
 ORDER BY r.started_at DESC
 LIMIT $2
"""

_LAST_SUCCESS = f"""
SELECT max(r.finished_at) FILTER (WHERE {_USERS} = 0),
       max(r.finished_at)
  FROM derivation_runs r
 WHERE r.job = $1 AND r.status = 'succeeded'
"""

_DISTRIBUTION = "SELECT current_state, count(*) FROM audience_state GROUP BY current_state"

_REJECTIONS_BY_REASON = """
SELECT reason,
       count(*) FILTER (WHERE e.created_at >= $1) AS last_24h,
       count(*) AS last_7d,
       count(DISTINCT e.user_id) AS users_7d
  FROM audience_events e
 CROSS JOIN LATERAL jsonb_array_elements_text(
         CASE WHEN jsonb_typeof(e.metadata -> 'reasons') = 'array'
              THEN e.metadata -> 'reasons' ELSE '[]'::jsonb END) AS reason
 WHERE e.event_category = 'system'
   AND e.event_type = 'validation_fail'
   AND e.created_at >= $2
 GROUP BY reason
 ORDER BY last_7d DESC, reason
"""

_RUN_COLUMNS = {
    "run_id": pl.String(),
    "job": pl.String(),
    "status": pl.String(),
    "as_of": pl.Datetime("us", "UTC"),
    "started_at": pl.Datetime("us", "UTC"),
    "finished_at": pl.Datetime("us", "UTC"),
    "seconds": pl.Float64(),
    "scope": pl.String(),
    "mode": pl.String(),
    "full_reason": pl.String(),
    "base_run_id": pl.String(),
    "watermark": pl.String(),
    "users_changed": pl.Int64(),
    "users_rejected": pl.Int64(),
    "error": pl.String(),
}


def _frame(rows: list[tuple[Any, ...]], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=schema, orient="row")


# Runs that wrote audience_state (the guard records every such statement) but never finished:
# derive's own runs finish in the write transaction, so only a write outside its protocol (a
# forgery by a service_role holder, or a manual write under a hand-started run) leaves these.
_UNFINISHED_WRITERS = """
SELECT w.run_id::text, r.job, r.status, r.started_by, w.first_at
  FROM derive_run_writes w
  JOIN derivation_runs r ON r.run_id = w.run_id
 WHERE r.status <> 'succeeded'
   AND (r.status <> 'running' OR r.lease_expires_at < clock_timestamp())
 ORDER BY w.first_at DESC
 LIMIT 20
"""


def unfinished_writers(db: Db) -> list[tuple[str, str, str, str, datetime]]:
    """(run_id, job, status, started_by, first write) of runs that wrote and never finished."""
    with db.transaction(role="service_role"):
        return [tuple(row) for row in db.fetch_all(_UNFINISHED_WRITERS)]


def server_now(db: Db) -> datetime:
    """The database clock (status and report measure lag against it, not the client's)."""
    value: datetime = db.fetch_value("SELECT clock_timestamp()")
    db.rollback()
    return value


def recent_runs(db: Db, *, job: str, limit: int) -> pl.DataFrame:
    """The last ``limit`` runs of ``job``, newest first, with duration and scope."""
    with db.transaction(role="service_role"):
        rows = db.fetch_all(_RECENT_RUNS, (job, limit))
    return _frame(rows, _RUN_COLUMNS)


def last_success(db: Db, *, job: str) -> tuple[datetime | None, datetime | None]:
    """When the last successful full run and the last successful run of any scope finished."""
    with db.transaction(role="service_role"):
        full, any_scope = db.fetch_all(_LAST_SUCCESS, (job,))[0]
    return full, any_scope


def state_distribution(db: Db) -> dict[str, int]:
    """Users per stored state."""
    with db.transaction(role="service_role"):
        rows = db.fetch_all(_DISTRIBUTION)
    return {str(s): int(n) for s, n in rows}


def rejections_by_reason(db: Db, *, now: datetime) -> pl.DataFrame:
    """``validation_fail`` rows per reason written in the last 24 h and 7 d (and users, 7 d)."""
    with db.transaction(role="service_role"):
        rows = db.fetch_all(
            _REJECTIONS_BY_REASON, (now - timedelta(hours=24), now - timedelta(days=7))
        )
    return _frame(
        rows,
        {
            "reason": pl.String(),
            "last_24h": pl.Int64(),
            "last_7d": pl.Int64(),
            "users_7d": pl.Int64(),
        },
    )


# -- report --------------------------------------------------------------------------------------------

# System rows can be written by any service_role client: a row whose derived_at is not a time
# is left out of every chart (it has no day) and counted by ``malformed_system_rows``.
_DERIVED_AT = timestamptz_at("e.metadata", "derived_at")


def _stamped(event_type: str) -> str:
    """System rows of one type with their derived_at parsed once per row (``OFFSET 0`` keeps
    the planner from inlining the parse into every reference)."""
    return f"""(SELECT e.id, e.user_id, e.created_at, e.metadata, {_DERIVED_AT} AS derived_at
           FROM audience_events e
          WHERE e.event_category = 'system' AND e.event_type = '{event_type}'
         OFFSET 0) e"""


_DAY = "date_trunc('day', e.derived_at AT TIME ZONE 'UTC')"

_DAILY_TRANSITIONS = f"""
SELECT {_DAY} AS day,
       coalesce(e.metadata ->> 'prior_state', '') AS prior_state,
       e.metadata ->> 'new_state' AS new_state,
       count(*) AS n
  FROM {_stamped("state_change_logged")}
 WHERE e.derived_at >= $1
   AND e.derived_at <= $2
 GROUP BY 1, 2, 3
"""

_DAILY_REJECTIONS = f"""
SELECT {_DAY} AS day, reason, count(*) AS n
  FROM {_stamped("validation_fail")}
 CROSS JOIN LATERAL jsonb_array_elements_text(
         CASE WHEN jsonb_typeof(e.metadata -> 'reasons') = 'array'
              THEN e.metadata -> 'reasons' ELSE '[]'::jsonb END) AS reason
 WHERE e.derived_at >= $1
   AND e.derived_at <= $2
 GROUP BY 1, 2
"""

_TOP_REJECTED = f"""
SELECT e.user_id::text AS user_id,
       count(*) AS rejections,
       max(e.derived_at) AS last_derived_at,
       (array_agg(e.metadata ->> 'reasons_key' ORDER BY e.created_at DESC, e.id))[1] AS reasons,
       (array_agg((e.metadata -> 'evidence')::text ORDER BY e.created_at DESC, e.id))[1]
         AS evidence,
       (SELECT s.current_state FROM audience_state s WHERE s.user_id = e.user_id) AS current_state
  FROM {_stamped("validation_fail")}
 WHERE e.derived_at >= $1
   AND e.derived_at <= $2
 GROUP BY e.user_id
 ORDER BY rejections DESC, last_derived_at DESC, max(e.created_at) DESC, user_id
 LIMIT $3
"""

_MALFORMED = f"""
SELECT count(*)
  FROM audience_events e
 WHERE e.event_category = 'system'
   AND e.event_type IN ('state_change_logged', 'validation_fail')
   AND e.created_at >= $1
   AND e.created_at <= $2
   AND {_DERIVED_AT} IS NULL
"""

_RUN_DURATIONS = f"""
SELECT r.started_at,
       r.job,
       r.status,
       extract(epoch FROM r.finished_at - r.started_at)::float8 AS seconds,
       {_USERS} = 0 AS full_run
  FROM derivation_runs r
 WHERE r.finished_at IS NOT NULL AND r.status <> 'skipped'
 ORDER BY r.started_at DESC
 LIMIT $1
"""


def daily_transitions(db: Db, *, start: datetime, end: datetime) -> pl.DataFrame:
    """``state_change_logged`` rows per UTC day of ``derived_at`` and (prior, new) state."""
    with db.transaction(role="service_role"):
        rows = db.fetch_all(_DAILY_TRANSITIONS, (start, end))
    return _frame(
        rows,
        {
            "day": pl.Datetime("us"),
            "prior_state": pl.String(),
            "new_state": pl.String(),
            "n": pl.Int64(),
        },
    )


def daily_rejections(db: Db, *, start: datetime, end: datetime) -> pl.DataFrame:
    """``validation_fail`` rows per UTC day of ``derived_at`` and reason."""
    with db.transaction(role="service_role"):
        rows = db.fetch_all(_DAILY_REJECTIONS, (start, end))
    return _frame(rows, {"day": pl.Datetime("us"), "reason": pl.String(), "n": pl.Int64()})


def top_rejected(db: Db, *, start: datetime, end: datetime, limit: int) -> pl.DataFrame:
    """The most often rejected users of the window with their latest reasons and evidence."""
    with db.transaction(role="service_role"):
        rows = db.fetch_all(_TOP_REJECTED, (start, end, limit))
    return _frame(
        rows,
        {
            "user_id": pl.String(),
            "rejections": pl.Int64(),
            "last_derived_at": pl.Datetime("us", "UTC"),
            "reasons": pl.String(),
            "evidence": pl.String(),
            "current_state": pl.String(),
        },
    )


def malformed_system_rows(db: Db, *, start: datetime, end: datetime) -> int:
    """Audit and rejection rows written in ``[start, end]`` whose derived_at is not a time."""
    with db.transaction(role="service_role"):
        return int(db.fetch_value(_MALFORMED, (start, end)))


def run_durations(db: Db, *, limit: int) -> pl.DataFrame:
    """The last ``limit`` finished (not skipped) runs of every job with their wall time."""
    with db.transaction(role="service_role"):
        rows = db.fetch_all(_RUN_DURATIONS, (limit,))
    return _frame(
        rows,
        {
            "started_at": pl.Datetime("us", "UTC"),
            "job": pl.String(),
            "status": pl.String(),
            "seconds": pl.Float64(),
            "full_run": pl.Boolean(),
        },
    )


_LATEST_AS_OF = """
SELECT max(r.as_of) FROM derivation_runs r WHERE r.job = 'derive' AND r.status = 'succeeded'
"""

_SCORE_HISTOGRAM = """
SELECT floor(s.engagement_score / $1)::bigint AS bin, s.current_state, count(*) AS users
  FROM audience_state s
 GROUP BY 1, 2
"""

_STATE_HISTORY = """
SELECT h.as_of, h.current_state, count(*) AS users
  FROM audience_state_history h
 WHERE h.as_of >= $1 AND h.as_of <= $2
 GROUP BY 1, 2
"""


def latest_derive_as_of(db: Db) -> datetime | None:
    """The as_of of the latest successful derive run (the report's default anchor)."""
    with db.transaction(role="service_role"):
        value: datetime | None = db.fetch_value(_LATEST_AS_OF)
    return value


def max_score(db: Db) -> float:
    """The highest stored engagement score (0 without states)."""
    with db.transaction(role="service_role"):
        value = db.fetch_value(
            "SELECT coalesce(max(engagement_score), 0)::float8 FROM audience_state"
        )
    return float(value)


def score_histogram(db: Db, *, width: float) -> pl.DataFrame:
    """Stored users per score bin of ``width`` (``bin`` k holds [k * width, (k + 1) * width)) and state."""
    with db.transaction(role="service_role"):
        rows = db.fetch_all(_SCORE_HISTOGRAM, (width,))
    return _frame(rows, {"bin": pl.Int64(), "current_state": pl.String(), "users": pl.Int64()})


def state_history(db: Db, *, start: datetime, end: datetime) -> pl.DataFrame:
    """Users per state at each ``audience_state_history`` step in ``[start, end]``."""
    with db.transaction(role="service_role"):
        rows = db.fetch_all(_STATE_HISTORY, (start, end))
    return _frame(
        rows,
        {"as_of": pl.Datetime("us", "UTC"), "current_state": pl.String(), "users": pl.Int64()},
    )


# -- state history --------------------------------------------------------------------------------------

#: One step of state history: every user with a state at ``as_of`` (uuids as 16-byte binary).
HISTORY = pl.Schema(
    {
        "user_id": pl.Binary(),
        "current_state": pl.String(),
        "state_updated_at": pl.Datetime("us", "UTC"),
        "engagement_score": pl.Float64(),
        "last_event_type": pl.String(),
        "last_activity_at": pl.Datetime("us", "UTC"),
    }
)


def _interval(value: timedelta) -> str:
    return f"{int(value.total_seconds())} seconds"


@dataclass(frozen=True)
class Backfill:
    """What identifies a backfill: a step's states depend on all of it."""

    origin: datetime
    step: timedelta
    lookback: timedelta
    rules_version: str

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form (the parquet directory's manifest)."""
        return {
            "origin": self.origin.astimezone(UTC).isoformat(),
            "step_seconds": str(int(self.step.total_seconds())),
            "lookback_seconds": str(int(self.lookback.total_seconds())),
            "rules_version": self.rules_version,
        }


def _uuid_text(column: str) -> pl.Expr:
    hexed = pl.col(column).bin.encode("hex")
    return pl.concat_str(
        [
            hexed.str.slice(0, 8),
            hexed.str.slice(8, 4),
            hexed.str.slice(12, 4),
            hexed.str.slice(16, 4),
            hexed.str.slice(20, 12),
        ],
        separator="-",
    )


def _uuid_binary(column: str) -> pl.Expr:
    return pl.col(column).str.replace_all("-", "", literal=True).str.decode("hex")


def _step_name(as_of: datetime) -> str:
    return f"as_of={as_of.astimezone(UTC).strftime('%Y-%m-%dT%H-%M-%SZ')}.parquet"


def _parse_step_name(name: str) -> datetime | None:
    if not (name.startswith("as_of=") and name.endswith(".parquet")):
        return None
    try:
        value = datetime.strptime(name[6:-8], "%Y-%m-%dT%H-%M-%SZ")
    except ValueError:
        return None
    return value.replace(tzinfo=UTC)


class ParquetHistory:
    """State history as one parquet file per step in a directory (``as_of=...Z.parquet``).

    Files hold uuids as text, so any tool can read them; a file appears only complete (written
    to a temporary name, synced, then renamed), so its presence marks the step as done. The
    directory's ``backfill.json`` names the backfill it belongs to.
    """

    MANIFEST = "backfill.json"

    def __init__(self, directory: Path, backfill: Backfill) -> None:
        self.directory = directory
        self.backfill = backfill

    def describe(self) -> str:
        """Where the history goes, for messages."""
        return str(self.directory)

    def open(self) -> None:
        """Create the directory or check that it holds the same backfill.

        Raises:
            UsageError: the directory holds steps of a backfill with other parameters.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / self.MANIFEST
        wanted = self.backfill.as_dict()
        if manifest.exists():
            try:
                found = json.loads(manifest.read_text(encoding="utf-8"))
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
                raise UsageError(
                    f"{manifest} is not a backfill manifest (not JSON); use another --out "
                    "directory, or remove the file to resume into this one"
                ) from None
            if found != wanted:
                raise UsageError(
                    f"{self.directory} holds a backfill with other parameters ({found}); "
                    "use another --out directory or remove it"
                )
            return
        temporary = manifest.with_name(f".{manifest.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(wanted, indent=2) + "\n")
        os.replace(temporary, manifest)

    def done(self) -> set[datetime]:
        """The as_of of every complete step."""
        found = (_parse_step_name(p.name) for p in self.directory.iterdir())
        return {s for s in found if s is not None}

    def load(self, as_of: datetime) -> pl.DataFrame:
        """The states of one complete step."""
        frame = pl.read_parquet(self.directory / _step_name(as_of))
        return frame.with_columns(_uuid_binary("user_id")).select(list(HISTORY.names()))

    def save(self, as_of: datetime, states: pl.DataFrame, *, run_id: str | None) -> None:
        """Write one step atomically."""
        target = self.directory / _step_name(as_of)
        temporary = self.directory / f".{target.name}.{os.getpid()}.tmp"
        out = states.select(list(HISTORY.names())).with_columns(
            _uuid_text("user_id"), as_of=pl.lit(as_of, pl.Datetime("us", "UTC"))
        )
        out.sort("user_id").write_parquet(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)


_HISTORY_DONE = """
SELECT as_of
  FROM audience_state_history_steps
 WHERE origin = $1 AND step = $2::interval AND lookback = $3::interval AND rules_version = $4
"""
_HISTORY_LOAD = """
SELECT h.user_id,
       h.current_state,
       h.state_updated_at,
       h.engagement_score::float8 AS engagement_score,
       h.last_event_type,
       h.last_activity_at
  FROM audience_state_history h
 WHERE h.as_of = current_setting('derive.history_as_of')::timestamptz
"""
_HISTORY_INSERT = """
INSERT INTO audience_state_history
       (as_of, user_id, current_state, state_updated_at, engagement_score, last_event_type,
        last_activity_at)
SELECT $1, encode(t.user_id, 'hex')::uuid, t.current_state, t.state_updated_at,
       t.engagement_score, t.last_event_type, t.last_activity_at
  FROM derive_tmp_history t
"""
_HISTORY_MARK = """
INSERT INTO audience_state_history_steps
       (as_of, origin, step, lookback, rules_version, users, run_id)
VALUES ($1, $2, $3::interval, $4::interval, $5, $6, $7::uuid)
"""


class TableHistory:
    """State history in ``audience_state_history`` (primary key ``(as_of, user_id)``)."""

    def __init__(self, db: Db, backfill: Backfill) -> None:
        self.db = db
        self.backfill = backfill

    def describe(self) -> str:
        """Where the history goes, for messages."""
        return f"audience_state_history on {self.db.label}"

    def open(self) -> None:
        """Nothing to prepare: the table comes with migration 0005."""

    def done(self) -> set[datetime]:
        """The as_of of every complete step of this backfill."""
        b = self.backfill
        with self.db.transaction(role="service_role"):
            rows = self.db.fetch_all(
                _HISTORY_DONE,
                (b.origin, _interval(b.step), _interval(b.lookback), b.rules_version),
            )
        return {r[0].astimezone(UTC) for r in rows}

    def load(self, as_of: datetime) -> pl.DataFrame:
        """The states of one complete step."""
        with self.db.transaction(role="service_role"):
            self.db.set_local(history_as_of=as_of.isoformat())
            frame = self.db.fetch_df(_HISTORY_LOAD)
        if frame.height == 0:
            return pl.DataFrame(schema=HISTORY)
        return frame.select([pl.col(n).cast(t) for n, t in HISTORY.items()])

    def save(self, as_of: datetime, states: pl.DataFrame, *, run_id: str | None) -> None:
        """Write one step and its marker row in one transaction (replacing an older step)."""
        b = self.backfill
        typed = states.select([pl.col(n).cast(t) for n, t in HISTORY.items()])
        try:
            with self.db.transaction(role="service_role"):
                self.db.execute("DELETE FROM audience_state_history WHERE as_of = $1", (as_of,))
                self.db.execute(
                    "DELETE FROM audience_state_history_steps WHERE as_of = $1", (as_of,)
                )
                self.db.execute("DROP TABLE IF EXISTS derive_tmp_history")
                self.db.ingest("derive_tmp_history", typed)
                self.db.execute(_HISTORY_INSERT, (as_of,))
                self.db.execute(
                    _HISTORY_MARK,
                    (
                        as_of,
                        b.origin,
                        _interval(b.step),
                        _interval(b.lookback),
                        b.rules_version,
                        typed.height,
                        run_id,
                    ),
                )
                self.db.execute("DROP TABLE derive_tmp_history")
        except SourceError as exc:
            raise SourceError(f"writing state history for {as_of.isoformat()}: {exc}") from exc
