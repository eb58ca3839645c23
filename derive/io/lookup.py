"""Small lookups the commands make before a job starts (for messages, not for the jobs' data)."""

from __future__ import annotations

from derive.io.connect import Db


def unknown_users(db: Db, user_ids: list[str]) -> list[str]:
    """The given uuids that have neither a ``users`` row nor an event, in the given order."""
    if not user_ids:
        return []
    rows = db.fetch_all(
        "SELECT u::text FROM unnest(string_to_array($1, ',')::uuid[]) WITH ORDINALITY AS t(u, n)"
        " WHERE NOT EXISTS (SELECT 1 FROM users WHERE id = t.u)"
        " AND NOT EXISTS (SELECT 1 FROM audience_events WHERE user_id = t.u) ORDER BY n",
        (",".join(user_ids),),
    )
    db.rollback()
    return [str(row[0]) for row in rows]
