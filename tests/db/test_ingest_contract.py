"""The contract both ``derive ingest`` commands share: exit codes, ``-``, --strict / --allow-partial."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

USER = "aaaaaaaa-0000-4000-8000-000000000001"


def touchpoint(external_id: str, **fields: str) -> str:
    return json.dumps(
        {
            "user_id": USER,
            "surface": "tryst",
            "touchpoint": "dm_inbound",
            "external_id": external_id,
            "occurred_at": "2026-11-02T10:15:00Z",
            **fields,
        }
    )


def metric_object(*values: object) -> str:
    rows = [
        {
            "metric_kind": "profile_view",
            "window_start": f"2026-11-{day:02d}T00:00:00Z",
            "window_end": f"2026-11-{day + 1:02d}T00:00:00Z",
            "value_numeric": value,
        }
        for day, value in enumerate(values, start=1)
    ]
    return json.dumps(
        {"surface": "tryst", "rows": rows, "next_poll_after_ms": 0, "health_note": "ok"}
    )


#: command -> (text with one valid and one bad row, all-garbage text, extra args, table)
CASES = {
    "touchpoints": (
        touchpoint("ok") + "\n" + touchpoint("bad", occurred_at="yesterday") + "\n",
        touchpoint("bad", occurred_at="yesterday") + "\n{nope\n",
        [],
        "prospect_touchpoints",
    ),
    "metrics": (
        metric_object(5, "many") + "\n",
        metric_object("many", "lots") + "\n",
        ["--user", USER],
        "surface_metrics",
    ),
}


@pytest.fixture
def owner(pg: psycopg.Connection) -> None:
    pg.execute("INSERT INTO users (id) VALUES (%s)", (USER,))


def dsn_args(dsn: str) -> list[str]:
    return ["--dsn", dsn]


def invoke(command: str, dsn: str, *args: str, stdin: str = "") -> tuple[int, str]:
    """The console script in its own process, so exit codes come from derive's own error table."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "derive.cli",
            "ingest",
            command,
            *args,
            *CASES[command][2],
            *dsn_args(dsn),
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "COLUMNS": "200"},
    )
    return result.returncode, result.stdout + result.stderr


def stored(pg: psycopg.Connection, command: str) -> int:
    row = pg.execute(f"SELECT count(*) FROM {CASES[command][3]}").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("command", list(CASES))
def test_an_all_garbage_file_exits_1_even_with_allow_partial(
    dsn: str, pg: psycopg.Connection, owner: None, tmp_path: Path, command: str
) -> None:
    path = tmp_path / "garbage.jsonl"
    path.write_text(CASES[command][1])

    plain, _ = invoke(command, dsn, str(path))
    partial, _ = invoke(command, dsn, str(path), "--allow-partial")

    assert (plain, partial) == (1, 1)
    assert stored(pg, command) == 0


@pytest.mark.parametrize("command", list(CASES))
def test_a_missing_file_exits_2_for_both_commands(dsn: str, tmp_path: Path, command: str) -> None:
    code, output = invoke(command, dsn, str(tmp_path / f"nope-{uuid.uuid4()}.jsonl"))

    assert code == 2
    assert "cannot read" in output


@pytest.mark.parametrize("command", list(CASES))
def test_dash_reads_stdin_and_a_partial_file_exits_1_unless_allow_partial(
    dsn: str, pg: psycopg.Connection, owner: None, command: str
) -> None:
    text = CASES[command][0]

    plain, _ = invoke(command, dsn, "-", stdin=text)
    partial, _ = invoke(command, dsn, "-", "--allow-partial", stdin=text)

    assert (plain, partial) == (1, 0)
    assert stored(pg, command) >= 1


@pytest.mark.parametrize("command", list(CASES))
def test_strict_stores_nothing_when_a_row_is_rejected(
    dsn: str, pg: psycopg.Connection, owner: None, command: str
) -> None:
    code, output = invoke(command, dsn, "-", "--strict", stdin=CASES[command][0])

    assert code == 1
    assert "--strict" in output
    assert stored(pg, command) == 0


@pytest.mark.parametrize("command", list(CASES))
def test_strict_and_allow_partial_together_are_a_usage_error(dsn: str, command: str) -> None:
    code, output = invoke(command, dsn, "-", "--strict", "--allow-partial", stdin="")

    assert code == 2
    assert "--strict" in output


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("touchpoints", "line 2: occurred_at: 'yesterday' is not an ISO-8601 time"),
        ("metrics", 'object 1 row 2: value_numeric "many" is not a number'),
    ],
)
def test_rejections_name_the_field_and_the_value(
    dsn: str, owner: None, command: str, expected: str
) -> None:
    _, output = invoke(command, dsn, "-", stdin=CASES[command][0])

    assert expected in " ".join(output.split())


def test_an_amount_beyond_18_decimal_places_is_refused_with_its_value(
    dsn: str, pg: psycopg.Connection, owner: None
) -> None:
    line = (
        touchpoint("t1", touchpoint="tip")[:-1] + ', "payload": {"amount": 1.1234567890123456789}}'
    )
    exact = touchpoint("t2", touchpoint="tip")[:-1] + ', "payload": {"amount": 10.1234567891234}}'

    code, output = invoke("touchpoints", dsn, "-", "--allow-partial", stdin=f"{line}\n{exact}\n")

    assert code == 0
    assert "line 1: payload.amount: 1.1234567890123456789 has more than 18 decimal places" in (
        " ".join(output.split())
    )
    assert stored(pg, "touchpoints") == 1
