"""A Supabase-shaped PostgreSQL for the database tests (``supabase_dsn``).

Supabase's roles differ from the ones derive's migrations create on a bare server: service_role is
NOLOGIN NOINHERIT BYPASSRLS, an ``authenticator`` login role may SET ROLE to each API role, and a
``supabase_admin`` owns ``public`` with default privileges that grant ALL on every new table,
sequence and function to anon, authenticated and service_role. Roles are cluster-wide, and the
shared test server's service_role must stay subject to RLS for the other tests, so this shape lives
on a cluster of its own: an embedded server in a temporary folder, started once per test process
and stopped at its end. Each test gets a fresh database cloned from a template that
``supabase_admin`` migrated with derive's own ``migrate`` (as ``derive db migrate`` would).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from derive.io.connect import connect
from derive.io.embedded import ensure_server, stop_server
from derive.io.migrate import migrate

_ROLES = [
    "CREATE ROLE anon NOLOGIN NOINHERIT",
    "CREATE ROLE authenticated NOLOGIN NOINHERIT",
    "CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS",
    "CREATE ROLE authenticator LOGIN NOINHERIT PASSWORD {password}",
    "GRANT anon, authenticated, service_role TO authenticator",
    "CREATE ROLE supabase_admin SUPERUSER LOGIN CREATEROLE CREATEDB REPLICATION BYPASSRLS"
    " PASSWORD {password}",
]
# Per database (default privileges and schemas live in a database): what Supabase's images set up.
_DATABASE = [
    "ALTER SCHEMA public OWNER TO supabase_admin",
    "GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role",
    *(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA public"
        f" GRANT ALL ON {kind} TO anon, authenticated, service_role"
        for kind in ("TABLES", "SEQUENCES", "FUNCTIONS")
    ),
    "CREATE SCHEMA auth AUTHORIZATION supabase_admin",
    "CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$"
    " SELECT coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),"
    " nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')::uuid $$",
    "GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role",
]


@dataclass(frozen=True)
class SupabaseServer:
    """The Supabase-shaped cluster: superuser DSN, and DSNs as supabase_admin per database."""

    superuser: str  # postgres, to the "postgres" database
    password: str  # of postgres, supabase_admin and authenticator

    def as_role(self, role: str, database: str) -> str:
        parts = urlsplit(self.superuser)
        netloc = f"{role}:{self.password}@{parts.hostname}:{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}"))

    def new_database(self, *, template: str | None = None) -> str:
        """A new database (Supabase-shaped, or cloned from ``template``); its name."""
        name = f"supa_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.superuser, autocommit=True) as conn:
            clause = f' TEMPLATE "{template}"' if template else ""
            conn.execute(f'CREATE DATABASE "{name}"{clause}')
        if template is None:
            with psycopg.connect(self.as_role("postgres", name), autocommit=True) as conn:
                for statement in _DATABASE:
                    conn.execute(statement)
        return name


@pytest.fixture(scope="session")
def supabase_server() -> Iterator[SupabaseServer]:
    """The Supabase-shaped cluster of this test process."""
    # Outside pytest's temp root, which pytest narrows to 0700 (the server runs as its own user).
    home = Path(tempfile.mkdtemp(prefix="derive-supabase-pg-"))
    try:
        superuser = ensure_server(home, "postgres")
        password = (home / "password").read_text().strip()
        with psycopg.connect(superuser, autocommit=True) as conn:
            for statement in _ROLES:
                conn.execute(statement.format(password=f"'{password}'"))
        yield SupabaseServer(superuser, password)
    finally:
        stop_server(home)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def supabase_template(supabase_server: SupabaseServer) -> str:
    """A Supabase-shaped database migrated by supabase_admin (the owner of public)."""
    name = supabase_server.new_database()
    with connect(supabase_server.as_role("supabase_admin", name)) as db:
        migrate(db)
    return name


@pytest.fixture
def supabase_dsn(supabase_server: SupabaseServer, supabase_template: str) -> str:
    """A fresh, migrated Supabase-shaped database, as supabase_admin."""
    name = supabase_server.new_database(template=supabase_template)
    return supabase_server.as_role("supabase_admin", name)


@pytest.fixture
def supabase_empty_dsn(supabase_server: SupabaseServer) -> str:
    """A Supabase-shaped database derive never migrated, as supabase_admin."""
    return supabase_server.as_role("supabase_admin", supabase_server.new_database())
