"""Bulk appends of raw rows: events into ``audience_events``, ids into ``users``.

Rows travel by ADBC bulk ingest (binary COPY) into a temporary table on the job's own connection,
then one ``INSERT ... SELECT`` casts them to the exact column types (text -> uuid, text -> jsonb).
Large frames go in chunks so the temporary table stays small; all chunks share one transaction,
so a failure leaves nothing behind.
"""

from __future__ import annotations

import polars as pl

from derive.io.connect import Db

CHUNK_ROWS = 1_000_000

_EVENT_COLUMNS = (
    "created_at",
    "user_id",
    "session_id",
    "event_type",
    "event_category",
    "event_source",
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_content",
    "utm_term",
    "metadata",
)
_STAGE_EVENTS = "derive_stage_events"
_INSERT_EVENTS = (
    "INSERT INTO audience_events (created_at, user_id, session_id, event_type, event_category,"
    " event_source, utm_source, utm_medium, utm_campaign, utm_content, utm_term, metadata)"
    " SELECT created_at, user_id::uuid, session_id, event_type, event_category, event_source,"
    " utm_source, utm_medium, utm_campaign, utm_content, utm_term, metadata::jsonb"
    f" FROM {_STAGE_EVENTS}"
)
_STAGE_USERS = "derive_stage_users"
_INSERT_USERS = (
    "INSERT INTO users (id, attribution_salt)"
    f" SELECT id::uuid, attribution_salt FROM {_STAGE_USERS}"
    " ON CONFLICT (id) DO NOTHING"
)


def _event_frame(events: pl.DataFrame) -> pl.DataFrame:
    """The events' columns in table order and ingest types (text stays text until the INSERT)."""
    missing = [c for c in _EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events frame lacks columns {missing}")
    return events.select(
        pl.col("created_at").cast(pl.Datetime("us", "UTC")),
        *[pl.col(c).cast(pl.String) for c in _EVENT_COLUMNS[1:]],
    )


def append_events(db: Db, events: pl.DataFrame, *, chunk_rows: int = CHUNK_ROWS) -> int:
    """Insert ``events`` into ``audience_events`` as ``service_role``; ids come from the default.

    Args:
        events: ``created_at`` (timestamp with zone), ``user_id`` (uuid text or null),
            ``metadata`` (JSON text) and the other text columns of the table.
        chunk_rows: rows per COPY round trip.

    Returns:
        The number of rows inserted.

    Raises:
        SourceError: the database rejected a row (bad uuid or JSON) or the connection failed;
            nothing was inserted.
    """
    frame = _event_frame(events)
    inserted = 0
    with db.transaction(role="service_role"):
        for chunk in frame.iter_slices(n_rows=chunk_rows):
            db.ingest(_STAGE_EVENTS, chunk)
            db.execute(_INSERT_EVENTS)
            db.execute(f"DROP TABLE {_STAGE_EVENTS}")
            inserted += chunk.height
    return inserted


def append_users(db: Db, users: pl.DataFrame) -> int:
    """Insert users that are not there yet (``id`` uuid text, ``attribution_salt`` 32 bytes or null).

    Returns:
        The number of ids sent (existing ids are left as they are).
    """
    frame = users.select(pl.col("id").cast(pl.String), pl.col("attribution_salt").cast(pl.Binary))
    with db.transaction(role="service_role"):
        db.ingest(_STAGE_USERS, frame)
        db.execute(_INSERT_USERS)
        db.execute(f"DROP TABLE {_STAGE_USERS}")
    return frame.height
