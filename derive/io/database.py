"""Which database a command talks to: ``--dsn``, ``DERIVE_DSN`` or the embedded server."""

from __future__ import annotations

from derive.config import derive_home, dsn_from_env
from derive.io.connect import Db, connect
from derive.io.embedded import ensure_server
from derive.io.migrate import migrate


def resolve_dsn(explicit: str | None) -> str:
    """The DSN to use; without one, start (and on first use migrate) the embedded server."""
    dsn = dsn_from_env(explicit)
    if dsn:
        return dsn
    dsn = ensure_server(derive_home())
    with connect(dsn) as db:
        migrate(db)
    return dsn


def open_db(explicit: str | None) -> Db:
    """Connect to the resolved database."""
    return connect(resolve_dsn(explicit))
