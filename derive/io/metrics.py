"""Surface metrics I/O: reading adapter output files, and the SQL of ingestion and rollup.

Writes run inside the caller's transaction (as ``service_role``): rows are bulk-loaded into a
temporary table with ADBC, then moved with one ``INSERT ... SELECT``. Reads bind their one value
(``as_of``) through a transaction-local setting so ADBC keeps its COPY-based read path.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl

from derive.errors import ContractError
from derive.io.connect import Db

# --------------------------------------------------------------------------------------------------
# Adapter output files
# --------------------------------------------------------------------------------------------------

#: Fields of a ``SurfaceMetricRow`` (kept in step with ``derive.transforms.metrics_contract``).
_ROW_FIELDS: tuple[str, ...] = (
    "metric_kind",
    "window_start",
    "window_end",
    "value_numeric",
    "value_text",
    "currency",
    "payload_jsonb",
)


class _NonFinite:
    """NaN / Infinity in the input: Python's decoder accepts them, JSON does not."""

    def __init__(self, text: str) -> None:
        self.text = text


_ABSENT = object()


@dataclass(frozen=True)
class FetchOutput:
    """One ``FetchMetricsOutput`` object of an input file (its rows are in the rows frame)."""

    object: int
    surface: str
    health_note: str
    next_poll_after_ms: int
    user_id: str | None
    org_id: str | None
    rows: int


def _payload_default(value: object) -> object:
    if isinstance(value, Decimal):
        return float(value)
    return None


def _typed(value: Any, *, json_text: bool) -> tuple[str, str | None]:
    """(JSON type, text) of one field value; ``json_text`` forces JSON text for strings too."""
    if value is _ABSENT:
        return "absent", None
    if value is None:
        return "null", None
    if isinstance(value, _NonFinite):
        return "nonfinite", value.text
    if isinstance(value, bool):
        return "boolean", "true" if value else "false"
    if isinstance(value, int | Decimal):
        return "number", str(value)
    if isinstance(value, str):
        return "string", json.dumps(value) if json_text else value
    kind = "object" if isinstance(value, dict) else "array"
    return kind, json.dumps(value, default=_payload_default, ensure_ascii=False)


