"""Migrations are idempotent and ``derive db check`` reports the schema honestly."""

from __future__ import annotations

import psycopg

from derive.io.connect import connect
from derive.io.migrate import available, check, migrate


def schema_snapshot(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            """
            SELECT 'col', table_name, column_name, data_type FROM information_schema.columns
             WHERE table_schema = 'public'
            UNION ALL SELECT 'policy', tablename, policyname, qual FROM pg_policies
            UNION ALL SELECT 'trigger', tgrelid::regclass::text, tgname, tgenabled::text
              FROM pg_trigger WHERE NOT tgisinternal
            UNION ALL SELECT 'index', tablename, indexname, indexdef FROM pg_indexes
             WHERE schemaname = 'public'
            ORDER BY 1, 2, 3
            """
        ).fetchall()


def test_migrate_applies_everything_once(empty_dsn: str) -> None:
    with connect(empty_dsn) as db:
        first = migrate(db)
    assert first == [m.version for m in available()]


def test_migrate_twice_is_a_no_op(empty_dsn: str) -> None:
    with connect(empty_dsn) as db:
        migrate(db)
    before = schema_snapshot(empty_dsn)
    with connect(empty_dsn) as db:
        second = migrate(db)
    assert second == []
    assert schema_snapshot(empty_dsn) == before


def test_check_passes_on_a_migrated_database(dsn: str) -> None:
    with connect(dsn) as db:
        results = check(db)
    assert [c.name for c in results if not c.ok] == []


def test_check_fails_when_rls_is_disabled(dsn: str, pg: psycopg.Connection) -> None:
    pg.execute("ALTER TABLE audience_state DISABLE ROW LEVEL SECURITY")
    with connect(dsn) as db:
        failed = [c.name for c in check(db) if not c.ok]
    assert failed == ["RLS enabled and forced on audience_state"]


def test_check_fails_on_an_empty_database(empty_dsn: str) -> None:
    with connect(empty_dsn) as db:
        failed = [c.name for c in check(db) if not c.ok]
    assert "migration 0001_core" in failed
    assert "table audience_state exists" in failed
