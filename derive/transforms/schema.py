"""Column names and dtypes of each stage's frame, in one place.

uuid columns travel as 16-byte ``Binary`` (how Arrow carries PostgreSQL's uuid), which sorts in the
same byte order as PostgreSQL's uuid type.
"""

from __future__ import annotations

import polars as pl

from derive.config import STATES

UUID = pl.Binary()
TS = pl.Datetime("us", "UTC")
STATE = pl.Enum(list(STATES))

#: Rows of ``audience_events`` in the lookback window, as read (metadata keys extracted as text).
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
