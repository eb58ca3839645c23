"""Migrations are idempotent and ``derive db check`` reports the schema honestly."""

from __future__ import annotations

import psycopg

from derive.io.connect import connect
from derive.io.migrate import available, check, migrate, migration_indexes


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


def test_check_expects_every_index_the_migrations_leave() -> None:
    indexes = migration_indexes()

    assert indexes["audience_events_user_window_idx"] == "0052_user_window_index.sql"
    assert "audience_events_ingest_xid_idx" in indexes
    assert "idx_aggregates_stale" not in indexes  # created by 0002, dropped by 0012


def test_check_fails_on_a_dropped_or_invalid_index_naming_the_migration(
    dsn: str, pg: psycopg.Connection
) -> None:
    # Arrange: the covering window index dropped, the watermark's index left invalid (what a
    # failed CREATE INDEX CONCURRENTLY leaves).
    pg.execute("DROP INDEX audience_events_user_window_idx")
    pg.execute(
        "UPDATE pg_index SET indisvalid = false"
        " WHERE indexrelid = 'audience_events_ingest_xid_idx'::regclass"
    )

    # Act
    with connect(dsn) as db:
        failed = {c.name: c.detail for c in check(db) if not c.ok}

    # Assert
    assert set(failed) == {
        "index audience_events_user_window_idx",
        "index audience_events_ingest_xid_idx",
    }
    assert failed["index audience_events_user_window_idx"].startswith(
        "missing: create it as derive/io/migrations/0052_user_window_index.sql does"
    )
    assert failed["index audience_events_ingest_xid_idx"].startswith("invalid")
