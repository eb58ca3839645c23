"""Shared fixtures.

Database tests run against a real PostgreSQL: ``DERIVE_TEST_DSN`` when set, otherwise the embedded
server (in a temporary DERIVE_HOME). Each test gets its own database, cloned from a template that
is migrated once per session, so tests are isolated and can run in any order or in parallel.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from derive.io import migrate as migrations


def with_database(dsn: str, database: str) -> str:
    """The same DSN pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def admin_dsn() -> str:
    """A superuser DSN of the server the tests use."""
    dsn = os.environ.get("DERIVE_TEST_DSN")
    if dsn:
        return dsn
    from derive.io.embedded import ensure_server

    # A fixed place outside pytest's temp root (pytest narrows that to mode 0700 on every run,
    # which locks out the server's own user when tests run as root). The server is reused.
    default = Path(tempfile.gettempdir()) / f"derive-test-pg-{os.getuid()}"
    home = Path(os.environ.get("DERIVE_TEST_HOME", default))
    return with_database(ensure_server(home), "postgres")


@pytest.fixture(scope="session")
def template_db(admin_dsn: str) -> str:
    """Name of a migrated template database (one per migration set, shared by workers)."""
    digest = hashlib.sha256(
        "".join(m.checksum for m in migrations.available()).encode()
    ).hexdigest()[:12]
    name = f"derive_tpl_{digest}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(4242)")
        try:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not exists:
                building = f"{name}_build_{uuid.uuid4().hex[:8]}"
                conn.execute(f'CREATE DATABASE "{building}"')
                from derive.io.connect import connect

                with connect(with_database(admin_dsn, building)) as db:
                    migrations.migrate(db)
                conn.execute(f'ALTER DATABASE "{building}" RENAME TO "{name}"')
        finally:
            conn.execute("SELECT pg_advisory_unlock(4242)")
    return name


@pytest.fixture(scope="session")
def _scratch_databases(admin_dsn: str) -> Iterator[list[str]]:
    """Databases made for single tests; dropped together at the end of the session.

    Dropping a database forces a checkpoint, which costs about a second each time; one batch at
    the end pays it once.
    """
    names: list[str] = []
    yield names
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _new_database(admin_dsn: str, names: list[str], prefix: str, template: str | None) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        clause = f' TEMPLATE "{template}"' if template else ""
        conn.execute(f'CREATE DATABASE "{name}"{clause}')
    names.append(name)
    return with_database(admin_dsn, name)


@pytest.fixture
def dsn(admin_dsn: str, template_db: str, _scratch_databases: list[str]) -> str:
    """DSN of a fresh, migrated database for this test alone."""
    return _new_database(admin_dsn, _scratch_databases, "derive_test", template_db)


@pytest.fixture
def second_dsn(admin_dsn: str, template_db: str, _scratch_databases: list[str]) -> str:
    """Another fresh, migrated database (a control for comparisons)."""
    return _new_database(admin_dsn, _scratch_databases, "derive_test", template_db)


@pytest.fixture
def empty_dsn(admin_dsn: str, _scratch_databases: list[str]) -> str:
    """DSN of a fresh database with no schema at all."""
    return _new_database(admin_dsn, _scratch_databases, "derive_empty", None)


@pytest.fixture
def pg(dsn: str) -> Iterator[psycopg.Connection]:
    """An autocommit psycopg connection (superuser) to the test database, for arranging and asserting."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn
