"""derive on a Supabase-shaped database (tests/db/conftest.py): migrate, db check, run, entry points.

The fixture's default privileges grant ALL on every new table, sequence and function in public to
anon, authenticated and service_role; service_role has BYPASSRLS. derive's migrations must take
back what those defaults gave, and ``derive db check`` must say what is left and why it is safe.
"""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest

from tests.db.helpers import engaged_user, insert_events, states

AS_OF = "2026-06-01T12:00:00+00:00"


def derive(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "derive.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "NO_COLOR": "1"},
        check=False,
    )


def check(dsn: str) -> tuple[int, dict[str, dict[str, object]]]:
    result = derive("db", "check", "--dsn", dsn, "--json")
    return result.returncode, {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def test_the_fixture_grants_new_tables_to_the_api_roles(supabase_empty_dsn: str) -> None:
    with psycopg.connect(supabase_empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE not_derive (id int)")
        granted = conn.execute(
            "SELECT has_table_privilege('anon', 'not_derive', 'INSERT'),"
            " has_table_privilege('authenticated', 'not_derive', 'TRUNCATE'),"
            " (SELECT rolbypassrls FROM pg_roles WHERE rolname = 'service_role')"
        ).fetchone()

    assert granted == (True, True, True)  # what derive's tables would get without its revokes


def test_migrate_leaves_the_api_roles_no_write_on_any_derived_table(
    supabase_empty_dsn: str,
) -> None:
    migrated = derive("db", "migrate", "--dsn", supabase_empty_dsn)
    with psycopg.connect(supabase_empty_dsn, autocommit=True) as conn:
        writable = conn.execute(
            "SELECT r.rolname, c.relname, p.priv FROM pg_class c"
            " CROSS JOIN (VALUES ('anon'), ('authenticated')) r(rolname)"
            " CROSS JOIN (VALUES ('INSERT'), ('UPDATE'), ('DELETE'), ('TRUNCATE')) p(priv)"
            " WHERE c.relnamespace = 'public'::regnamespace"
            "   AND c.relkind = 'r' AND has_table_privilege(r.rolname, c.oid, p.priv)"
        ).fetchall()
        callable_ = conn.execute(
            "SELECT r.rolname, p.proname FROM pg_proc p"
            " CROSS JOIN (VALUES ('anon'), ('authenticated')) r(rolname)"
            " WHERE p.pronamespace = 'public'::regnamespace AND p.prosecdef"
            "   AND has_function_privilege(r.rolname, p.oid, 'EXECUTE')"
        ).fetchall()
        sequences = conn.execute(
            "SELECT c.relname FROM pg_class c WHERE c.relkind = 'S'"
            " AND c.relnamespace = 'public'::regnamespace"
            " AND (has_sequence_privilege('anon', c.oid, 'USAGE')"
            "      OR has_sequence_privilege('authenticated', c.oid, 'UPDATE'))"
        ).fetchall()
        service_truncate = conn.execute(
            "SELECT c.relname FROM pg_class c WHERE c.relkind = 'r'"
            " AND c.relnamespace = 'public'::regnamespace"
            " AND has_table_privilege('service_role', c.oid, 'TRUNCATE')"
        ).fetchall()

    assert migrated.returncode == 0, migrated.stderr
    assert writable == []
    assert callable_ == []
    assert sequences == []
    assert service_truncate == []


def test_db_check_passes_and_explains_the_defaults_and_the_bypassrls_role(
    supabase_dsn: str,
) -> None:
    code, checks = check(supabase_dsn)

    assert code == 0, [c for c in checks.values() if not c["ok"]]
    bypass = checks["service_role bypasses RLS and can write derived tables"]
    assert bypass["warn"] is True
    assert "guard trigger still rejects" in str(bypass["detail"])
    assert "members that can SET ROLE to it: authenticator" in str(bypass["detail"])
    defaults = [name for name, c in checks.items() if name.startswith("default privileges of")]
    assert "default privileges of supabase_admin in public grant tables to anon, authenticated" in (
        defaults
    )


def test_db_check_fails_until_derive_takes_back_what_the_defaults_gave(supabase_dsn: str) -> None:
    with psycopg.connect(supabase_dsn, autocommit=True) as conn:  # as if derive never revoked
        conn.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO anon, authenticated")
        conn.execute("GRANT ALL ON ALL FUNCTIONS IN SCHEMA public TO anon, authenticated")
    broken, checks = check(supabase_dsn)
    migrated = derive("db", "migrate", "--dsn", supabase_dsn)
    repaired, _ = check(supabase_dsn)

    failed = {name for name, c in checks.items() if not c["ok"]}
    assert broken == 1
    assert {
        "anon cannot write audience_state",
        "authenticated cannot write derivation_runs",
        "anon cannot write derive_migrations",
        "anon cannot execute derive's definer functions",
    } <= failed
    assert migrated.returncode == 0, migrated.stderr
    assert repaired == 0, [n for n, c in check(supabase_dsn)[1].items() if not c["ok"]]


@pytest.mark.parametrize(
    ("weaken", "failing"),
    [
        (
            "ALTER TABLE audience_state DISABLE TRIGGER audience_state_guard",
            "service_role bypasses RLS and can write derived tables",
        ),
        ("ALTER TABLE metric_aggregate_rows NO FORCE ROW LEVEL SECURITY", None),
        ("GRANT EXECUTE ON FUNCTION derive_start_run TO authenticated", None),
    ],
)
def test_db_check_reports_a_weakened_supabase_database(
    supabase_dsn: str, weaken: str, failing: str | None
) -> None:
    with psycopg.connect(supabase_dsn, autocommit=True) as conn:
        conn.execute(weaken)

    code, checks = check(supabase_dsn)

    assert code == 1
    if failing is not None:
        assert checks[failing]["ok"] is False


def test_runs_on_supabase_equal_runs_on_the_shared_server(
    supabase_dsn: str, plain_dsn: str
) -> None:
    for target in (supabase_dsn, plain_dsn):
        with psycopg.connect(target, autocommit=True) as conn:
            insert_events(conn, [e for n in range(1, 30) for e in engaged_user(n)])
        result = derive("run", "--dsn", target, "--as-of", AS_OF)
        assert result.returncode == 0, result.stderr

    with psycopg.connect(supabase_dsn) as a, psycopg.connect(plain_dsn) as b:
        assert states(a) == states(b)
        assert len(states(a)) == 29


@pytest.mark.parametrize("role", ["anon", "authenticated"])
def test_the_api_roles_may_not_call_the_entry_points_on_supabase(
    supabase_dsn: str, role: str
) -> None:
    with psycopg.connect(supabase_dsn, autocommit=True) as conn:
        conn.execute(f"SET ROLE {role}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT run_audience_derivation_batch(250)")
