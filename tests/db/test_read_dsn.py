"""``--read-dsn`` and ``--executor`` refusals that need no Ray: the default suite runs them.

A read server that refuses connections, one that is neither a replica nor the primary's database,
and a machine without Ray installed (reproduced by blocking ``import ray`` in the child process)
are refused with a message naming the value; a read DSN that is the primary's own database under
another spelling reads the same snapshot and writes the same tables.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import psycopg

from tests.cli import derive
from tests.db.helpers import AS_OF, engaged_user, insert_events
from tests.db.test_incremental import derived_tables

WHEN = AS_OF.isoformat()


def _key_value(dsn: str) -> str:
    """The same database as a key=value DSN (another spelling of one server)."""
    parts = urlsplit(dsn)
    spelled = (
        f"host={parts.hostname} port={parts.port or 5432} dbname={parts.path.lstrip('/')}"
        f" user={parts.username}"
    )
    return spelled + (f" password={unquote(parts.password)}" if parts.password else "")


def test_a_read_dsn_that_refuses_connections_fails_naming_it(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as pg:
        insert_events(pg, engaged_user(1))
        result = derive(
            "run", "--full", "--shards", "2", "--as-of", WHEN, "--dsn", dsn,
            "--read-dsn", "postgresql://postgres@127.0.0.1:1/nowhere",
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert "127.0.0.1:1/nowhere" in result.stderr
        assert "--read-dsn or DERIVE_READ_DSN" in result.stderr
        assert "Traceback" not in result.stderr
        assert pg.execute("SELECT count(*) FROM audience_state").fetchone() == (0,)


def test_a_read_dsn_that_is_another_database_is_refused(dsn: str, second_dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as pg:
        insert_events(pg, engaged_user(1))
        result = derive(
            "run", "--full", "--as-of", WHEN, "--dsn", dsn, "--read-dsn", second_dsn,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "is not a read replica of --dsn" in result.stderr
        assert urlsplit(second_dsn).path.lstrip("/") in result.stderr
        assert pg.execute("SELECT count(*) FROM audience_state").fetchone() == (0,)


def test_the_primary_under_another_spelling_reads_the_same(dsn: str, second_dsn: str) -> None:
    rows = engaged_user(1) + engaged_user(2 << 126) + engaged_user((1 << 128) - 5)
    for target, extra in ((second_dsn, []), (dsn, ["--read-dsn", _key_value(dsn)])):
        with psycopg.connect(target, autocommit=True) as pg:
            insert_events(pg, rows)
        result = derive("run", "--full", "--shards", "2", "--as-of", WHEN, "--dsn", target, *extra)
        assert result.returncode == 0, result.stderr
    with psycopg.connect(dsn) as a, psycopg.connect(second_dsn) as b:
        assert derived_tables(a) == derived_tables(b)
        assert len(derived_tables(a)["states"]) == 3


def test_a_bad_replica_wait_is_a_usage_error(dsn: str) -> None:
    result = derive(
        "run", "--full", "--dsn", dsn, "--read-dsn", dsn, env={"DERIVE_REPLICA_WAIT": "soon"}
    )
    assert result.returncode == 2, result.stderr
    assert "invalid DERIVE_REPLICA_WAIT 'soon'" in result.stderr


def test_an_unknown_executor_is_a_usage_error(dsn: str) -> None:
    result = derive("run", "--full", "--dsn", dsn, "--executor", "spark")
    assert result.returncode == 2, result.stderr
    assert "'spark'" in result.stderr
    assert "local, ray" in result.stderr


# A Python without the ray package: ``import ray`` fails in this child exactly as it does there.
_WITHOUT_RAY = """
import sys
sys.modules["ray"] = None
from derive.cli import main
sys.argv = ["derive", *sys.argv[1:]]
main()
"""


def test_executor_ray_without_ray_installed_exits_2_saying_how_to_install(
    dsn: str, tmp_path: Path
) -> None:
    for command in (
        ["run", "--full", "--executor", "ray", "--dsn", dsn],
        ["run", "--verify", "--as-of", WHEN, "--executor", "ray", "--dsn", dsn],
        ["backfill", "--from", WHEN, "--to", WHEN, "--out", str(tmp_path),
         "--executor", "ray", "--dsn", dsn],
    ):  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-c", _WITHOUT_RAY, *command],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "NO_COLOR": "1"},
        )
        assert result.returncode == 2, (command, result.stderr)
        assert "pip install 'derive[ray]'" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