def _documents(text: str, name: str) -> list[tuple[str, Any]]:
    """Every top-level JSON value of ``text`` with where it starts: one object, JSON lines, or
    pretty-printed objects one after another."""
    decoder = json.JSONDecoder(parse_float=Decimal, parse_constant=_NonFinite)
    docs: list[tuple[str, Any]] = []
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos].isspace():
            pos += 1
        if pos >= end:
            return docs
        where = f"{name!r} line {text.count(chr(10), 0, pos) + 1}"
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ContractError(
                f"{name!r} is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from None
        docs.append((where, value))


def _uuid_field(doc: dict[str, Any], key: str, where: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    try:
        if isinstance(value, str):
            return str(uuid.UUID(value))
    except ValueError:
        pass
    raise ContractError(f"{where}: field {key!r} is {value!r}; expected a UUID string")


def _bad(where: str, key: str, value: object, expected: str) -> Any:
    raise ContractError(f"{where}: field {key!r} is {value!r}; expected {expected}")


def _check_object(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ContractError(
            f"{where} is not a FetchMetricsOutput object (got a JSON {type(doc).__name__})"
        )
    surface = doc.get("surface")
    if not isinstance(surface, str) or not surface.strip():
        _bad(where, "surface", surface, 'a non-empty string such as "tryst"')
    if not isinstance(doc.get("rows"), list):
        _bad(where, "rows", doc.get("rows"), "an array of SurfaceMetricRow objects (may be empty)")
    poll = doc.get("next_poll_after_ms")
    if (
        isinstance(poll, bool)
        or not isinstance(poll, int | Decimal)
        or poll < 0
        or poll != int(poll)
    ):
        _bad(where, "next_poll_after_ms", poll, "a whole number of milliseconds >= 0")
    if not isinstance(doc.get("health_note"), str):
        _bad(where, "health_note", doc.get("health_note"), "a string (may be empty)")
    return doc


def read_fetch_output(path: str) -> tuple[list[FetchOutput], pl.DataFrame]:
    """Read a file of ``FetchMetricsOutput``: one JSON object, or JSON lines of them (``-``: stdin).

    Object-level breaches (not JSON, missing ``surface``, ``rows`` not an array ...) fail the whole
    file; row-level checks are left to :func:`derive.transforms.metrics_contract.validate_metric_rows`.

    Returns:
        The objects, and one frame of all their rows shaped as
        :data:`derive.transforms.metrics_contract.RAW_ROWS`.

    Raises:
        ContractError: naming the file, the line and the field.
    """
    name = "stdin" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ContractError(
            f"cannot read {name!r}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    stripped = text.strip()
    if not stripped:
        raise ContractError(
            f"{name!r} is empty: expected a FetchMetricsOutput JSON object or JSON lines"
        )
    docs = _documents(text, name)
    objects: list[FetchOutput] = []
    rows: list[tuple[int, int, Any]] = []
    for index, (where, doc) in enumerate(docs, start=1):
        checked = _check_object(doc, where)
        objects.append(
            FetchOutput(
                object=index,
                surface=checked["surface"].strip(),
                health_note=checked["health_note"],
                next_poll_after_ms=int(checked["next_poll_after_ms"]),
                user_id=_uuid_field(checked, "user_id", where),
                org_id=_uuid_field(checked, "org_id", where),
                rows=len(checked["rows"]),
            )
        )
        rows.extend((index, n, row) for n, row in enumerate(checked["rows"], start=1))
    return objects, raw_rows_frame(rows)


def raw_rows_frame(rows: list[tuple[int, int, Any]]) -> pl.DataFrame:
    """``(object, row, decoded JSON row)`` triples -> the raw rows frame (JSON type + text per field).

    Numbers must be decoded as ``int`` / ``Decimal`` (``json.loads(..., parse_float=Decimal)``)
    so their text stays exact.
    """
    columns: dict[str, list[Any]] = {
        "object": [o for o, _, _ in rows],
        "row": [n for _, n, _ in rows],
        "is_object": [isinstance(r, dict) for _, _, r in rows],
    }
    for field in _ROW_FIELDS:
        typed = [
            _typed(
                r.get(field, _ABSENT) if isinstance(r, dict) else _ABSENT,
                json_text=field == "payload_jsonb",
            )
            for _, _, r in rows
        ]
        columns[f"{field}_type"] = [t for t, _ in typed]
        columns[field] = [v for _, v in typed]
    schema: dict[str, Any] = {"object": pl.Int32, "row": pl.Int32, "is_object": pl.Boolean}
    schema.update({c: pl.String for c in columns if c not in schema})
    return pl.DataFrame(columns, schema=schema)


# --------------------------------------------------------------------------------------------------
# Ingestion writes
# --------------------------------------------------------------------------------------------------


def _fresh_temp(db: Db, name: str, frame: pl.DataFrame) -> None:
    db.execute(f"DROP TABLE IF EXISTS pg_temp.{name}")
    db.ingest(name, frame)


def ensure_owner_rows(db: Db, *, user_ids: list[str], org_ids: list[str]) -> None:
    """Create the ``users`` / ``orgs`` rows the foreign keys need (existing rows are kept)."""
    for user_id in user_ids:
        db.execute(
            "INSERT INTO users (id) VALUES ($1::uuid) ON CONFLICT (id) DO NOTHING", (user_id,)
        )
    for org_id in org_ids:
        db.execute("INSERT INTO orgs (id) VALUES ($1::uuid) ON CONFLICT (id) DO NOTHING", (org_id,))


def insert_surface_metrics(db: Db, rows: pl.DataFrame) -> int:
    """Insert-only bulk load of validated rows into ``surface_metrics``. Returns rows inserted.

    ``rows`` columns: user_id, org_id (uuid text), surface, metric_kind, window_start, window_end,
    value_numeric (decimal text), value_text, currency, source, fetched_at, payload_jsonb (JSON text).
    """
    if rows.is_empty():
        return 0
    _fresh_temp(db, "derive_metric_rows", rows)
    count = db.fetch_value(
        "WITH ins AS (INSERT INTO surface_metrics (user_id, org_id, surface, metric_kind,"
        " window_start, window_end, value_numeric, value_text, currency, source, fetched_at,"
        " payload_jsonb)"
        " SELECT user_id::uuid, org_id::uuid, surface, metric_kind::surface_metric_kind,"
        " window_start, window_end, value_numeric::numeric(18, 4), value_text, currency, source,"
        " fetched_at, payload_jsonb::jsonb FROM pg_temp.derive_metric_rows"
        " ORDER BY object, row RETURNING 1) SELECT count(*) FROM ins"
    )
    db.execute("DROP TABLE pg_temp.derive_metric_rows")
    return int(count)


def insert_sessions(db: Db, sessions: pl.DataFrame, steps: pl.DataFrame) -> None:
    """Record ingestion sessions and their steps (see migration 0003 for the columns)."""
    _fresh_temp(db, "derive_ingest_sessions", sessions)
    _fresh_temp(db, "derive_ingest_steps", steps)
    db.execute(
        "INSERT INTO ingestion_sessions (id, kind, user_id, org_id, surface, source, file_name,"
        " status, rows_received, rows_inserted, rows_rejected, rejected_by_reason, rejections,"
        " health_note, next_poll_after_ms, next_poll_after, started_at, finished_at)"
        " SELECT id::uuid, kind, user_id::uuid, org_id::uuid, surface, source, file_name, status,"
        " rows_received, rows_inserted, rows_rejected, rejected_by_reason::jsonb,"
        " rejections::jsonb, health_note, next_poll_after_ms, next_poll_after, started_at,"
        " clock_timestamp() FROM pg_temp.derive_ingest_sessions"
    )
    db.execute(
        "INSERT INTO ingestion_session_steps (session_id, ordinal, step, status, started_at,"
        " finished_at, detail)"
        " SELECT session_id::uuid, ordinal, step, status, started_at, finished_at, detail::jsonb"
        " FROM pg_temp.derive_ingest_steps"
    )
    db.execute("DROP TABLE pg_temp.derive_ingest_sessions")
    db.execute("DROP TABLE pg_temp.derive_ingest_steps")


# --------------------------------------------------------------------------------------------------
# Rollup reads and writes
# --------------------------------------------------------------------------------------------------

_AS_OF = "current_setting('derive.as_of')::timestamptz"

# Sources of every key that has no fresh aggregate: missing or due ones. Rows fetched after
# as_of are not visible, so a rollup at a past as_of sees the data as it was then.
_SOURCES_SQL = f"""
SELECT s.id, s.user_id, s.org_id, s.surface, s.metric_kind::text AS metric_kind,
       s.window_start, s.window_end, (s.value_numeric * 10000)::int8 AS value_e4, s.currency,
       s.fetched_at, s.created_at
  FROM surface_metrics s
 WHERE s.fetched_at <= {_AS_OF}
   AND NOT EXISTS (
         SELECT 1 FROM metric_aggregates a
          WHERE a.user_id = s.user_id AND a.metric_kind = s.metric_kind
            AND a.window_start = s.window_start AND a.window_end = s.window_end
            AND a.stale_after > {_AS_OF})
"""

_STORED_SQL = f"""
SELECT a.user_id, a.org_id, a.metric_kind::text AS metric_kind, a.window_start, a.window_end,
       (a.value_numeric * 10000)::int8 AS value_e4, a.currency, a.surfaces_included
  FROM metric_aggregates a
 WHERE a.stale_after <= {_AS_OF}
"""

_STORED_PARTS_SQL = f"""
SELECT a.user_id, a.metric_kind::text AS metric_kind, a.window_start, a.window_end,
       e.key AS surface,
       CASE WHEN jsonb_typeof(e.value) = 'number'
            THEN ((e.value #>> '{{}}')::numeric * 10000)::int8 END AS value_e4
  FROM metric_aggregates a
 CROSS JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(a.surface_breakdown) = 'object'
                                    THEN a.surface_breakdown ELSE '{{}}'::jsonb END) AS e
 WHERE a.stale_after <= {_AS_OF}
"""


@dataclass(frozen=True)
class RollupInput:
    """What the rollup reads: candidate sources, due aggregates and their breakdown."""

    sources: pl.DataFrame
    stored: pl.DataFrame
    stored_parts: pl.DataFrame


def read_rollup_input(db: Db, *, as_of_iso: str) -> RollupInput:
    """Read the rollup's input in one snapshot (one REPEATABLE READ transaction, service_role)."""
    db.rollback()
    db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    try:
        db.execute('SET LOCAL ROLE "service_role"')
        db.set_local(as_of=as_of_iso)
        result = RollupInput(
            sources=db.fetch_df(_SOURCES_SQL),
            stored=db.fetch_df(_STORED_SQL),
            stored_parts=db.fetch_df(_STORED_PARTS_SQL),
        )
    finally:
        db.rollback()
    return result


def write_rollup(db: Db, plan: pl.DataFrame) -> dict[str, int]:
    """Apply a rollup plan inside the caller's transaction. Returns rows written and touched.

    ``write`` rows are upserted (the breakdown arrives as JSON text); the
    ``WHERE ... IS DISTINCT FROM`` keeps an unchanged row untouched. New rows are inserted in key
    order with time-ordered ids (UUIDv7 layout: milliseconds, then a counter) instead of the
    column's random default, so the primary-key index grows at its right edge: about a third
    less write time for a first rollup of ~760k aggregates. ``touch`` rows only get their
    new ``stale_after``. ``final`` maps to 'infinity', which Arrow cannot carry.
    """
    if plan.is_empty():
        return {"written": 0, "touched": 0}
    db.execute("SELECT set_config('work_mem', '256MB', true)")
    _fresh_temp(db, "derive_rollup_plan", plan)
    written = db.fetch_value(
        """
        WITH up AS (
          INSERT INTO metric_aggregates AS m (id, user_id, org_id, metric_kind, window_start,
                 window_end, value_numeric, currency, surfaces_included, surface_breakdown,
                 computed_at, stale_after)
          SELECT (lpad(to_hex((extract(epoch FROM statement_timestamp()) * 1000)::bigint), 12, '0')
                  || '70008' || lpad(to_hex(row_number() OVER w), 15, '0'))::uuid,
                 encode(r.user_id, 'hex')::uuid, encode(r.org_id, 'hex')::uuid,
                 r.metric_kind::surface_metric_kind, r.window_start, r.window_end,
                 (r.value_e4::numeric / 10000)::numeric(18, 4), r.currency,
                 r.surfaces_included, r.surface_breakdown::jsonb, r.computed_at,
                 CASE WHEN r.final THEN 'infinity'::timestamptz ELSE r.stale_after END
            FROM pg_temp.derive_rollup_plan r
           WHERE r.action = 'write'
          WINDOW w AS (ORDER BY r.user_id, r.metric_kind, r.window_start, r.window_end)
           ORDER BY r.user_id, r.metric_kind, r.window_start, r.window_end
          ON CONFLICT (user_id, metric_kind, window_start, window_end) DO UPDATE
             SET org_id = EXCLUDED.org_id, value_numeric = EXCLUDED.value_numeric,
                 currency = EXCLUDED.currency, surfaces_included = EXCLUDED.surfaces_included,
                 surface_breakdown = EXCLUDED.surface_breakdown,
                 computed_at = EXCLUDED.computed_at, stale_after = EXCLUDED.stale_after
           WHERE (m.org_id, m.value_numeric, m.currency, m.surfaces_included,
                  m.surface_breakdown, m.stale_after)
                 IS DISTINCT FROM
                 (EXCLUDED.org_id, EXCLUDED.value_numeric, EXCLUDED.currency,
                  EXCLUDED.surfaces_included, EXCLUDED.surface_breakdown, EXCLUDED.stale_after)
          RETURNING 1)
        SELECT count(*) FROM up
        """
    )
    touched = db.fetch_value(
        """
        WITH t AS (
          UPDATE metric_aggregates m
             SET stale_after = CASE WHEN r.final THEN 'infinity'::timestamptz ELSE r.stale_after END
            FROM pg_temp.derive_rollup_plan r
           WHERE r.action = 'touch'
             AND m.user_id = encode(r.user_id, 'hex')::uuid
             AND m.metric_kind = r.metric_kind::surface_metric_kind
             AND m.window_start = r.window_start AND m.window_end = r.window_end
             AND m.stale_after IS DISTINCT FROM
                 CASE WHEN r.final THEN 'infinity'::timestamptz ELSE r.stale_after END
          RETURNING 1)
        SELECT count(*) FROM t
        """
    )
    db.execute("DROP TABLE pg_temp.derive_rollup_plan")
    return {"written": int(written), "touched": int(touched)}
