"""LISTEN for the user ids announced by the insert trigger on audience_events (migration 0005).

ADBC has no LISTEN support, so the listening side is a psycopg connection in autocommit mode. The
trigger sends the distinct user ids of each INSERT statement, comma-separated, in chunks that
fit the 8000-byte payload limit; :meth:`Listener.wait` returns them as a set.

Connection loss (a server restart, a dropped socket) surfaces as :class:`ListenerLost`, a
:class:`~derive.errors.SourceError`, so the watcher can reconnect and catch up.
"""

from __future__ import annotations

import contextlib
from datetime import datetime

import psycopg

from derive.errors import SourceError
from derive.io.connect import Db, describe_dsn, driver_message

CHANNEL = "derive_audience_events"

_USERS_SINCE = """
SELECT DISTINCT e.user_id::text
  FROM audience_events e
 WHERE e.created_at >= $1
   AND e.user_id IS NOT NULL
   AND e.event_category <> 'system'
"""


class ListenerLost(SourceError):
    """The listening connection is gone (or could not be opened)."""


class Listener:
    """One autocommit psycopg connection that LISTENs on :data:`CHANNEL`."""

    def __init__(self, dsn: str, *, connect_timeout: int = 5) -> None:
        self.label = describe_dsn(dsn)
        try:
            self._conn = psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout)
            self._conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            raise ListenerLost(
                f"cannot listen on PostgreSQL at {self.label}: {driver_message(exc)}"
            ) from None

    def server_now(self) -> datetime:
        """The server's clock; a round trip that also proves the connection is alive."""
        try:
            row = self._conn.execute("SELECT clock_timestamp()").fetchone()
        except psycopg.Error as exc:
            raise ListenerLost(f"lost PostgreSQL at {self.label}: {driver_message(exc)}") from None
        assert row is not None
        value: datetime = row[0]
        return value

    def wait(self, timeout: float) -> set[str]:
        """User ids notified within ``timeout`` seconds (returns early once one arrives).

        Notifications already buffered are drained too, so a burst arrives as one set.
        """
        users: set[str] = set()
        try:
            for note in self._conn.notifies(timeout=timeout, stop_after=1):
                users.update(u for u in note.payload.split(",") if u)
            for note in self._conn.notifies(timeout=0.0):
                users.update(u for u in note.payload.split(",") if u)
        except psycopg.Error as exc:
            raise ListenerLost(f"lost PostgreSQL at {self.label}: {driver_message(exc)}") from None
        return users

    def close(self) -> None:
        """Close the connection (quietly when it is already broken)."""
        with contextlib.suppress(psycopg.Error):
            self._conn.close()


def users_with_events_since(db: Db, since: datetime) -> set[str]:
    """Users (non-system events) whose events were stamped at or after ``since``: the catch-up set."""
    with db.transaction(role="service_role"):
        rows = db.fetch_all(_USERS_SINCE, (since,))
    return {str(u) for (u,) in rows}
