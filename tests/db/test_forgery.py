"""The guard against a forging service_role (SPEC §1): reproductions of real attempts.

Each test plays the attacker against a real server: someone holding service_role who tries to
write audience_state without leaving a trace, by making up run rows, deleting them afterwards,
shadowing derive's tables with temp tables, or rewriting the run log.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.cli import derive
from tests.db.test_security import (
    TOKENS,
    USER_A,
    as_role,
    start_run,
    stored_states,
    write_state_as_job,
)

FORGED = "11111111-1111-1111-1111-111111111111"


@pytest.fixture
def s0_user(pg: psycopg.Connection) -> list[tuple[str, str]]:
    write_state_as_job(pg, USER_A, "S0")
    return stored_states(pg)


def test_service_role_cannot_insert_a_run_row_of_its_own(
    pg: psycopg.Connection, s0_user: list[tuple[str, str]]
) -> None:
    # The reproduction: insert a running row, name it in the marker, write, delete the row.
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="derivation_runs"),
        as_role(pg, "service_role") as conn,
    ):
        conn.execute(
            "INSERT INTO derivation_runs (run_id, job, as_of) VALUES (%s, 'derive', now())",
            (FORGED,),
        )

    assert stored_states(pg) == s0_user


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE derivation_runs SET status = 'running' WHERE run_id = %s",
        "UPDATE derivation_runs SET error = 'nothing to see' WHERE run_id = %s",
        "DELETE FROM derivation_runs WHERE run_id = %s",
    ],
)
@pytest.mark.parametrize("role", ["service_role", "authenticated", "anon"])
def test_no_client_role_can_rewrite_or_delete_a_run_row(
    pg: psycopg.Connection, statement: str, role: str
) -> None:
    run_id = start_run(pg, status="succeeded")

    with pytest.raises(psycopg.errors.InsufficientPrivilege), as_role(pg, role) as conn:
        conn.execute(statement, (run_id,))

    row = pg.execute(
        "SELECT status, error FROM derivation_runs WHERE run_id = %s", (run_id,)
    ).fetchone()
    assert row == ("succeeded", None)


def test_a_forged_write_through_the_start_function_leaves_a_permanent_flagged_run(
    pg: psycopg.Connection, s0_user: list[tuple[str, str]]
) -> None:
    # The attacker may start a run (service_role has to, derive runs as it), write, and try to
    # remove the evidence. The delete fails; committing without it leaves the run row and the
    # guard's record that this run wrote audience_state.
    run_id = start_run(pg)
    with as_role(
        pg, "service_role", derive__run_id=run_id, derive__run_token=TOKENS[run_id]
    ) as conn:
        conn.execute("UPDATE audience_state SET current_state = 'S5' WHERE user_id = %s", (USER_A,))
        # In a savepoint, so the attacker's transaction goes on and commits.
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
            conn.execute("DELETE FROM derivation_runs WHERE run_id = %s", (run_id,))

    runs = pg.execute("SELECT status FROM derivation_runs WHERE run_id = %s", (run_id,)).fetchall()
    writes = pg.execute(
        "SELECT table_name FROM derive_run_writes WHERE run_id = %s", (run_id,)
    ).fetchall()
    assert stored_states(pg) == [(USER_A, "S5")]
    assert runs == [("running",)]
    assert writes == [("audience_state",)]


def test_a_temp_table_named_like_the_run_log_does_not_open_the_guard(
    pg: psycopg.Connection, s0_user: list[tuple[str, str]]
) -> None:
    # The reproduction: a temp derivation_runs with a fake running row (and a token hash the
    # attacker knows) shadows the real table for unqualified names in an unpinned function.
    with as_role(pg, "service_role", derive__run_id=FORGED, derive__run_token="x") as conn:
        conn.execute(
            "CREATE TEMP TABLE derivation_runs (run_id uuid, job text, status text,"
            " backend_pid int, lease_expires_at timestamptz, token_sha256 bytea) ON COMMIT DROP"
        )
        conn.execute(
            "INSERT INTO derivation_runs VALUES (%s, 'derive', 'running', pg_backend_pid(),"
            " now() + interval '1 hour', sha256('x'::bytea))",
            (FORGED,),
        )
        with (
            pytest.raises(
                psycopg.errors.InsufficientPrivilege, match="audience_state is derived data"
            ),
            conn.transaction(),
        ):
            conn.execute(
                "UPDATE audience_state SET current_state = 'S5' WHERE user_id = %s", (USER_A,)
            )

    assert stored_states(pg) == s0_user


def test_finishing_needs_the_runs_own_token_and_only_moves_forward(pg: psycopg.Connection) -> None:
    run_id = start_run(pg)

    with (
        pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState),
        as_role(pg, "service_role") as c,
    ):
        c.execute(
            "SELECT derive_finish_run(%s, 'not-the-token', 'succeeded', '{}', '{}', NULL, '{}')",
            (run_id,),
        )
    with as_role(pg, "service_role") as conn:
        conn.execute(
            "SELECT derive_finish_run(%s, %s, 'failed', '{}', '{}', 'x', '{}')",
            (run_id, TOKENS[run_id]),
        )
    with (
        pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState),
        as_role(pg, "service_role") as c,
    ):
        c.execute(
            "SELECT derive_finish_run(%s, %s, 'succeeded', '{}', '{}', NULL, '{}')",
            (run_id, TOKENS[run_id]),
        )

    row = pg.execute("SELECT status FROM derivation_runs WHERE run_id = %s", (run_id,)).fetchone()
    assert row == ("failed",)


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize(
    "call",
    [
        "SELECT * FROM derive_start_run('derive', 'derive', now(), NULL, NULL, '{}', 60)",
        f"SELECT derive_heartbeat('{FORGED}', 'x', 60)",
        f"SELECT derive_finish_run('{FORGED}', 'x', 'succeeded', '{{}}', '{{}}', NULL, '{{}}')",
        f"SELECT derive_note_write('{FORGED}', 'audience_state')",
    ],
)
def test_client_roles_cannot_call_the_run_functions(
    pg: psycopg.Connection, role: str, call: str
) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege), as_role(pg, role) as conn:
        conn.execute(call)


def test_every_derive_function_pins_its_search_path_with_pg_temp_last(
    pg: psycopg.Connection,
) -> None:
    # Every function of the schema derive migrates (seed 001's entry points are named like the
    # seed, not derive_*), extensions' own functions aside.
    rows = pg.execute(
        "SELECT p.proname, coalesce(array_to_string(p.proconfig, ';'), '') FROM pg_proc p"
        " WHERE p.pronamespace = current_schema()::regnamespace AND NOT EXISTS"
        " (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')"
    ).fetchall()

    unpinned = [
        name
        for name, config in rows
        if not (config.startswith("search_path=pg_catalog, ") and config.endswith(", pg_temp"))
    ]
    assert "run_audience_derivation_batch" in {name for name, _ in rows}
    assert unpinned == []


def test_the_migration_table_forces_row_level_security(pg: psycopg.Connection) -> None:
    row = pg.execute(
        "SELECT relrowsecurity, relforcerowsecurity FROM pg_class"
        " WHERE oid = 'derive_migrations'::regclass"
    ).fetchone()

    assert row == (True, True)


def test_clients_cannot_choose_the_watermark_of_their_rows(pg: psycopg.Connection) -> None:
    # A row inserted with an old transaction id would hide from incremental runs.
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege),
        as_role(pg, "anon") as conn,
    ):
        conn.execute(
            "INSERT INTO audience_events (event_type, event_category, ingest_xid)"
            " VALUES ('content_view', 'engagement', '1'::xid8)"
        )
    with as_role(pg, "anon") as conn:
        conn.execute(
            "INSERT INTO audience_events (event_type, event_category)"
            " VALUES ('content_view', 'engagement')"
        )

    assert pg.execute("SELECT count(*) FROM audience_events").fetchone() == (1,)


def test_a_run_id_that_is_not_a_uuid_is_rejected_cleanly(
    pg: psycopg.Connection, s0_user: list[tuple[str, str]]
) -> None:
    bogus = "-" * 36  # passes a loose [0-9a-f-]{36} check, fails the uuid cast
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="audience_state is derived data"),
        as_role(pg, "service_role", derive__run_id=bogus, derive__run_token="") as conn,
    ):
        conn.execute("UPDATE audience_state SET current_state = 'S5'")

    assert stored_states(pg) == s0_user
    assert uuid.UUID(s0_user[0][0])


def test_status_flags_a_run_that_wrote_and_never_finished(
    dsn: str, pg: psycopg.Connection, s0_user: list[tuple[str, str]]
) -> None:
    run_id = start_run(pg)
    with as_role(
        pg, "service_role", derive__run_id=run_id, derive__run_token=TOKENS[run_id]
    ) as conn:
        conn.execute("UPDATE audience_state SET current_state = 'S5' WHERE user_id = %s", (USER_A,))
    pg.execute(
        "UPDATE derivation_runs SET lease_expires_at = now() - interval '1 s' WHERE run_id = %s",
        (run_id,),
    )

    result = derive("status", "--dsn", dsn, "--json", "--check")

    problems = json.loads(result.stdout)["problems"]
    assert result.returncode == 1
    assert any(run_id in p and "never finished" in p for p in problems), problems


def test_report_flags_a_run_that_wrote_and_never_finished(
    dsn: str, pg: psycopg.Connection, s0_user: list[tuple[str, str]], tmp_path: Path
) -> None:
    run_id = start_run(pg)
    with as_role(
        pg, "service_role", derive__run_id=run_id, derive__run_token=TOKENS[run_id]
    ) as conn:
        conn.execute("UPDATE audience_state SET current_state = 'S5' WHERE user_id = %s", (USER_A,))
    pg.execute(
        "UPDATE derivation_runs SET lease_expires_at = now() - interval '1 s' WHERE run_id = %s",
        (run_id,),
    )

    result = derive("report", "--dsn", dsn, "--out", str(tmp_path / "r.html"))

    assert result.returncode == 0, result.stderr
    page = (tmp_path / "r.html").read_text()
    assert "never finished" in page
    assert run_id in page


# -- what a run may claim about itself (migration 0008) -----------------------------------------------


@pytest.mark.parametrize(
    ("as_of", "lookback"),
    [
        ("infinity", "120 days"),
        ("-infinity", "120 days"),
        ("20000-01-01", "120 days"),
        ("1899-12-31", "120 days"),
        ("2026-06-01", "100000 years"),
        ("2026-06-01", "-1 day"),
        ("2026-06-01", "0"),
    ],
)
def test_a_run_cannot_start_with_an_as_of_or_lookback_no_reader_can_use(
    pg: psycopg.Connection, as_of: str, lookback: str
) -> None:
    with (
        pytest.raises(psycopg.errors.InvalidParameterValue, match="derive_start_run"),
        as_role(pg, "service_role") as conn,
    ):
        conn.execute(
            "SELECT * FROM derive_start_run('derive', 'derive', %s::timestamptz, %s::interval,"
            " NULL, '{}', 60)",
            (as_of, lookback),
        )

    assert pg.execute("SELECT count(*) FROM derivation_runs").fetchone() == (0,)


def finish_claiming(pg: psycopg.Connection, run_id: str, snapshot: str) -> None:
    with as_role(pg, "service_role") as conn:
        conn.execute(
            "SELECT derive_finish_run(%s, %s, 'succeeded', '{}', '{}', NULL, %s::jsonb)",
            (run_id, TOKENS[run_id], json.dumps({"mode": "full", "read_snapshot": snapshot})),
        )


def current_snapshot(pg: psycopg.Connection) -> tuple[int, int, list[int]]:
    text = str(pg.execute("SELECT pg_current_snapshot()::text").fetchone()[0])  # type: ignore[index]
    xmin, xmax, xip = text.split(":")
    return int(xmin), int(xmax), [int(x) for x in xip.split(",") if x]


def snapshot_text(xmin: int, xmax: int, xip: list[int]) -> str:
    return f"{xmin}:{xmax}:{','.join(str(x) for x in sorted(xip))}"


@pytest.fixture
def open_writer(dsn: str) -> Iterator[int]:
    """A transaction that wrote (so holds an xid) and stays open for the test: its xid."""
    with psycopg.connect(dsn) as other:
        xid = int(other.execute("SELECT pg_current_xact_id()::text").fetchone()[0])  # type: ignore[index]
        yield xid
        other.rollback()


def test_a_run_may_record_a_real_read_snapshot_with_a_transaction_open_in_it(
    pg: psycopg.Connection, open_writer: int
) -> None:
    run_id = start_run(pg)
    xmin, xmax, xip = current_snapshot(pg)
    assert open_writer in xip

    finish_claiming(pg, run_id, snapshot_text(xmin, xmax, xip))

    row = pg.execute(
        "SELECT status, read_snapshot::text FROM derivation_runs WHERE run_id = %s", (run_id,)
    ).fetchone()
    assert row == ("succeeded", snapshot_text(xmin, xmax, xip))


@pytest.mark.parametrize(
    "forge",
    [
        # rows of transactions that do not exist yet would count as seen by the next run
        lambda xmin, xmax, xip: (xmax + 1000, xmax + 1000, []),
        # a snapshot from before the run started
        lambda xmin, xmax, xip: (1, 1, []),
        # the open writer left out of the in-progress list: its rows would never be found
        lambda xmin, xmax, xip: (xmax, xmax, []),
    ],
    ids=["future", "before-the-start", "open-transaction-dropped"],
)
def test_a_run_cannot_record_a_read_snapshot_that_never_existed_while_it_ran(
    pg: psycopg.Connection,
    open_writer: int,
    forge: Callable[[int, int, list[int]], tuple[int, int, list[int]]],
) -> None:
    run_id = start_run(pg)
    claimed = snapshot_text(*forge(*current_snapshot(pg)))

    with pytest.raises(psycopg.errors.InvalidParameterValue, match="claims read snapshot"):
        finish_claiming(pg, run_id, claimed)

    row = pg.execute(
        "SELECT status, read_snapshot FROM derivation_runs WHERE run_id = %s", (run_id,)
    ).fetchone()
    assert row == ("running", None)
