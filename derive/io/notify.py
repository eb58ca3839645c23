"""LISTEN for the wake-ups of the insert trigger on audience_events (migrations 0005, 0007).

ADBC has no LISTEN support, so the listening side is a psycopg connection in autocommit mode.
Notifications are untrusted (any role may NOTIFY any channel, with any payload): they only wake
the watcher, and :meth:`Listener.wait` reports how many arrived and how many carried a payload the
trigger never sends, without reading them further.

Connection loss (a server restart, a dropped socket) surfaces as :class:`ListenerLost`, a
:class:`~derive.errors.SourceError`, so the watcher can reconnect.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass

import psycopg

from derive.errors import SourceError
from derive.io.connect import describe_dsn, driver_message

CHANNEL = "derive_audience_events"


class ListenerLost(SourceError):
    """The listening connection is gone (or could not be opened)."""


@dataclass(frozen=True)
class Wake:
    """Notifications received by one :meth:`Listener.wait`."""

    notifications: int = 0
    foreign: int = 0  # with a payload the trigger never sends (counted, ignored)


class Listener:
    """One autocommit psycopg connection that LISTENs on :data:`CHANNEL`."""

    def __init__(self, dsn: str, *, connect_timeout: int = 5) -> None:
        self.label = describe_dsn(dsn)
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        try:
            self._conn = psycopg.connect(
                dsn, autocommit=True, connect_timeout=connect_timeout, application_name="derive"
            )
            self._conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            raise ListenerLost(
                f"cannot listen on PostgreSQL at {self.label}: {driver_message(exc)}"
            ) from None

    def delivers(self, timeout: float = 2.0) -> bool:
        """Whether a notification sent later, from another connection, reaches this one.

        ``False`` behind a transaction-mode pooler (PgBouncer, Supavisor on port 6543): LISTEN
        stays on whichever server connection ran it, which the pooler hands to other clients
        between transactions, so later notifications go to the pool, not to us. The probe must
        come from a separate connection in a separate, later transaction: a NOTIFY sent on the
        listening connection itself would run on the very server connection that listens and
        come back even through such a pooler.
        """
        probe = f"derive-probe-{uuid.uuid4()}"
        try:
            with psycopg.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=self._connect_timeout,
                application_name="derive",
            ) as other:
                other.execute("SELECT pg_notify(%s, %s)", (CHANNEL, probe))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                for note in self._conn.notifies(timeout=left, stop_after=1):
                    if note.payload == probe:
                        return True
        except psycopg.Error as exc:
            raise ListenerLost(f"lost PostgreSQL at {self.label}: {driver_message(exc)}") from None
        return False

    def ping(self) -> None:
        """A round trip that proves the connection is alive."""
        try:
            self._conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise ListenerLost(f"lost PostgreSQL at {self.label}: {driver_message(exc)}") from None

    def wait(self, timeout: float) -> Wake:
        """Notifications within ``timeout`` seconds (returns early once one arrives).

        Everything already buffered is drained too, so a flood costs one wake, not one per message.
        """
        count = foreign = 0
        try:
            for note in self._conn.notifies(timeout=timeout, stop_after=1):
                count += 1
                foreign += note.payload != ""
            for note in self._conn.notifies(timeout=0.0):
                count += 1
                foreign += note.payload != ""
        except psycopg.Error as exc:
            raise ListenerLost(f"lost PostgreSQL at {self.label}: {driver_message(exc)}") from None
        return Wake(count, foreign)

    def close(self) -> None:
        """Close the connection (quietly when it is already broken)."""
        with contextlib.suppress(psycopg.Error):
            self._conn.close()
