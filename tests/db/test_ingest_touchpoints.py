"""``derive ingest touchpoints``: hashing, salts, idempotency and refusals against real PostgreSQL."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from derive.cli import app
from derive.errors import UsageError
from derive.io.connect import connect
from derive.jobs.ingest_touchpoints import ingest_touchpoints

SALT = bytes(range(32))


def add_user(pg: psycopg.Connection, *, salt: bytes | None = SALT) -> str:
    user_id = str(uuid.uuid4())
    pg.execute("INSERT INTO users (id, attribution_salt) VALUES (%s, %s)", (user_id, salt))
    return user_id


def add_prospect(pg: psycopg.Connection, user_id: str) -> str:
    prospect_id = str(uuid.uuid4())
    pg.execute("INSERT INTO prospects (id, user_id) VALUES (%s, %s)", (prospect_id, user_id))
    return prospect_id


def event(user_id: str, external_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "surface": "tryst",
        "touchpoint": "dm_inbound",
        "external_id": external_id,
        "occurred_at": "2026-11-02T10:15:00Z",
        **fields,
    }


def write_lines(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def ingest(dsn: str, path: Path) -> Any:
    with connect(dsn) as db:
        return ingest_touchpoints(db, str(path))


@pytest.mark.parametrize(
    ("surface", "identifier"),
    [("Tryst", "Bob@Example.COM"), ("onlyfans", "  ÉLODIE_ß "), ("x", "@Zoë")],
)
def test_identifier_hash_equals_postgres_sha256(
    dsn: str, pg: psycopg.Connection, tmp_path: Path, surface: str, identifier: str
) -> None:
    user = add_user(pg)
    path = write_lines(
        tmp_path / "t.jsonl", [event(user, "e1", surface=surface, identifier=identifier)]
    )

    ingest(dsn, path)

    stored, expected = pg.execute(
        "SELECT identifier_hash, sha256(convert_to(lower(%s || ':' || %s), 'UTF8') || %s)"
        " FROM prospect_touchpoints",
        (surface, identifier, SALT),
    ).fetchone() or (None, None)
    assert stored == expected
    assert len(bytes(stored)) == 32


def test_raw_identifier_is_never_stored(dsn: str, pg: psycopg.Connection, tmp_path: Path) -> None:
    user = add_user(pg)
    path = write_lines(tmp_path / "t.jsonl", [event(user, "e1", identifier="secret-handle-42")])

    ingest(dsn, path)

    row = pg.execute("SELECT row_to_json(t)::text FROM prospect_touchpoints t").fetchone()
    assert row is not None
    assert "secret-handle-42" not in row[0]


def test_missing_salt_is_created_only_for_users_with_identifiers(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    hashed = add_user(pg, salt=None)
    plain = add_user(pg, salt=None)
    path = write_lines(
        tmp_path / "t.jsonl", [event(hashed, "e1", identifier="bob"), event(plain, "e2")]
    )

    report = ingest(dsn, path)

    salts = dict(pg.execute("SELECT id::text, attribution_salt FROM users").fetchall())
    assert report.salts_created == 1
    assert len(bytes(salts[hashed])) == 32
    assert salts[plain] is None
    stored = pg.execute(
        "SELECT identifier_hash = sha256(convert_to(lower('tryst:bob'), 'UTF8') || u.attribution_salt)"
        " FROM prospect_touchpoints t JOIN users u ON u.id = t.user_id WHERE t.external_id = 'e1'"
    ).fetchone()
    assert stored == (True,)


def test_existing_salt_is_kept(dsn: str, pg: psycopg.Connection, tmp_path: Path) -> None:
    user = add_user(pg)
    path = write_lines(tmp_path / "t.jsonl", [event(user, "e1", identifier="bob")])

    ingest(dsn, path)

    assert pg.execute("SELECT attribution_salt FROM users").fetchone() == (SALT,)


def test_second_ingest_of_the_same_file_inserts_nothing(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    user = add_user(pg)
    path = write_lines(
        tmp_path / "t.jsonl", [event(user, f"e{i}", identifier=f"p{i}") for i in range(5)]
    )
    first = ingest(dsn, path)
    before = pg.execute("SELECT * FROM prospect_touchpoints ORDER BY external_id").fetchall()

    second = ingest(dsn, path)

    after = pg.execute("SELECT * FROM prospect_touchpoints ORDER BY external_id").fetchall()
    assert (first.inserted, second.inserted, second.already_stored) == (5, 0, 5)
    assert after == before


def test_duplicate_events_in_one_file_keep_the_first_line(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    user = add_user(pg)
    path = write_lines(
        tmp_path / "t.jsonl",
        [event(user, "e1", touchpoint="reply"), event(user, "e1", touchpoint="tip")],
    )

    report = ingest(dsn, path)

    assert (report.inserted, report.duplicates_in_file) == (1, 1)
    assert pg.execute("SELECT touchpoint::text FROM prospect_touchpoints").fetchall() == [
        ("reply",)
    ]


def test_same_external_id_on_two_surfaces_is_two_events(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    user = add_user(pg)
    path = write_lines(
        tmp_path / "t.jsonl", [event(user, "e1", surface="tryst"), event(user, "e1", surface="x")]
    )

    assert ingest(dsn, path).inserted == 2


def test_refused_lines_are_reported_and_valid_lines_still_stored(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    user = add_user(pg)
    other = add_user(pg)
    own_prospect = add_prospect(pg, user)
    foreign_prospect = add_prospect(pg, other)
    path = write_lines(
        tmp_path / "t.jsonl",
        [
            event(user, "ok-1", prospect_id=own_prospect),
            event(user, "e2", touchpoint="wink"),
            event(user, "e3", occurred_at="2026-11-02 25:00"),
            event(user, "e4", occurred_at="2026-11-02T10:15:00"),
            event(str(uuid.uuid4()), "e5"),
            event(user, "e6", prospect_id=str(uuid.uuid4())),
            event(user, "e7", prospect_id=foreign_prospect),
            "{not json",
            event(user, "ok-2"),
        ],
    )

    report = ingest(dsn, path)

    assert report.rejected.select("line_no", "reason").rows() == [
        (2, "unknown_kind"),
        (3, "bad_timestamp"),
        (4, "bad_timestamp"),
        (5, "unknown_user"),
        (6, "unknown_prospect"),
        (7, "unknown_prospect"),
        (8, "malformed_json"),
    ]
    stored = pg.execute("SELECT external_id FROM prospect_touchpoints ORDER BY 1").fetchall()
    assert stored == [("ok-1",), ("ok-2",)]


def test_payload_is_stored_verbatim_with_exact_amounts(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    user = add_user(pg)
    line = json.dumps(event(user, "e1", touchpoint="tip")).rstrip("}") + (
        ', "payload": {"amount": 12.345678901234567891, "currency": "EUR", "n": {"a": [1]}}}'
    )
    path = write_lines(tmp_path / "t.jsonl", [line])

    ingest(dsn, path)

    row = pg.execute(
        "SELECT (payload_jsonb->>'amount')::numeric, payload_jsonb->'n', occurred_at,"
        " ingestion_source FROM prospect_touchpoints"
    ).fetchone()
    assert row is not None
    assert row[0] == Decimal("12.345678901234567891")
    assert row[1] == {"a": [1]}
    assert row[3] == "adapter_poll"


def test_ingest_is_logged_as_a_run(dsn: str, pg: psycopg.Connection, tmp_path: Path) -> None:
    user = add_user(pg)
    path = write_lines(tmp_path / "t.jsonl", [event(user, "e1"), event(user, "e2", touchpoint="?")])

    report = ingest(dsn, path)

    row = pg.execute(
        "SELECT status, counts->>'inserted', counts->'rejected'->>'unknown_kind'"
        " FROM derivation_runs WHERE run_id = %s",
        (report.run_id,),
    ).fetchone()
    assert row == ("succeeded", "1", "1")


def test_cli_ingest_touchpoints_prints_counts_as_json(
    dsn: str, pg: psycopg.Connection, tmp_path: Path
) -> None:
    user = add_user(pg)
    path = write_lines(tmp_path / "t.jsonl", [event(user, "e1"), "", "[1, 2]"])

    result = CliRunner().invoke(
        app, ["ingest", "touchpoints", str(path), "--dsn", dsn, "--json", "--allow-partial"]
    )

    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["inserted"] == 1
    assert payload["rejected_lines"] == [
        {"line_no": 3, "reason": "not_an_object", "detail": "the line is [1,2], not a JSON object"}
    ]


def test_cli_ingest_touchpoints_missing_file_is_a_usage_error(dsn: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["ingest", "touchpoints", str(tmp_path / "nope.jsonl"), "--dsn", dsn]
    )

    assert isinstance(result.exception, UsageError)


def test_lines_split_on_newlines_only(dsn: str, pg: psycopg.Connection, tmp_path: Path) -> None:
    user = add_user(pg)
    path = tmp_path / "t.jsonl"
    rows = [event(user, "e1", payload={"note": "a\u2028b\x0cc"}), event(user, "e2")]
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows))

    report = ingest(dsn, path)

    assert (report.lines, report.inserted, report.rejected.height) == (2, 2, 0)
    note = pg.execute(
        "SELECT payload_jsonb->>'note' FROM prospect_touchpoints WHERE external_id = 'e1'"
    ).fetchone()
    assert note == ("a\u2028b\x0cc",)
