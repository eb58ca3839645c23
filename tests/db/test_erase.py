"""``derive erase``: the person's rows go in one transaction, a later run does not bring them back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from derive.errors import LockBusy
from derive.io.connect import connect
from derive.io.privacy import PROSPECT, USER
from derive.io.runlog import job_run
from derive.jobs.derivation import JOB as DERIVE_JOB
from derive.jobs.privacy import count_subject, erase_subject, export_subject
from tests.cli import derive
from tests.db.helpers import AS_OF, run
from tests.db.people import People, rows_mentioning, two_people


@pytest.fixture
def people(dsn: str, pg: psycopg.Connection) -> People:
    return two_people(dsn, pg)


def erase(dsn: str, subject: uuid.UUID, kind: str = "user", **options: Any) -> Any:
    with connect(dsn) as db:
        return erase_subject(db, kind=kind, subject=subject, as_of=AS_OF, **options)  # type: ignore[arg-type]


def rows_of(pg: psycopg.Connection, user: uuid.UUID) -> dict[str, list[Any]]:
    """Everything about one user, table by table, for before/after comparisons."""
    out = {}
    for selection in USER:
        if selection.table in {"derivation_runs", "ingestion_session_steps"}:
            continue
        column = "id" if selection.table == "users" else "user_id"
        out[selection.table] = pg.execute(
            f"SELECT row_to_json(t)::text FROM {selection.table} t WHERE {column} = %s ORDER BY 1",
            (user,),
        ).fetchall()
    return out


def erased_events(pg: psycopg.Connection) -> list[tuple[Any, ...]]:
    return pg.execute(
        "SELECT user_id, session_id, metadata FROM audience_events WHERE event_type = 'subject_erased'"
    ).fetchall()


def test_erase_leaves_no_row_naming_the_person_and_others_untouched(
    dsn: str, pg: psycopg.Connection, people: People
) -> None:
    before_b = rows_of(pg, people.b)
    expected = count_subject_counts(dsn, people.a)

    result = erase(dsn, people.a)

    assert rows_mentioning(pg, people.a) == {}
    assert rows_of(pg, people.b) == before_b
    assert result.tables == expected
    assert result.rows == sum(expected.values()) > 0
    (event,) = erased_events(pg)
    user_id, session_id, metadata = event
    assert (user_id, session_id) == (None, None)
    assert metadata["subject"] == "user"
    assert metadata["tables"] == {t: n for t, n in expected.items() if n}
    assert metadata["rows"] == result.rows
    assert metadata["run_id"] == result.run_id
    assert str(people.a) not in json.dumps(metadata)
    # The --user run that named both keeps its scope; only A's id is gone.
    users_lists = [
        r[0]
        for r in pg.execute(
            "SELECT args -> 'users' FROM derivation_runs WHERE jsonb_array_length(args -> 'users') = 2"
        ).fetchall()
    ]
    assert users_lists == [["erased", str(people.b)]]
    status, args, counts = pg.execute(
        "SELECT status, args::text, counts::text FROM derivation_runs WHERE run_id = %s",
        (result.run_id,),
    ).fetchone() or (None, None, None)
    assert status == "succeeded"
    assert str(people.a) not in f"{args}{counts}"


def count_subject_counts(dsn: str, subject: uuid.UUID, kind: str = "user") -> dict[str, int]:
    with connect(dsn) as db:
        return count_subject(db, kind=kind, subject=subject)  # type: ignore[arg-type]


def state_rows(pg: psycopg.Connection) -> list[tuple[Any, ...]]:
    return pg.execute(
        "SELECT user_id, current_state, engagement_score, last_event_type, last_activity_at,"
        " state_updated_at FROM audience_state ORDER BY user_id"
    ).fetchall()


def test_full_and_verify_runs_after_erase_find_nothing_of_the_person(
    dsn: str, pg: psycopg.Connection, people: People
) -> None:
    others = state_rows(pg)
    erase(dsn, people.a)
    later = (AS_OF + timedelta(minutes=30)).isoformat()

    full = derive("run", "--dsn", dsn, "--full", "--as-of", later, "--json")
    verify = derive("run", "--dsn", dsn, "--verify", "--as-of", later)

    assert full.returncode == 0, full.stderr
    assert json.loads(full.stdout)["counts"]["users_changed"] == 0
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert rows_mentioning(pg, people.a) == {}
    assert state_rows(pg) == [r for r in others if r[0] != people.a]
    assert len(erased_events(pg)) == 1


def test_a_later_run_does_not_recreate_the_person(
    dsn: str, pg: psycopg.Connection, people: People
) -> None:
    erase(dsn, people.a)
    states_before = pg.execute(
        "SELECT row_to_json(s)::text FROM audience_state s ORDER BY user_id"
    ).fetchall()

    report = run(dsn, as_of=AS_OF + timedelta(minutes=15))

    assert report.counts["users_changed"] == 0
    assert rows_mentioning(pg, people.a) == {}
    assert (
        pg.execute("SELECT row_to_json(s)::text FROM audience_state s ORDER BY user_id").fetchall()
        == states_before
    )
    assert len(erased_events(pg)) == 1


def test_dry_run_counts_what_export_finds_and_deletes_nothing(
    dsn: str, pg: psycopg.Connection, people: People, tmp_path: Path
) -> None:
    before = rows_of(pg, people.a)
    with connect(dsn) as db:
        exported = export_subject(db, kind="user", subject=people.a, out=tmp_path / "a")

    result = erase(dsn, people.a, dry_run=True)

    assert result.tables == exported.tables
    assert result.run_id is None
    assert rows_of(pg, people.a) == before
    assert erased_events(pg) == []


def test_erase_of_a_prospect_keeps_the_tenant(
    dsn: str, pg: psycopg.Connection, people: People
) -> None:
    before_b = rows_of(pg, people.b)

    result = erase(dsn, people.prospect_a, kind="prospect")

    assert result.tables["prospect_touchpoints"] == 3
    assert result.tables["prospects"] == 1
    assert rows_mentioning(pg, people.prospect_a) == {}
    assert rows_of(pg, people.b) == before_b
    left = pg.execute(
        "SELECT count(*) FROM prospect_touchpoints WHERE user_id = %s", (people.a,)
    ).fetchone()
    assert left == (1,)  # A's touchpoint of B's prospect
    assert [e[2]["subject"] for e in erased_events(pg)] == ["prospect"]


def test_nothing_stored_erases_nothing_and_logs_nothing(
    dsn: str, pg: psycopg.Connection, people: People
) -> None:
    runs = pg.execute("SELECT count(*) FROM derivation_runs").fetchone()

    result = erase(dsn, uuid.uuid4())

    assert result.rows == 0
    assert result.run_id is None
    assert pg.execute("SELECT count(*) FROM derivation_runs").fetchone() == runs
    assert erased_events(pg) == []


def test_erase_waits_for_no_derive_run(dsn: str, pg: psycopg.Connection, people: People) -> None:
    with (
        connect(dsn) as holder,
        job_run(holder, job=DERIVE_JOB, as_of=AS_OF),
        pytest.raises(LockBusy),
    ):
        erase(dsn, people.a)

    assert rows_of(pg, people.a)["audience_state"] != []


def test_every_table_with_a_person_column_is_covered(pg: psycopg.Connection) -> None:
    """A table added later with a user_id or prospect_id column must be taught to export/erase."""
    found = pg.execute(
        "SELECT c.table_name, c.column_name FROM information_schema.columns c"
        " JOIN information_schema.tables t USING (table_schema, table_name)"
        " WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'"
        "   AND c.column_name IN ('user_id', 'prospect_id')"
    ).fetchall()

    user_tables = {s.table for s in USER}
    prospect_tables = {s.table for s in PROSPECT}
    missing = [
        (table, column)
        for table, column in found
        if table not in (user_tables if column == "user_id" else prospect_tables)
    ]
    assert missing == []


def _blocked_backend(pg: psycopg.Connection, blocker: int) -> int | None:
    row = pg.execute(
        "SELECT pid FROM pg_stat_activity WHERE %s = ANY (pg_blocking_pids(pid))", (blocker,)
    ).fetchone()
    return None if row is None else int(row[0])


def test_kill_9_during_erase_leaves_everything_in_place(
    dsn: str, pg: psycopg.Connection, people: People
) -> None:
    before = rows_of(pg, people.a)
    with psycopg.connect(dsn) as blocker:
        # Hold A's users row: the erase deletes it last, so it blocks with every other delete done.
        blocker.execute("SELECT 1 FROM users WHERE id = %s FOR UPDATE", (people.a,))
        blocker_pid = blocker.info.backend_pid
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, uuid; from datetime import UTC, datetime;"
                " from derive.io.connect import connect;"
                " from derive.jobs.privacy import erase_subject;"
                " db = connect(sys.argv[1]);"
                " erase_subject(db, kind='user', subject=uuid.UUID(sys.argv[2]),"
                " as_of=datetime.now(UTC))",
                dsn,
                str(people.a),
            ],
            # A short lease: the killed run's lock is free again two seconds after the kill.
            env={**os.environ, "DERIVE_LEASE_SECONDS": "2"},
        )
        try:
            deadline = time.monotonic() + 120
            backend = None
            while backend is None and time.monotonic() < deadline and child.poll() is None:
                time.sleep(0.05)
                backend = _blocked_backend(pg, blocker_pid)
            assert backend is not None, "the erase never reached the users row"
            in_progress = pg.execute(
                "SELECT count(*) FROM derivation_runs WHERE job = 'erase' AND status = 'running'"
            ).fetchone()
            assert in_progress == (1,)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
        blocker.rollback()
    # The orphaned backend finds its client gone and rolls back.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        gone = pg.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend,)
        ).fetchone()
        if gone == (0,):
            break
        time.sleep(0.05)

    assert rows_of(pg, people.a) == before
    assert erased_events(pg) == []

    time.sleep(2.5)  # the killed run's lease runs out
    result = erase(dsn, people.a)  # all: a second attempt erases everything

    assert rows_mentioning(pg, people.a) == {}
    assert result.rows > 0
    killed = pg.execute(
        "SELECT status FROM derivation_runs WHERE job = 'erase' ORDER BY started_at"
    ).fetchall()
    assert killed == [("failed",), ("succeeded",)]
