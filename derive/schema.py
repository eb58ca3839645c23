"""Column names and dtypes of each stage's frame, in one place (read by transforms and io alike).

uuid columns travel as 16-byte ``Binary`` (how Arrow carries PostgreSQL's uuid), which sorts in the
same byte order as PostgreSQL's uuid type.
"""

from __future__ import annotations

import polars as pl

from derive.config import STATES

UUID = pl.Binary()
TS = pl.Datetime("us", "UTC")
STATE = pl.Enum(list(STATES))

#: Rows of ``audience_events`` in the lookback window, as read: the numeric metadata keys as their
#: JSON text (null when the key is missing), ``consent_recorded`` only when a JSON boolean.
EVENTS = pl.Schema(
    {
        "id": UUID,
        "created_at": TS,
        "user_id": UUID,
        "session_id": pl.String(),
        "event_type": pl.String(),
        "event_category": pl.String(),
        "metadata_is_object": pl.Boolean(),
        "duration_seconds": pl.String(),
        "scroll_depth_percent": pl.String(),
        "consent_recorded": pl.Boolean(),
    }
)

#: Rows of ``audience_state`` with the audit pointer resolved (see ``derive.io.read``).
STORED_STATES = pl.Schema(
    {
        "user_id": UUID,
        "current_state": pl.String(),
        "state_updated_at": TS,
        "engagement_score": pl.Float64(),
        "last_event_type": pl.String(),
        "last_activity_at": TS,
        "last_audit_id": pl.String(),
        "audit_new_state": pl.String(),
        "audit_user_matches": pl.Boolean(),
    }
)

#: Recent ``validation_fail`` rows: who was rejected for which reasons (for the 24 h relog rule).
RECENT_REJECTIONS = pl.Schema({"user_id": UUID, "reasons_key": pl.String()})

#: Validation reasons, in the order they are checked (the first that applies is recorded).
INVALID_REASONS: tuple[str, ...] = (
    "unknown_category",
    "unknown_event_type",
    "wrong_category",
    "malformed_metadata",
)

#: Fail-safe reasons (SPEC §2.3).
REJECT_REASONS: tuple[str, ...] = (
    "unknown_event_category",
    "consent_missing",
    "volume_spike",
    "state_jump",
)


def empty(schema: pl.Schema) -> pl.DataFrame:
    """An empty frame of ``schema``."""
    return pl.DataFrame(schema=schema)


# -- attribution -----------------------------------------------------------------------------------

MODELS: tuple[str, ...] = ("first_touch", "last_touch", "linear", "time_decay", "position_based")
CONVERSION_KINDS: tuple[str, ...] = (
    "subscription_new",
    "tip",
    "booking_confirmed",
    "booking_completed",
)
NO_CREDIT_KINDS: tuple[str, ...] = ("block", "unblock", "subscription_cancel")

#: Conversion and credit values: exact decimals with up to 18 places and 20 integer digits (the
#: read flags larger or finer amounts as bad, the touchpoint ingest refuses them).
VALUE = pl.Decimal(38, 18)

#: Touchpoints as read for attribution (``amount`` as numeric text, null when absent).
TOUCHPOINTS = pl.Schema(
    {
        "id": pl.Binary(),
        "user_id": pl.Binary(),
        "org_id": pl.Binary(),
        "prospect_id": pl.Binary(),
        "surface": pl.String(),
        "touchpoint": pl.String(),
        "occurred_at": TS,
        "amount": pl.String(),
        "currency": pl.String(),
    }
)

#: One row per (conversion, model, credited touchpoint); ``touchpoint_id`` null = own surface.
CREDITS = pl.Schema(
    {
        "conversion_id": pl.Binary(),
        "touchpoint_id": pl.Binary(),
        "user_id": pl.Binary(),
        "org_id": pl.Binary(),
        "prospect_id": pl.Binary(),
        "surface": pl.String(),
        "model": pl.String(),
        "weight": pl.Float64(),
        "attributed_value": VALUE,
        "currency": pl.String(),
        "window_days": pl.Float64(),
        "half_life_days": pl.Float64(),  # time_decay only
    }
)

#: Credits as stored: :data:`CREDITS` plus the row's own ``id``.
STORED_CREDITS = pl.Schema({"id": pl.Binary(), **dict(CREDITS)})

#: What makes a stored credit differ from a computed one (the key is conversion, model, touch).
CREDIT_KEY = ("conversion_id", "model", "touchpoint_id")
CREDIT_VALUES = tuple(c for c in CREDITS.names() if c not in CREDIT_KEY)

#: Per-surface totals of a credits frame.
SURFACE_SUMMARY = pl.Schema(
    {
        "model": pl.String(),
        "surface": pl.String(),
        "currency": pl.String(),
        "conversions": pl.UInt32(),
        "credits": pl.UInt32(),
        "attributed_value": VALUE,
    }
)


# -- touchpoint ingestion ---------------------------------------------------------------------------

#: Input: one row per line of the file.
LINES = pl.Schema({"line_no": pl.Int64, "line": pl.String})
