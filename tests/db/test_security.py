"""Security acceptance: roles, RLS, tenant policies and the audience_state write guard, on a real server.

Rows of audience_state can only be arranged the way the job writes them (a ``running`` run row of
this session, ``SET LOCAL ROLE service_role`` and ``derive.run_id``), which doubles as the proof
that the guard lets the job through while rejecting everything else.

Every test runs twice: on the shared test server (roles made by derive's migrations) and on a
Supabase-shaped cluster (tests/db/conftest.py: service_role with BYPASSRLS, default privileges
granting ALL on new objects to anon and authenticated), where only derive's own revokes and the
guard stand between the API roles and the derived tables.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql


@pytest.fixture(params=["postgres", "supabase"])
def dsn(request: pytest.FixtureRequest) -> str:
    """A fresh migrated database: on the shared server, or Supabase-shaped."""
    if request.param == "supabase":
        return str(request.getfixturevalue("supabase_dsn"))
    return str(request.getfixturevalue("plain_dsn"))


USER_A = "0b8f3c9e-3a3c-4d5e-8f00-00000000000a"
USER_B = "0b8f3c9e-3a3c-4d5e-8f00-00000000000b"
WRITES = {
    "insert": "INSERT INTO audience_state (user_id, current_state, state_updated_at)"
    " VALUES ('0b8f3c9e-3a3c-4d5e-8f00-0000000000cc', 'S5', now())",
    "update": "UPDATE audience_state SET current_state = 'S5'",
    "delete": "DELETE FROM audience_state",
    "truncate": "TRUNCATE audience_state",
}
# A column of each protected table for a harmless UPDATE (the privilege check comes first).
PROTECTED = {
    "audience_state": "last_event_type",
    "derivation_runs": "error",
    "metric_aggregates": "currency",
    "metric_aggregate_rows": "currency",
    "attribution_credits": "currency",
}


@contextmanager
def as_role(
    pg: psycopg.Connection, role: str | None, **settings: str
) -> Iterator[psycopg.Connection]:
    """A transaction under ``SET LOCAL ROLE role`` (None: the superuser) with local settings."""
    with pg.transaction():
        for name, value in settings.items():
            pg.execute("SELECT set_config(%s, %s, true)", (name.replace("__", "."), value))
        if role is not None:
            pg.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
        yield pg


def start_run(pg: psycopg.Connection, *, status: str = "running", job: str = "derive") -> str:
    """A run started the only way there is (``derive_start_run``); finished when asked.

    Returns the run id; its token is kept in ``TOKENS`` for the tests that need it.
    """
    with as_role(pg, "service_role") as conn:
        row = conn.execute(
            "SELECT run_id::text, token FROM derive_start_run(%s, %s, now(), NULL, NULL, '{}', 60)",
            (job, f"test_{uuid.uuid4().hex[:8]}"),
        ).fetchone()
    assert row is not None
    run_id, token = str(row[0]), str(row[1])
    TOKENS[run_id] = token
    if status != "running":
        finish_run(pg, run_id, status)
    return run_id


TOKENS: dict[str, str] = {}


def finish_run(pg: psycopg.Connection, run_id: str, status: str = "succeeded") -> None:
    with as_role(pg, "service_role") as conn:
        conn.execute(
            "SELECT derive_finish_run(%s, %s, %s, '{}', '{}', NULL, '{}')",
            (run_id, TOKENS[run_id], status),
        )


def write_state_as_job(pg: psycopg.Connection, user_id: str, state: str = "S2") -> None:
    """Write one audience_state row the way the job does."""
    run_id = start_run(pg)
    with as_role(
        pg, "service_role", derive__run_id=run_id, derive__run_token=TOKENS[run_id]
    ) as conn:
        conn.execute(
            "INSERT INTO audience_state (user_id, current_state, state_updated_at)"
            " VALUES (%s, %s, now())",
            (user_id, state),
        )
    finish_run(pg, run_id)


def stored_states(pg: psycopg.Connection) -> list[tuple[str, str]]:
    return [
        (str(u), str(s))
        for u, s in pg.execute(
            "SELECT user_id, current_state FROM audience_state ORDER BY user_id"
        ).fetchall()
    ]


@pytest.fixture
def state_row(pg: psycopg.Connection) -> list[tuple[str, str]]:
    write_state_as_job(pg, USER_A)
    return stored_states(pg)


def test_the_job_protocol_may_write_audience_state(pg: psycopg.Connection) -> None:
    write_state_as_job(pg, USER_A, "S3")

    assert stored_states(pg) == [(USER_A, "S3")]


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize("write", list(WRITES))
def test_client_roles_cannot_write_audience_state(
    pg: psycopg.Connection, state_row: list[tuple[str, str]], role: str, write: str
) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege), as_role(pg, role) as conn:
        conn.execute(WRITES[write])

    assert stored_states(pg) == state_row


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize("table", list(PROTECTED))
def test_client_roles_hold_no_write_privilege_on_derived_tables(
    pg: psycopg.Connection, role: str, table: str
) -> None:
    statements = [
        sql.SQL("INSERT INTO {} DEFAULT VALUES"),
        sql.SQL("UPDATE {} SET {col} = {col}"),
        sql.SQL("DELETE FROM {}"),
        # metric_aggregates is a view over metric_aggregate_rows: no TRUNCATE exists for it.
        *([] if table == "metric_aggregates" else [sql.SQL("TRUNCATE {}")]),
    ]
    for statement in statements:
        query = statement.format(sql.Identifier(table), col=sql.Identifier(PROTECTED[table]))
        with pytest.raises(psycopg.errors.InsufficientPrivilege), as_role(pg, role) as conn:
            conn.execute(query)


@pytest.mark.parametrize("write", ["insert", "update", "delete"])
def test_service_role_outside_a_job_transaction_is_rejected_by_the_guard(
    pg: psycopg.Connection, state_row: list[tuple[str, str]], write: str
) -> None:
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="audience_state is derived data"),
        as_role(pg, "service_role") as conn,
    ):
        conn.execute(WRITES[write])

    assert stored_states(pg) == state_row


@pytest.mark.parametrize("run", ["random", "succeeded", "failed", "not-a-uuid", ""])
def test_service_role_with_a_fake_or_finished_run_id_is_rejected(
    pg: psycopg.Connection, state_row: list[tuple[str, str]], run: str
) -> None:
    run_id = {
        "random": str(uuid.uuid4()),
        "succeeded": start_run(pg, status="succeeded"),
        "failed": start_run(pg, status="failed"),
    }.get(run, run)

    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="audience_state is derived data"),
        as_role(pg, "service_role", derive__run_id=run_id) as conn,
    ):
        conn.execute(WRITES["update"])

    assert stored_states(pg) == state_row


@pytest.mark.parametrize("token", ["", "0" * 64, "wrong"])
def test_a_running_run_without_its_token_does_not_open_the_guard(
    pg: psycopg.Connection, state_row: list[tuple[str, str]], token: str
) -> None:
    # The token replaces the old backend-pid check: a pooled connection has no stable pid, and
    # knowing a running run's id (anyone holding service_role can read it) is not enough.
    run_id = start_run(pg)

    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="audience_state is derived data"),
        as_role(pg, "service_role", derive__run_id=run_id, derive__run_token=token) as conn,
    ):
        conn.execute(WRITES["delete"])

    assert stored_states(pg) == state_row


def test_a_run_whose_lease_expired_does_not_open_the_guard(
    pg: psycopg.Connection, state_row: list[tuple[str, str]]
) -> None:
    run_id = start_run(pg)
    pg.execute(
        "UPDATE derivation_runs SET lease_expires_at = clock_timestamp() - interval '1 second'"
        " WHERE run_id = %s",
        (run_id,),
    )

    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="audience_state is derived data"),
        as_role(
            pg, "service_role", derive__run_id=run_id, derive__run_token=TOKENS[run_id]
        ) as conn,
    ):
        conn.execute(WRITES["update"])

    assert stored_states(pg) == state_row


@pytest.mark.parametrize("job", ["rollup", "backfill", "attribution"])
def test_a_running_run_of_a_job_that_does_not_own_audience_state_is_rejected(
    pg: psycopg.Connection, state_row: list[tuple[str, str]], job: str
) -> None:
    run_id = start_run(pg, job=job)

    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="audience_state is derived data"),
        as_role(
            pg, "service_role", derive__run_id=run_id, derive__run_token=TOKENS[run_id]
        ) as conn,
    ):
        conn.execute(WRITES["update"])

    assert stored_states(pg) == state_row


def test_a_running_run_id_under_another_role_is_rejected(
    pg: psycopg.Connection, state_row: list[tuple[str, str]]
) -> None:
    run_id = start_run(pg)

    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="audience_state is derived data"),
        as_role(pg, None, derive__run_id=run_id) as conn,  # the superuser that owns the table
    ):
        conn.execute(WRITES["update"])

    assert stored_states(pg) == state_row


@pytest.mark.parametrize("role", ["service_role", None])
def test_truncate_of_audience_state_is_rejected(
    pg: psycopg.Connection, state_row: list[tuple[str, str]], role: str | None
) -> None:
    run_id = start_run(pg)
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege),
        as_role(pg, role, derive__run_id=run_id) as conn,
    ):
        conn.execute(WRITES["truncate"])

    assert stored_states(pg) == state_row


# -- tenant isolation ---------------------------------------------------------------------------------


def seed_tenant_rows(pg: psycopg.Connection) -> None:
    """One row per user in every table with a tenant policy that is cheap to fill."""
    for user in (USER_A, USER_B):
        pg.execute("INSERT INTO users (id) VALUES (%s)", (user,))
        pg.execute(
            "INSERT INTO audience_events (user_id, event_type, event_category)"
            " VALUES (%s, 'content_view', 'engagement')",
            (user,),
        )
        pg.execute("INSERT INTO prospects (user_id) VALUES (%s)", (user,))
        pg.execute(
            "INSERT INTO surface_metrics (user_id, surface, metric_kind, window_start, window_end,"
            " value_numeric, source) VALUES (%s, 'patreon', 'profile_view', now() - interval '1 day',"
            " now(), 7, 'test')",
            (user,),
        )
        write_state_as_job(pg, user)


TENANT_TABLES = ["audience_events", "audience_state", "surface_metrics", "prospects"]


@pytest.mark.parametrize("table", TENANT_TABLES)
def test_tenant_policy_with_app_user_id_unset_returns_no_rows(
    pg: psycopg.Connection, table: str
) -> None:
    seed_tenant_rows(pg)

    with as_role(pg, "authenticated") as conn:
        unset = conn.execute("SELECT current_setting('app.user_id', true)").fetchone()
        rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        result = rows.fetchone()

    assert unset == (None,)
    assert result == (0,)


@pytest.mark.parametrize("table", TENANT_TABLES)
def test_tenant_policy_with_app_user_id_empty_returns_no_rows(
    pg: psycopg.Connection, table: str
) -> None:
    seed_tenant_rows(pg)

    with as_role(pg, "authenticated", app__user_id="", app__org_id="") as conn:
        result = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
        ).fetchone()

    assert result == (0,)


@pytest.mark.parametrize("table", TENANT_TABLES)
def test_tenant_policy_shows_only_the_users_own_rows(pg: psycopg.Connection, table: str) -> None:
    seed_tenant_rows(pg)

    with as_role(pg, "authenticated", app__user_id=USER_A) as conn:
        result = conn.execute(
            sql.SQL("SELECT DISTINCT user_id::text FROM {}").format(sql.Identifier(table))
        ).fetchall()

    assert result == [(USER_A,)]


def test_user_a_cannot_read_user_b_surface_metrics(pg: psycopg.Connection) -> None:
    seed_tenant_rows(pg)

    with as_role(pg, "authenticated", app__user_id=USER_A) as conn:
        result = conn.execute(
            "SELECT count(*) FROM surface_metrics WHERE user_id = %s", (USER_B,)
        ).fetchone()
        own = conn.execute(
            "SELECT count(*) FROM surface_metrics WHERE user_id = %s", (USER_A,)
        ).fetchone()

    assert result == (0,)
    assert own == (1,)


def test_a_setting_left_empty_by_an_earlier_transaction_still_returns_no_rows(
    pg: psycopg.Connection,
) -> None:
    # After a transaction-local set_config the session keeps '' (not NULL) for the setting.
    seed_tenant_rows(pg)
    with as_role(pg, "authenticated", app__user_id=USER_A):
        pass

    with as_role(pg, "authenticated") as conn:
        leftover = conn.execute("SELECT current_setting('app.user_id', true)").fetchone()
        result = conn.execute("SELECT count(*) FROM surface_metrics").fetchone()

    assert leftover == ("",)
    assert result == (0,)


# -- derive db check -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weaken",
    [
        "ALTER TABLE audience_state DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE surface_metrics NO FORCE ROW LEVEL SECURITY",
        "ALTER TABLE audience_state DISABLE TRIGGER audience_state_guard",
        "GRANT UPDATE ON audience_state TO authenticated",
    ],
)
def test_db_check_exits_1_on_a_weakened_database(
    dsn: str, pg: psycopg.Connection, weaken: str
) -> None:
    pg.execute(weaken)

    result = subprocess.run(
        [sys.executable, "-m", "derive.cli", "db", "check", "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 1
    assert "FAIL" in result.stdout


def test_db_check_exits_0_on_a_migrated_database(dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "derive.cli", "db", "check", "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stdout
