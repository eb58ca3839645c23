"""Validation of surface-side touchpoint events (``derive ingest touchpoints``), JSON lines in.

Each input line is one JSON object::

    {"user_id": "...", "org_id": "...", "surface": "tryst", "touchpoint": "dm_inbound",
     "external_id": "msg-881", "occurred_at": "2026-11-02T10:15:00Z",
     "identifier": "@handle" | "prospect_id": "...", "payload": {...},
     "ingestion_source": "adapter_poll"}

``kind`` is accepted as an alias of ``touchpoint``. ``org_id``, ``identifier``, ``prospect_id``,
``payload`` and ``ingestion_source`` (default ``adapter_poll``) are optional. A timestamp must carry
its zone (``Z`` or an offset): a surface's local wall-clock time is ambiguous, so it is rejected
rather than guessed. Blank lines are skipped.

Every field is pulled out of the text with vectorized JSON-path matches, so one malformed line
never aborts the file: it gets a ``reason`` and the other lines go on.

The raw identifier and the raw line are kept here only for the insert: the database hashes the
identifier itself (the hash must use PostgreSQL's own ``lower()``, see ``derive.io.touchpoints``)
and takes the payload from the line as jsonb, so amounts keep their exact decimal value. Neither
is ever written to a permanent table.
"""

from __future__ import annotations

import polars as pl

from derive.schema import TS

#: ``touchpoint_kind`` enum values (migration 0002).
TOUCHPOINT_KINDS: tuple[str, ...] = (
    "profile_view",
    "dm_inbound",
    "dm_outbound",
    "reply",
    "reaction",
    "tip",
    "subscription_new",
    "subscription_renew",
    "subscription_cancel",
    "booking_inquiry",
    "booking_confirmed",
    "booking_completed",
    "block",
    "unblock",
)
INGESTION_SOURCES: tuple[str, ...] = ("adapter_poll", "webhook", "manual")
DEFAULT_INGESTION_SOURCE = "adapter_poll"

#: Rejection reasons, in the order they are checked (the first that applies is recorded).
REJECT_REASONS: tuple[str, ...] = (
    "malformed_json",
    "unsupported_escape",
    "not_an_object",
    "missing_user_id",
    "bad_user_id",
    "bad_org_id",
    "missing_surface",
    "missing_touchpoint",
    "unknown_kind",
    "missing_external_id",
    "missing_occurred_at",
    "bad_timestamp",
    "bad_prospect_id",
    "payload_not_object",
    "bad_amount",
    "unknown_ingestion_source",
)


#: Output: the parsed fields, ``reason`` null for a valid line.
PARSED = pl.Schema(
    {
        "line_no": pl.Int64(),
        "user_id": pl.String(),
        "org_id": pl.String(),
        "prospect_id": pl.String(),
        "surface": pl.String(),
        "touchpoint": pl.String(),
        "external_id": pl.String(),
        "occurred_at": TS,
        "identifier": pl.String(),
        "ingestion_source": pl.String(),
        "line": pl.String(),
        "reason": pl.String(),
        "detail": pl.String(),
    }
)

_UUID = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
# What PostgreSQL's numeric input accepts from a JSON number or numeric string.
_NUMBER = r"^\s*[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?\s*$"


def _field(name: str) -> pl.Expr:
    """A top-level key's value as text (a string unquoted, anything else as JSON), null if absent."""
    return pl.col("line").str.json_path_match(f"$.{name}")


def _blank_to_null(expr: pl.Expr) -> pl.Expr:
    """Null for an all-blank value; anything else verbatim (the hash covers the exact text)."""
    return pl.when(expr.str.strip_chars() == "").then(None).otherwise(expr)


def _quoted(name: str) -> pl.Expr:
    return pl.format("'{}'", pl.col(name).fill_null(""))


