"""Which database a command talks to: ``--dsn``, ``DERIVE_DSN`` or the embedded server."""

from __future__ import annotations

import shlex

from derive.config import derive_home, dsn_from_env
from derive.io.connect import Db, connect, redact
from derive.io.embedded import ensure_server
from derive.io.migrate import ensure_migrated, migrate


def resolve_dsn(explicit: str | None) -> str:
    """The DSN to use; without one, start (and on first use migrate) the embedded server."""
    dsn = dsn_from_env(explicit)
    if dsn:
        return dsn
    dsn = ensure_server(derive_home())
    with connect(dsn) as db:
        migrate(db)
    return dsn


def open_db(explicit: str | None, *, migrated: bool = True) -> Db:
    """Connect to the resolved database.

    Args:
        explicit: ``--dsn`` (or ``None``: ``DERIVE_DSN``, else the embedded server).
        migrated: refuse a database that lacks migrations, saying how to migrate it (instead of
            the first query failing on a missing relation).

    Raises:
        SchemaError: ``migrated`` and the database lacks migrations.
    """
    dsn = resolve_dsn(explicit)
    db = connect(dsn)
    if migrated:
        try:
            ensure_migrated(db, fix=f"derive db migrate --dsn {shlex.quote(redact(dsn))}")
        except BaseException:
            db.close()
            raise
    return db
