"""Shared fixtures.

Database tests run against a real PostgreSQL: ``DERIVE_TEST_DSN`` when set, otherwise an embedded
server in ``DERIVE_TEST_HOME``, else in ``$DERIVE_HOME/test-server``, else in a temporary folder.
A server the session started is stopped when the session ends (a temporary folder is removed).
Each test gets its own database, cloned from a template that is migrated once per session, so
tests are isolated and can run in any order or in parallel.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from derive.io import migrate as migrations

# The embedded server of this session: its home, whether that is a temporary folder, whether the
# server ran before the session started.
_SERVER = pytest.StashKey[tuple[Path, bool, bool]]()


def _embedded_home() -> tuple[Path, bool]:
    """Where the embedded test server lives, and whether that folder is a temporary one."""
    if os.environ.get("DERIVE_TEST_HOME"):
        return Path(os.environ["DERIVE_TEST_HOME"]), False
    if os.environ.get("DERIVE_HOME"):
        return Path(os.environ["DERIVE_HOME"]).expanduser() / "test-server", False
    # Outside pytest's temp root: pytest narrows that to mode 0700 on every run, which locks out
    # the server's own user when tests run as root.
    return Path(tempfile.mkdtemp(prefix="derive-test-pg-")), True


def pytest_configure(config: pytest.Config) -> None:
    """In the controlling process: pick the embedded server's home for every worker."""
    if hasattr(config, "workerinput") or os.environ.get("DERIVE_TEST_DSN"):
        return
    from derive.io.embedded import running_port

    home, temporary = _embedded_home()
    os.environ["DERIVE_TEST_HOME"] = str(home)  # inherited by the workers, started later
    config.stash[_SERVER] = (home, temporary, running_port(home) is not None)


def pytest_unconfigure(config: pytest.Config) -> None:
    """In the controlling process: stop the server this session started (after every worker)."""
    if _SERVER not in config.stash:
        return
    from derive.io.embedded import stop_server

    home, temporary, was_running = config.stash[_SERVER]
    if not was_running:
        stop_server(home)
    if temporary:
        shutil.rmtree(home, ignore_errors=True)


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

    home = Path(os.environ["DERIVE_TEST_HOME"])  # set by pytest_configure
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
def plain_dsn(admin_dsn: str, template_db: str, _scratch_databases: list[str]) -> str:
    """Same as ``dsn``, under a name that modules overriding ``dsn`` with variants can ask for."""
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
