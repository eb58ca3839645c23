"""SQL of the touchpoint ingest and of the attribution job.

The identifier hash is computed by PostgreSQL at insert time,
``sha256(convert_to(lower(surface || ':' || raw_identifier), 'UTF8') || users.attribution_salt)``,
so it is byte-for-byte what any SQL-side lookup computes (Python's ``str.lower`` and PostgreSQL's
``lower`` differ on some characters). Raw identifiers only ever sit in a temporary table of the
ingest transaction.

``prospect_touchpoints``' unique (surface, external_id) constraint is deferrable, and PostgreSQL
refuses deferrable constraints as ON CONFLICT arbiters: the ingest skips stored events with
NOT EXISTS instead, under the job's advisory lock, with the constraint as the backstop.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa

from derive.errors import ContractError, UsageError
from derive.io.connect import Db
from derive.io.incremental import unseen_rows_sql
from derive.schema import (
    CONVERSION_KINDS,
    LINES,
    NO_CREDIT_KINDS,
    STORED_CREDITS,
    SURFACE_SUMMARY,
    TOUCHPOINTS,
)

# Same grammar as the ingest check: a JSON number or numeric text PostgreSQL's numeric accepts.
_NUMBER = r"^\s*[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$"
# The same on stored text, bounded so that the ::numeric cast cannot overflow (numeric holds up
# to 131072 digits before the point and 16383 after): at most 1000 characters, exponent below
# 10^4. A longer or larger amount is a bad amount, not a failed read.
_STORED_NUMBER = r"^\s*[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]{1,4})?\s*$"


def _kinds(kinds: Sequence[str]) -> str:
    """A SQL list of our own enum constants (fixed in code, never user input)."""
    return ", ".join(f"'{k}'" for k in kinds)


def read_lines(path: str) -> pl.DataFrame:
    """The lines of a JSON-lines file (``-``: stdin), numbered from 1.

    Raises:
        UsageError: the file cannot be read (missing, a directory, no permission).
        ContractError: the file is not UTF-8 text.
    """
    name = "stdin" if path == "-" else path
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ContractError(
            f"{name} is not UTF-8 text (byte {exc.start}); touchpoints are JSON lines"
        ) from None
    # Split on newlines only: str.splitlines would also split inside JSON strings that hold a
    # raw U+2028 or form feed, which JSON allows.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return pl.DataFrame(
        {"line_no": pl.int_range(1, len(lines) + 1, eager=True), "line": lines}, schema=LINES
    ).with_columns(pl.col("line").str.strip_suffix("\r"))


@dataclass(frozen=True)
class InsertResult:
    """What an ingest did with its valid lines."""

    inserted: int
    duplicates_in_file: int
    already_stored: int
    salts_created: int
    rejected: pl.DataFrame  # line_no, reason, detail (rows the database side refused)


_INGEST_COLUMNS = pl.Schema(
    {
        "line_no": pl.Int64(),
        "user_id": pl.String(),
        "org_id": pl.String(),
        "prospect_id": pl.String(),
        "surface": pl.String(),
        "touchpoint": pl.String(),
        "external_id": pl.String(),
        "occurred_at": pl.Datetime("us", "UTC"),
        "identifier": pl.String(),
        "ingestion_source": pl.String(),
        "line": pl.String(),
    }
)


def insert_touchpoints(db: Db, valid: pl.DataFrame, *, strict: bool = False) -> InsertResult:
    """Insert validated touchpoints that are not stored yet; call inside a transaction.

    ``strict``: insert nothing when the database side refuses any line.

    Lines whose user, org or prospect does not exist (or whose prospect belongs to another user)
    are refused with a reason. Users that get their first identifier hash get a fresh random
    32-byte ``attribution_salt``.
    """
    db.execute("DROP TABLE IF EXISTS pg_temp.derive_touchpoints_in")
    db.ingest("derive_touchpoints_in", valid.select(_INGEST_COLUMNS.names()).cast(_INGEST_COLUMNS))
    db.execute(
        "CREATE TEMP TABLE derive_touchpoints_checked ON COMMIT DROP AS"
        " SELECT t.*, CASE"
        "   WHEN u.id IS NULL THEN 'unknown_user'"
        "   WHEN t.org_id IS NOT NULL AND o.id IS NULL THEN 'unknown_org'"
        "   WHEN t.prospect_id IS NOT NULL AND p.id IS NULL THEN 'unknown_prospect'"
        # Exactly as stored (jsonb keeps the number's digits; Polars would read it as a float).
        "   WHEN jsonb_typeof(t.line::jsonb -> 'payload' -> 'amount') = 'number'"
        "    AND (scale((t.line::jsonb -> 'payload' ->> 'amount')::numeric)"
        f"         > {AMOUNT_SCALE} OR abs((t.line::jsonb -> 'payload' ->> 'amount')::numeric)"
        f"         >= 1e{AMOUNT_INTEGER_DIGITS}) THEN 'amount_out_of_range'"
        " END AS reason"
        " FROM derive_touchpoints_in t"
        " LEFT JOIN users u ON u.id = t.user_id::uuid"
        " LEFT JOIN orgs o ON o.id = t.org_id::uuid"
        " LEFT JOIN prospects p ON p.id = t.prospect_id::uuid AND p.user_id = t.user_id::uuid"
    )
    db.execute("DROP TABLE derive_touchpoints_in")
    rejected = db.fetch_df(
        "SELECT line_no, reason, CASE reason"
        "  WHEN 'unknown_user' THEN 'user_id: ''' || user_id || ''' is not a known user'"
        "  WHEN 'unknown_org' THEN 'org_id: ''' || org_id || ''' is not a known org'"
        "  WHEN 'unknown_prospect' THEN 'prospect_id: ''' || prospect_id"
        "    || ''' is not a prospect of user ' || user_id"
        "  WHEN 'amount_out_of_range' THEN 'payload.amount: '"
        "    || (line::jsonb -> 'payload' ->> 'amount')"
        f"    || ' has more than {AMOUNT_SCALE} decimal places or {AMOUNT_INTEGER_DIGITS} integer"
        " digits; its credits could not sum to it exactly' END AS detail"
        " FROM derive_touchpoints_checked WHERE reason IS NOT NULL ORDER BY line_no"
    )
    if strict and rejected.height:
        db.execute("DELETE FROM derive_touchpoints_checked")
    # 32 random bytes from two v4 uuids: pg_strong_random underneath, and no pgcrypto needed.
    salts = db.fetch_value(
        "WITH s AS (UPDATE users SET attribution_salt ="
        "   uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid())"
        " WHERE attribution_salt IS NULL AND id IN (SELECT user_id::uuid"
        "   FROM derive_touchpoints_checked WHERE reason IS NULL AND identifier IS NOT NULL)"
        " RETURNING 1) SELECT count(*) FROM s"
    )
    counts = db.fetch_all(
        "SELECT count(*), count(DISTINCT (surface, external_id))"
        " FROM derive_touchpoints_checked WHERE reason IS NULL"
    )[0]
    inserted = db.fetch_value(
        "WITH fresh AS ("
        "  SELECT DISTINCT ON (surface, external_id) * FROM derive_touchpoints_checked"
        "  WHERE reason IS NULL ORDER BY surface, external_id, line_no),"
        " ins AS ("
        "  INSERT INTO prospect_touchpoints (user_id, org_id, prospect_id, surface, touchpoint,"
        "    external_id, identifier_hash, occurred_at, payload_jsonb, ingestion_source)"
        "  SELECT f.user_id::uuid, f.org_id::uuid, f.prospect_id::uuid, f.surface,"
        "    f.touchpoint::touchpoint_kind, f.external_id,"
        "    CASE WHEN f.identifier IS NOT NULL THEN sha256(convert_to("
        "      lower(f.surface || ':' || f.identifier), 'UTF8') || u.attribution_salt) END,"
        "    f.occurred_at, nullif(f.line::jsonb -> 'payload', 'null'::jsonb), f.ingestion_source"
        "  FROM fresh f JOIN users u ON u.id = f.user_id::uuid"
        "  WHERE NOT EXISTS (SELECT 1 FROM prospect_touchpoints p"
        "                    WHERE p.surface = f.surface AND p.external_id = f.external_id)"
        "  RETURNING 1)"
        " SELECT count(*) FROM ins"
    )
    db.execute("DROP TABLE derive_touchpoints_checked")
    valid_rows, distinct_keys = int(counts[0]), int(counts[1])
    return InsertResult(
        inserted=int(inserted),
        duplicates_in_file=valid_rows - distinct_keys,
        already_stored=distinct_keys - int(inserted),
        salts_created=int(salts),
        rejected=rejected.cast({"line_no": pl.Int64, "reason": pl.String, "detail": pl.String}),
    )


def _bounds(db: Db, *, since: datetime | None, as_of: datetime, window: timedelta) -> None:
    """Bind the read window as transaction-local settings (keeps ADBC's COPY read path)."""
    touch_from = "-infinity" if since is None else (since - window).isoformat()
    db.set_local(touch_from=touch_from, as_of=as_of.isoformat())


def lock_sources(db: Db) -> None:
    """Hold off writers of ``prospect_touchpoints`` until the caller's transaction ends.

    ``attribution_credits`` has no foreign keys (migration 0010): a touchpoint deleted after the
    job read it would leave credits naming it. Reading and writing under a SHARE lock makes the
    job see every delete that committed before it and lets none commit until its credits are in,
    so the delete trigger then removes them. Ingests and deletes of touchpoints wait for the run
    (seconds); readers never do.
    """
    db.execute("LOCK TABLE prospect_touchpoints IN SHARE MODE")


#: Largest conversion amount credited exactly: 20 integer digits, 18 decimal places (the
#: credit value's Decimal(38, 18)). Larger or finer amounts count as bad amounts.
AMOUNT_INTEGER_DIGITS = 20
AMOUNT_SCALE = 18


def read_attribution_touchpoints(
    db: Db, *, since: datetime | None, as_of: datetime, window: timedelta
) -> pl.DataFrame:
    """Every per-prospect touchpoint that can be a conversion or a credited touch, one query.

    ``occurred_at`` in ``[since - window, as_of]`` (all history up to ``as_of`` without
    ``since``); anonymous rows and never-credited kinds stay in the database. A conversion's
    ``amount`` comes as exact numeric text (null when absent or not a number); ``bad_amount``
    flags an amount that is present but not a number, or has more than
    :data:`AMOUNT_SCALE` decimal places or :data:`AMOUNT_INTEGER_DIGITS` integer digits (the
    ingest refuses those; they can only come from another writer).
    """
    _bounds(db, since=since, as_of=as_of, window=window)
    fits = (
        f"scale(t.amount_num) <= {AMOUNT_SCALE} AND abs(t.amount_num) < 1e{AMOUNT_INTEGER_DIGITS}"
    )
    frame = db.fetch_df(
        "SELECT t.id, t.user_id, t.org_id, t.prospect_id, t.surface, t.touchpoint, t.occurred_at,"
        f"  CASE WHEN {fits} THEN t.amount_num::text END AS amount, t.currency,"
        "   coalesce(t.has_amount AND NOT (t.amount_num IS NOT NULL AND"
        f"  {fits}), false) AS bad_amount"
        " FROM (SELECT p.id, p.user_id, p.org_id, p.prospect_id, p.surface,"
        "   p.touchpoint::text AS touchpoint, p.occurred_at,"
        f"  CASE WHEN p.touchpoint IN ({_kinds(CONVERSION_KINDS)})"
        f"        AND p.payload_jsonb ->> 'amount' ~ '{_STORED_NUMBER}'"
        "         AND length(p.payload_jsonb ->> 'amount') <= 1000"
        "    THEN (p.payload_jsonb ->> 'amount')::numeric END AS amount_num,"
        f"  CASE WHEN p.touchpoint IN ({_kinds(CONVERSION_KINDS)})"
        "    THEN p.payload_jsonb ->> 'currency' END AS currency,"
        f"  p.touchpoint IN ({_kinds(CONVERSION_KINDS)})"
        "    AND p.payload_jsonb ? 'amount'"
        "    AND jsonb_typeof(p.payload_jsonb -> 'amount') <> 'null' AS has_amount"
        "   FROM prospect_touchpoints p"
        "  WHERE p.prospect_id IS NOT NULL"
        f"   AND p.touchpoint NOT IN ({_kinds(NO_CREDIT_KINDS)})"
        "    AND p.occurred_at >= current_setting('derive.touch_from')::timestamptz"
        "    AND p.occurred_at <= current_setting('derive.as_of')::timestamptz) AS t"
    )
    return frame.cast(pl.Schema({**dict(TOUCHPOINTS), "bad_amount": pl.Boolean()}))


def anonymous_counts(
    db: Db, *, since: datetime | None, as_of: datetime, window: timedelta
) -> pl.DataFrame:
    """Anonymous touchpoints of the read window per surface: aggregate counts, never rows."""
    _bounds(db, since=since, as_of=as_of, window=window)
    frame = db.fetch_df(
        "SELECT surface, count(*) AS touchpoints,"
        f"  count(*) FILTER (WHERE touchpoint IN ({_kinds(CONVERSION_KINDS)})) AS conversions"
        " FROM prospect_touchpoints"
        " WHERE prospect_id IS NULL"
        "   AND occurred_at >= current_setting('derive.touch_from')::timestamptz"
        "   AND occurred_at <= current_setting('derive.as_of')::timestamptz"
        " GROUP BY surface ORDER BY surface"
    )
    return frame.cast({"surface": pl.String, "touchpoints": pl.Int64, "conversions": pl.Int64})


def arrow_uuid(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    """Mark 16-byte binary columns as Arrow uuids: ADBC then creates and fills uuid columns."""
    for name in columns:
        index = table.schema.get_field_index(name)
        storage = table.column(index).cast(pa.binary(16))
        chunks = [pa.ExtensionArray.from_storage(pa.uuid(), c) for c in storage.chunks]
        table = table.set_column(index, name, pa.chunked_array(chunks, type=pa.uuid()))
    return table


def _stage(db: Db, name: str, frame: pl.DataFrame, uuid_columns: Sequence[str]) -> None:
    db.execute(f"DROP TABLE IF EXISTS pg_temp.{name}")
    db.ingest(name, arrow_uuid(frame.to_arrow(), uuid_columns))


def read_stored_credits(
    db: Db, *, models: Sequence[str], since: datetime | None, as_of: datetime
) -> pl.DataFrame:
    """Stored credits of ``models`` for every conversion touchpoint in ``[since, as_of]``.

    Includes conversions that have since lost their prospect, so their credits get deleted.
    """
    db.set_local(
        models=",".join(models),
        since="-infinity" if since is None else since.isoformat(),
        as_of=as_of.isoformat(),
    )
    frame = db.fetch_df(
        "SELECT a.id, a.conversion_id, a.touchpoint_id, a.user_id, a.org_id, a.prospect_id,"
        " a.surface, a.model, a.weight, a.attributed_value::text AS attributed_value, a.currency,"
        " a.window_days, a.half_life_days"
        " FROM attribution_credits a JOIN prospect_touchpoints c ON c.id = a.conversion_id"
        " WHERE a.model = ANY(string_to_array(current_setting('derive.models'), ','))"
        f"  AND c.touchpoint IN ({_kinds(CONVERSION_KINDS)})"
        "   AND c.occurred_at >= current_setting('derive.since')::timestamptz"
        "   AND c.occurred_at <= current_setting('derive.as_of')::timestamptz"
    )
    return frame.cast(STORED_CREDITS)


_CREDIT_UUIDS = ("conversion_id", "touchpoint_id", "user_id", "org_id", "prospect_id")
_CREDIT_FIELDS = (
    "conversion_id, touchpoint_id, user_id, org_id, prospect_id, surface, model, weight,"
    " attributed_value, currency, window_days, half_life_days"
)
# The same columns as selected from a staged frame: values carry 18 decimal places in Arrow and
# are stored without trailing zeros (10.5, not 10.500000000000000000).
_CREDIT_VALUES_SQL = _CREDIT_FIELDS.replace("attributed_value", "trim_scale(attributed_value)")


def write_credit_changes(
    db: Db,
    *,
    inserts: pl.DataFrame,
    updates: pl.DataFrame,
    deletes: pl.DataFrame,
    run_id: str,
) -> dict[str, int]:
    """Apply a credit diff (see ``diff_credits``); call inside the job's transaction.

    Every statement is set-based: one bulk COPY per part into a temporary table, then one
    DELETE, one UPDATE and one INSERT. Returns inserted/updated/deleted counts.
    """
    counts = {"inserted": 0, "updated": 0, "deleted": 0}
    if deletes.height:
        _stage(db, "derive_credits_gone", deletes, ["id"])
        counts["deleted"] = int(
            db.fetch_value(
                "WITH d AS (DELETE FROM attribution_credits a USING derive_credits_gone g"
                " WHERE a.id = g.id RETURNING 1) SELECT count(*) FROM d"
            )
        )
        db.execute("DROP TABLE derive_credits_gone")
    if updates.height:
        _stage(db, "derive_credits_changed", updates, ["id", *_CREDIT_UUIDS])
        counts["updated"] = int(
            db.fetch_value(
                "WITH u AS (UPDATE attribution_credits a SET user_id = c.user_id,"
                " org_id = c.org_id, prospect_id = c.prospect_id, surface = c.surface,"
                " weight = c.weight, attributed_value = trim_scale(c.attributed_value),"
                " currency = c.currency, window_days = c.window_days,"
                " half_life_days = c.half_life_days, run_id = $1::uuid, computed_at = now()"
                " FROM derive_credits_changed c WHERE a.id = c.id RETURNING 1)"
                " SELECT count(*) FROM u",
                (run_id,),
            )
        )
        db.execute("DROP TABLE derive_credits_changed")
    if inserts.height:
        _stage(db, "derive_credits_new", inserts, _CREDIT_UUIDS)
        # In key order, with time-ordered ids (UUIDv7 layout: milliseconds, version 7, a
        # counter) instead of the column's random default: the primary key and the unique index
        # are then filled at their right edge, page by page, not at random.
        counts["inserted"] = int(
            db.fetch_value(
                f"WITH i AS (INSERT INTO attribution_credits (id, {_CREDIT_FIELDS}, run_id,"
                " computed_at) SELECT"
                " (lpad(to_hex((extract(epoch FROM statement_timestamp()) * 1000)::bigint), 12,"
                "  '0') || '70008' || lpad(to_hex(row_number() OVER w), 15, '0'))::uuid,"
                f" {_CREDIT_VALUES_SQL}, $1::uuid, now()"
                " FROM derive_credits_new"
                " WINDOW w AS (ORDER BY conversion_id, model, touchpoint_id)"
                " ORDER BY conversion_id, model, touchpoint_id"
                " RETURNING 1) SELECT count(*) FROM i",
                (run_id,),
            )
        )
        db.execute("DROP TABLE derive_credits_new")
    return counts


@dataclass(frozen=True)
class AttributionBase:
    """The latest succeeded attribution run: what a run with the same options can build on."""

    run_id: str
    as_of: datetime
    args: dict[str, object]
    read_snapshot: str | None
    counts: dict[str, object]


def attribution_base(db: Db) -> AttributionBase | None:
    """The latest succeeded attribution run (any options), or ``None``; call in a transaction."""
    rows = db.fetch_all(
        "SELECT run_id::text, as_of, args::text, read_snapshot::text, counts::text"
        " FROM derivation_runs"
        " WHERE job = 'attribution' AND status = 'succeeded' ORDER BY finished_at DESC LIMIT 1"
    )
    if not rows:
        return None
    run_id, as_of, args, snapshot, counts = rows[0]
    return AttributionBase(
        str(run_id), as_of, json.loads(args or "{}"), snapshot, json.loads(counts or "{}")
    )


_SNAPSHOT = "current_setting('derive.base_snapshot')::pg_snapshot"
_ANYTHING_NEW_SQL = f"""
SELECT EXISTS ({
    unseen_rows_sql(
        columns="1", table="prospect_touchpoints", alias="p", xid="xid", snapshot=_SNAPSHOT
    )
})
    OR EXISTS ({
    unseen_rows_sql(
        columns="1", table="prospect_touchpoint_changes", alias="c", xid="xid", snapshot=_SNAPSHOT
    )
})
    OR EXISTS (SELECT 1 FROM prospect_touchpoints p
                WHERE p.prospect_id IS NOT NULL
                  AND p.touchpoint IN ({_kinds(CONVERSION_KINDS)})
                  AND p.occurred_at > current_setting('derive.base_as_of')::timestamptz
                  AND p.occurred_at <= current_setting('derive.as_of')::timestamptz)
"""


def touchpoints_changed_since(db: Db, base: AttributionBase, *, as_of: datetime) -> bool:
    """Whether a run at ``as_of`` could credit differently from ``base`` (same options).

    True when a touchpoint row is not visible in the base's read snapshot (inserted later, or by
    a transaction in progress then), a touchpoint was updated, deleted or truncated since, or a
    conversion entered ``(base.as_of, as_of]`` by time. Index probes only. Call inside the run's
    transaction, after :func:`lock_sources`.
    """
    assert base.read_snapshot is not None
    db.set_local(
        base_snapshot=base.read_snapshot,
        base_as_of=base.as_of.isoformat(),
        as_of=as_of.isoformat(),
    )
    return bool(db.fetch_value(_ANYTHING_NEW_SQL))


def current_snapshot(db: Db) -> str:
    """The open transaction's snapshot (the next run's watermark)."""
    return str(db.fetch_value("SELECT pg_current_snapshot()::text"))


def write_run_surfaces(db: Db, run_id: str, surfaces: pl.DataFrame) -> None:
    """Record a run's per-surface totals (``SURFACE_SUMMARY`` rows) in attribution_run_surfaces."""
    if surfaces.is_empty():
        return
    db.execute("DROP TABLE IF EXISTS pg_temp.derive_run_surfaces")
    db.ingest(
        "derive_run_surfaces", surfaces.with_columns(pl.col("attributed_value").cast(pl.String))
    )
    db.execute(
        "INSERT INTO attribution_run_surfaces (run_id, model, surface, currency, conversions,"
        " credits, attributed_value) SELECT $1::uuid, model, surface, currency, conversions,"
        " credits, attributed_value::numeric FROM pg_temp.derive_run_surfaces",
        (run_id,),
    )
    db.execute("DROP TABLE pg_temp.derive_run_surfaces")


def read_run_surfaces(db: Db, run_id: str) -> pl.DataFrame:
    """The per-surface totals a run recorded, shaped as ``SURFACE_SUMMARY``."""
    frame = db.fetch_all(
        "SELECT model, surface, currency, conversions, credits, attributed_value::text"
        " FROM attribution_run_surfaces WHERE run_id = $1::uuid",
        (run_id,),
    )
    return (
        pl.DataFrame(
            frame,
            schema=["model", "surface", "currency", "conversions", "credits", "attributed_value"],
            orient="row",
        )
        .cast(SURFACE_SUMMARY)
        .sort("model", "surface", "currency", nulls_last=True)
    )
