"""Builders for the pure-transform tests: tiny frames with sensible defaults, uuid helpers, one clock.

Every builder takes column values as keyword arguments: a list gives one value per row, a scalar is
repeated on every row. Columns left out get defaults, so a test names only what its rule reads.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl

from derive.config import Rules, load_rules
from derive.schema import EVENTS, RECENT_REJECTIONS, STORED_STATES
from derive.transforms.pipeline import Derivation, derive_states

RULES: Rules = load_rules()
AS_OF = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
DAY = timedelta(days=1)
US = timedelta(microseconds=1)

_USER_BASE = 0x1000
_EVENT_BASE = 0xE000_0000


def uid(n: int) -> bytes:
    """The 16-byte uuid of test user ``n`` (byte order follows ``n``)."""
    return uuid.UUID(int=_USER_BASE + n).bytes


def eid(n: int) -> bytes:
    """The 16-byte uuid of test event ``n`` (byte order follows ``n``)."""
    return uuid.UUID(int=_EVENT_BASE + n).bytes


def ago(
    days: float = 0, *, hours: float = 0, seconds: float = 0, microseconds: int = 0
) -> datetime:
    """A time before :data:`AS_OF`."""
    return AS_OF - timedelta(days=days, hours=hours, seconds=seconds, microseconds=microseconds)


def _rows(columns: dict[str, Any]) -> int:
    lengths = {len(v) for v in columns.values() if isinstance(v, list)}
    if len(lengths) > 1:
        raise ValueError(f"column lists of different lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else 1


def _spread(columns: dict[str, Any], n: int) -> dict[str, list[Any]]:
    return {k: v if isinstance(v, list) else [v] * n for k, v in columns.items()}


def make_events(**columns: Any) -> pl.DataFrame:
    """An ``EVENTS`` frame; defaults: one qualified ``content_view`` of user 1 an hour before AS_OF.

    ``event_category`` defaults to the catalog category of each ``event_type`` (unknown types
    get ``engagement``); ``id`` defaults to ``eid(0), eid(1), ...``.
    """
    n = _rows(columns)
    values = _spread(columns, n)
    types = values.setdefault("event_type", ["content_view"] * n)
    category_of = RULES.event_category
    values.setdefault("event_category", [category_of.get(t, "engagement") for t in types])
    values.setdefault("id", [eid(i) for i in range(n)])
    defaults: dict[str, Any] = {
        "created_at": ago(hours=1),
        "user_id": uid(1),
        "session_id": "s1",
        "metadata_is_object": True,
        "duration_seconds": "30",
        "scroll_depth_percent": None,
        "consent_recorded": None,
    }
    for name, value in defaults.items():
        values.setdefault(name, [value] * n)
    unknown = set(values) - set(EVENTS.names())
    if unknown:
        raise ValueError(f"not an EVENTS column: {sorted(unknown)}")
    return pl.DataFrame({name: values[name] for name in EVENTS.names()}, schema=EVENTS)


def make_stored(**columns: Any) -> pl.DataFrame:
    """A ``STORED_STATES`` frame whose audit pointer agrees with the state (no state jump).

    Defaults: user 1 in S1 since 10 days, score 0, last active an hour before AS_OF.
    """
    n = _rows(columns)
    values = _spread(columns, n)
    states = values.setdefault("current_state", ["S1"] * n)
    values.setdefault("audit_new_state", list(states))
    users = values.setdefault("user_id", [uid(1)] * n)
    values.setdefault("last_audit_id", [str(uuid.UUID(bytes=u)) for u in users])
    defaults: dict[str, Any] = {
        "state_updated_at": ago(10),
        "engagement_score": 0.0,
        "last_event_type": "content_view",
        "last_activity_at": ago(hours=1),
        "audit_user_matches": True,
    }
    for name, value in defaults.items():
        values.setdefault(name, [value] * n)
    unknown = set(values) - set(STORED_STATES.names())
    if unknown:
        raise ValueError(f"not a STORED_STATES column: {sorted(unknown)}")
    return pl.DataFrame(
        {name: values[name] for name in STORED_STATES.names()}, schema=STORED_STATES
    )


def no_events() -> pl.DataFrame:
    return pl.DataFrame(schema=EVENTS)


def no_stored() -> pl.DataFrame:
    return pl.DataFrame(schema=STORED_STATES)


def make_rejections(user_id: Sequence[bytes] = (), reasons_key: Sequence[str] = ()) -> pl.DataFrame:
    """A ``RECENT_REJECTIONS`` frame (already logged validation_fail rows)."""
    return pl.DataFrame(
        {"user_id": list(user_id), "reasons_key": list(reasons_key)}, schema=RECENT_REJECTIONS
    )


def derive(
    events: pl.DataFrame,
    stored: pl.DataFrame | None = None,
    recent: pl.DataFrame | None = None,
    *,
    as_of: datetime = AS_OF,
    rules: Rules = RULES,
) -> Derivation:
    """:func:`derive_states` with empty stored states and rejections by default."""
    return derive_states(
        events,
        no_stored() if stored is None else stored,
        make_rejections() if recent is None else recent,
        as_of=as_of,
        rules=rules,
    )


def user_row(result: pl.DataFrame, user: bytes) -> dict[str, Any]:
    """The single row of ``user`` in an output frame."""
    rows = result.filter(pl.col("user_id") == user).to_dicts()
    assert len(rows) == 1, f"expected one row for the user, got {len(rows)}"
    return rows[0]


def audit_path(result: Derivation, user: bytes) -> list[tuple[str | None, str, str]]:
    """The user's audit rows as ``(prior_state, new_state, rule_id)`` in step order."""
    rows = result.audit.filter(pl.col("user_id") == user).sort("step")
    return list(rows.select("prior_state", "new_state", "rule_id").iter_rows())
