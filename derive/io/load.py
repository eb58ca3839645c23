"""Bulk appends of raw rows: events into ``audience_events``, ids into ``users``.

Rows travel by ADBC bulk ingest (binary COPY) into a temporary table on the job's own connection,
then one ``INSERT ... SELECT`` casts them to the exact column types (text -> uuid, text -> jsonb).
Large frames go in chunks so the temporary table stays small; all chunks share one transaction,
so a failure leaves nothing behind.

Events are written in time order with time-ordered ids (UUID version 7, as new events arrive), so
the primary key and the ``created_at`` index grow at their right edge. Into an empty table the
secondary indexes are dropped and rebuilt after the load, inside the same transaction: one sort
per index instead of millions of random page writes (measured: 100k users, 2.3M events, from ~57 s
to the figure in benchmarks/README.md on an otherwise idle machine).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

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
    "INSERT INTO audience_events (id, created_at, user_id, session_id, event_type, event_category,"
    " event_source, utm_source, utm_medium, utm_campaign, utm_content, utm_term, metadata)"
    " SELECT encode(id, 'hex')::uuid, created_at, user_id::uuid, session_id, event_type,"
    " event_category, event_source, utm_source, utm_medium, utm_campaign, utm_content, utm_term,"
    f" metadata::jsonb FROM {_STAGE_EVENTS}"
)
_SECONDARY_INDEXES = (
    "SELECT i.indexname, i.indexdef FROM pg_indexes i"
    " JOIN pg_index x ON x.indexrelid = format('%I.%I', i.schemaname, i.indexname)::regclass"
    " WHERE i.tablename = 'audience_events' AND i.schemaname = current_schema()"
    " AND NOT x.indisprimary"
)
_STAGE_USERS = "derive_stage_users"
_INSERT_USERS = (
    "INSERT INTO users (id, attribution_salt)"
    f" SELECT id::uuid, attribution_salt FROM {_STAGE_USERS}"
    " ON CONFLICT (id) DO NOTHING"
)


def time_ordered_ids(created_at: pl.Series, *, seed: int = 0) -> pl.Series:
    """UUID version 7 ids (48-bit millisecond time, then random bits) as 16-byte binary."""
    millis = created_at.dt.epoch("ms").to_numpy().astype(np.uint64)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(len(millis), 16), dtype=np.uint8)
    for byte in range(6):
        raw[:, byte] = (millis >> np.uint64(8 * (5 - byte))) & np.uint64(0xFF)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x70
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    array = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(16), len(millis), [None, pa.py_buffer(raw.tobytes())]
    )
    return pl.Series("id", array.cast(pa.large_binary()))


def _event_frame(events: pl.DataFrame) -> pl.DataFrame:
    """The events in time order, with ids, in table order and ingest types."""
    missing = [c for c in _EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events frame lacks columns {missing}")
    ordered = events.select(
        pl.col("created_at").cast(pl.Datetime("us", "UTC")),
        *[pl.col(c).cast(pl.String) for c in _EVENT_COLUMNS[1:]],
    ).sort("created_at")
    return ordered.select(time_ordered_ids(ordered["created_at"]), pl.all())


def append_events(db: Db, events: pl.DataFrame, *, chunk_rows: int = CHUNK_ROWS) -> int:
    """Insert ``events`` into ``audience_events`` as ``service_role``, in time order.

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
    with db.transaction():
        empty = not db.fetch_value("SELECT EXISTS (SELECT 1 FROM audience_events)")
        rebuild = db.fetch_all(_SECONDARY_INDEXES) if empty and frame.height else []
        for name, _ in rebuild:
            db.execute(f'DROP INDEX "{name}"')  # names read from the catalog just above
        db.execute('SET LOCAL ROLE "service_role"')
        for chunk in frame.iter_slices(n_rows=chunk_rows):
            db.ingest(_STAGE_EVENTS, chunk)
            db.execute(_INSERT_EVENTS)
            db.execute(f"DROP TABLE {_STAGE_EVENTS}")
            inserted += chunk.height
        db.execute("RESET ROLE")
        for _, definition in rebuild:
            db.execute(definition)
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