def parse_touchpoint_lines(lines: pl.LazyFrame, /) -> pl.LazyFrame:
    """Parse and validate touchpoint lines; every non-blank line comes out with a ``reason``.

    Args:
        lines: ``line_no`` and ``line`` (see :data:`LINES`).

    Returns:
        One row per non-blank line, shaped like :data:`PARSED`; ``reason`` is null for a valid line
        and otherwise the first failed check of :data:`REJECT_REASONS`.
    """
    root = pl.col("line").str.json_path_match("$")
    fields = (
        lines.filter(pl.col("line").str.strip_chars() != "")
        .with_columns(
            _root=root,
            user_id=_blank_to_null(_field("user_id")),
            org_id=_blank_to_null(_field("org_id")),
            prospect_id=_blank_to_null(_field("prospect_id")),
            surface=_blank_to_null(_field("surface")),
            touchpoint=_blank_to_null(pl.coalesce(_field("touchpoint"), _field("kind"))),
            external_id=_blank_to_null(_field("external_id")),
            _occurred_at=_blank_to_null(_field("occurred_at")),
            identifier=_blank_to_null(_field("identifier")),
            _payload=_field("payload"),
            _amount=_field("payload.amount"),
            ingestion_source=pl.coalesce(
                _blank_to_null(_field("ingestion_source")), pl.lit(DEFAULT_INGESTION_SOURCE)
            ),
        )
        .with_columns(
            occurred_at=pl.col("_occurred_at").str.to_datetime(
                format="%+", time_unit="us", time_zone="UTC", strict=False
            ),
            _payload_ok=pl.col("_payload").is_null() | pl.col("_payload").str.starts_with("{"),
        )
    )
    kinds = ", ".join(TOUCHPOINT_KINDS)
    # (reason, failed, detail naming the field and the value)
    checks: list[tuple[str, pl.Expr, pl.Expr]] = [
        ("malformed_json", pl.col("_root").is_null(), pl.lit("the line is not valid JSON")),
        # jsonb cannot hold U+0000; the line goes to PostgreSQL as jsonb (see derive.io).
        (
            "unsupported_escape",
            pl.col("line").str.contains(r"\u0000", literal=True),
            pl.lit("the line contains a NUL character (\\u0000), which PostgreSQL cannot store"),
        ),
        (
            "not_an_object",
            ~pl.col("_root").str.starts_with("{"),
            pl.format("the line is {}, not a JSON object", pl.col("_root")),
        ),
        ("missing_user_id", pl.col("user_id").is_null(), pl.lit("user_id: missing")),
        (
            "bad_user_id",
            ~pl.col("user_id").str.contains(_UUID),
            pl.format("user_id: {} is not a UUID", _quoted("user_id")),
        ),
        (
            "bad_org_id",
            pl.col("org_id").is_not_null() & ~pl.col("org_id").str.contains(_UUID),
            pl.format("org_id: {} is not a UUID", _quoted("org_id")),
        ),
        ("missing_surface", pl.col("surface").is_null(), pl.lit("surface: missing")),
        ("missing_touchpoint", pl.col("touchpoint").is_null(), pl.lit("touchpoint: missing")),
        (
            "unknown_kind",
            ~pl.col("touchpoint").is_in(TOUCHPOINT_KINDS),
            pl.format("touchpoint: {} is not one of " + kinds, _quoted("touchpoint")),
        ),
        ("missing_external_id", pl.col("external_id").is_null(), pl.lit("external_id: missing")),
        ("missing_occurred_at", pl.col("_occurred_at").is_null(), pl.lit("occurred_at: missing")),
        (
            "bad_timestamp",
            pl.col("occurred_at").is_null(),
            pl.format(
                "occurred_at: {} is not an ISO-8601 time with a zone (e.g. 2026-11-02T10:15:00Z)",
                _quoted("_occurred_at"),
            ),
        ),
        (
            "bad_prospect_id",
            pl.col("prospect_id").is_not_null() & ~pl.col("prospect_id").str.contains(_UUID),
            pl.format("prospect_id: {} is not a UUID", _quoted("prospect_id")),
        ),
        (
            "payload_not_object",
            ~pl.col("_payload_ok"),
            pl.format("payload: {} is not a JSON object", pl.col("_payload")),
        ),
        (
            "bad_amount",
            pl.col("_amount").is_not_null() & ~pl.col("_amount").str.contains(_NUMBER),
            pl.format("payload.amount: {} is not a number", _quoted("_amount")),
        ),
        (
            "unknown_ingestion_source",
            ~pl.col("ingestion_source").is_in(INGESTION_SOURCES),
            pl.format(
                "ingestion_source: {} is not one of " + ", ".join(INGESTION_SOURCES),
                _quoted("ingestion_source"),
            ),
        ),
    ]
    reason: pl.Expr = pl.lit(None, dtype=pl.String)
    detail: pl.Expr = pl.lit(None, dtype=pl.String)
    for name, failed, message in reversed(checks):
        hit = failed.fill_null(False)
        reason = pl.when(hit).then(pl.lit(name)).otherwise(reason)
        detail = pl.when(hit).then(message).otherwise(detail)
    return fields.with_columns(
        reason=reason,
        detail=detail,
        user_id=pl.col("user_id").str.to_lowercase(),
        org_id=pl.col("org_id").str.to_lowercase(),
        prospect_id=pl.col("prospect_id").str.to_lowercase(),
    ).select(PARSED.names())
