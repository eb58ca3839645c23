"""``derive status``: runs, states, rejections, lag, and an exit code monitoring can use."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from derive.errors import LockBusy, UsageError
from derive.io.connect import connect
from derive.io.runlog import job_run
from derive.jobs.derivation import JOB
from derive.jobs.status import (
    StatusReport,
    collect_status,
    human_duration,
    openmetrics,
    parse_max_lags,
)
from tests.cli import derive
from tests.db.helpers import event, insert_events, run, uid

NOW = datetime.now(UTC)


def status(dsn: str, *extra: str) -> tuple[int, dict[str, object]]:
    result = derive("status", "--dsn", dsn, "--json", "--check", *extra)
    assert result.stderr == ""
    return result.returncode, json.loads(result.stdout)


def successful_run(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, [event(1, "scroll_depth_75", "engagement", as_of=NOW)])
    run(dsn, as_of=NOW)


def failed_run(dsn: str, message: str) -> None:
    with (
        connect(dsn) as db,
        pytest.raises(RuntimeError),
        job_run(db, job=JOB, as_of=NOW, lookback=timedelta(days=120)),
    ):
        raise RuntimeError(message)


def test_status_is_healthy_after_a_successful_run(dsn: str, pg: psycopg.Connection) -> None:
    successful_run(dsn, pg)

    code, payload = status(dsn)

    assert code == 0
    assert payload["healthy"] is True
    assert payload["problems"] == []
    assert payload["states"] == {"S0": 0, "S1": 1, "S2": 0, "S3": 0, "S4": 0, "S5": 0}
    runs = payload["runs"]
    assert isinstance(runs, list)
    assert [r["status"] for r in runs] == ["succeeded"]
    assert runs[0]["users_changed"] == 1
    assert runs[0]["scope"] == "full"


def test_status_reflects_a_failed_run_and_exits_non_zero(dsn: str, pg: psycopg.Connection) -> None:
    successful_run(dsn, pg)
    failed_run(dsn, "disk full")

    code, payload = status(dsn)

    assert code == 1
    assert payload["healthy"] is False
    problems = payload["problems"]
    assert isinstance(problems, list)
    assert len(problems) == 1
    assert "failed: RuntimeError: disk full" in problems[0]
    runs = payload["runs"]
    assert isinstance(runs, list)
    assert [r["status"] for r in runs] == ["failed", "succeeded"]
    assert runs[0]["error"] == "RuntimeError: disk full"


def test_status_table_names_the_failure_and_exits_zero_without_check(
    dsn: str, pg: psycopg.Connection
) -> None:
    successful_run(dsn, pg)
    failed_run(dsn, "disk full")

    result = derive("status", "--dsn", dsn)

    assert result.returncode == 0
    assert "UNHEALTHY" in result.stdout
    assert "RuntimeError: disk full" in result.stdout


def test_check_prints_the_verdict_and_exits_one_when_failing(
    dsn: str, pg: psycopg.Connection
) -> None:
    successful_run(dsn, pg)
    failed_run(dsn, "disk full")

    result = derive("status", "--dsn", dsn, "--check")

    assert result.returncode == 1
    (line,) = result.stdout.splitlines()
    assert line.startswith("problem: the last run (")
    assert line.endswith("failed: RuntimeError: disk full")


def test_check_is_quiet_and_zero_when_healthy(dsn: str, pg: psycopg.Connection) -> None:
    successful_run(dsn, pg)

    result = derive("status", "--dsn", dsn, "--check")

    assert result.returncode == 0
    assert result.stdout.startswith("ok: ")


def test_check_reports_a_late_job_named_by_max_lag(dsn: str, pg: psycopg.Connection) -> None:
    successful_run(dsn, pg)

    result = derive("status", "--dsn", dsn, "--check", "--max-lag", "prune=26h")

    assert result.returncode == 1
    assert result.stdout == "problem: no prune run has succeeded yet\n"


def test_openmetrics_output_of_the_command_parses(dsn: str, pg: psycopg.Connection) -> None:
    successful_run(dsn, pg)

    result = derive("status", "--dsn", dsn, "--format", "openmetrics")

    assert result.returncode == 0
    assert result.stdout.endswith("# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(result.stdout)}
    assert families["derive_last_success_timestamp_seconds"].samples[0].labels == {"job": "derive"}
    assert families["derive_healthy"].samples[0].value == 1


def test_a_bad_max_lag_is_a_usage_error(dsn: str) -> None:
    result = derive("status", "--dsn", dsn, "--max-lag", "soon")

    assert result.returncode == 2
    assert "invalid --max-lag 'soon'" in result.stderr


def test_a_later_success_clears_the_failure(dsn: str, pg: psycopg.Connection) -> None:
    failed_run(dsn, "disk full")
    successful_run(dsn, pg)

    code, payload = status(dsn)

    assert code == 0
    assert payload["problems"] == []


def test_a_skipped_run_is_not_a_failure(dsn: str, pg: psycopg.Connection) -> None:
    successful_run(dsn, pg)
    with (
        connect(dsn) as holder,
        job_run(holder, job=JOB, as_of=NOW),
        pytest.raises(LockBusy),
    ):
        run(dsn, as_of=NOW)

    code, payload = status(dsn)

    assert code == 0
    runs = payload["runs"]
    assert isinstance(runs, list)
    assert [r["status"] for r in runs] == ["skipped", "succeeded", "succeeded"]


@pytest.mark.parametrize(
    ("finished_ago", "max_lag", "expected_code"),
    [
        (timedelta(minutes=29), "30m", 0),
        (timedelta(minutes=31), "30m", 1),
        (timedelta(hours=5), "6h", 0),
    ],
)
def test_status_exits_one_when_the_lag_exceeds_max_lag(
    dsn: str,
    pg: psycopg.Connection,
    finished_ago: timedelta,
    max_lag: str,
    expected_code: int,
) -> None:
    successful_run(dsn, pg)
    pg.execute(
        "UPDATE derivation_runs SET started_at = clock_timestamp() - %s - interval '1 second',"
        " finished_at = clock_timestamp() - %s",
        (finished_ago, finished_ago),
    )

    code, payload = status(dsn, "--max-lag", max_lag)

    assert code == expected_code
    lag = payload["lag_seconds"]
    assert isinstance(lag, float)
    assert finished_ago.total_seconds() <= lag < finished_ago.total_seconds() + 60
    if expected_code:
        assert "more than --max-lag 30m" in str(payload["problems"])


def test_no_successful_run_yet_is_unhealthy(dsn: str) -> None:
    code, payload = status(dsn)

    assert code == 1
    assert payload["problems"] == ["no full derive run has succeeded yet"]
    assert payload["lag_seconds"] is None


def test_user_subset_runs_do_not_reset_the_lag(dsn: str, pg: psycopg.Connection) -> None:
    insert_events(pg, [event(1, "scroll_depth_75", "engagement", as_of=NOW)])
    run(dsn, as_of=NOW, users=[str(uid(1))])

    code, payload = status(dsn)

    assert code == 1
    assert payload["problems"] == ["no full derive run has succeeded yet"]
    assert payload["last_any_success"] is not None
    runs = payload["runs"]
    assert isinstance(runs, list)
    assert runs[0]["scope"] == "1 users"


def test_rejections_are_counted_by_reason_over_24_hours_and_7_days(
    dsn: str, pg: psycopg.Connection
) -> None:
    successful_run(dsn, pg)
    rows = [
        (uid(7), timedelta(hours=1), ["consent_missing", "volume_spike"]),
        (uid(8), timedelta(hours=23, minutes=59), ["consent_missing"]),
        (uid(8), timedelta(hours=24, minutes=1), ["consent_missing"]),
        (uid(9), timedelta(days=6, hours=23), ["volume_spike"]),
        (uid(9), timedelta(days=7, minutes=1), ["volume_spike"]),
    ]
    for user, ago, reasons in rows:
        pg.execute(
            "INSERT INTO audience_events (created_at, user_id, event_type, event_category, metadata)"
            " VALUES (clock_timestamp() - %s, %s, 'validation_fail', 'system',"
            " jsonb_build_object('reasons', %s::jsonb, 'reasons_key', %s::text))",
            (ago, user, json.dumps(reasons), ",".join(reasons)),
        )

    code, payload = status(dsn)

    assert code == 0
    assert payload["rejections"] == [
        {"reason": "consent_missing", "last_24h": 2, "last_7d": 3, "users_7d": 2},
        {"reason": "volume_spike", "last_24h": 1, "last_7d": 2, "users_7d": 2},
    ]


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0s"),
        (59, "59s"),
        (60, "1m00s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (86399, "23h59m"),
        (86400, "1d00h"),
        (90061, "1d01h"),
    ],
)
def test_human_duration_shows_two_units_at_most(seconds: int, expected: str) -> None:
    assert human_duration(timedelta(seconds=seconds)) == expected


def metrics_of(dsn: str, **options: object) -> tuple[StatusReport, dict[str, Any]]:
    with connect(dsn) as db:
        report = collect_status(db, **options)  # type: ignore[arg-type]
    text = openmetrics(report)
    return report, {f.name: f for f in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    (value,) = [s.value for s in families[name].samples if s.labels == labels]
    return float(value)


def test_openmetrics_parses_and_names_metrics_the_prometheus_way(
    dsn: str, pg: psycopg.Connection
) -> None:
    successful_run(dsn, pg)
    with (
        connect(dsn) as db,
        pytest.raises(RuntimeError),
        job_run(db, job="rollup", as_of=NOW),
    ):
        raise RuntimeError("rollup broke")
    finished = pg.execute(
        "SELECT extract(epoch FROM finished_at)::float8, extract(epoch FROM finished_at - started_at)"
        "::float8 FROM derivation_runs WHERE job = 'derive'"
    ).fetchone()
    assert finished is not None

    report, families = metrics_of(dsn)

    assert sample(families, "derive_last_success_timestamp_seconds", job="derive") == pytest.approx(
        finished[0]
    )
    assert sample(families, "derive_last_run_duration_seconds", job="derive") == pytest.approx(
        finished[1]
    )
    assert sample(families, "derive_last_run_failed", job="derive") == 0
    assert sample(families, "derive_last_run_failed", job="rollup") == 1
    assert sample(families, "derive_lag_seconds", job="rollup") == float("inf")
    lag = sample(families, "derive_lag_seconds", job="derive")
    # the exposition prints seconds to the microsecond
    assert lag == pytest.approx(report.now.timestamp() - finished[0], abs=1e-5)
    assert sample(families, "derive_watermark_age_seconds") == pytest.approx(lag)
    assert sample(families, "derive_max_lag_seconds", job="derive") == 1800
    assert sample(families, "derive_users", state="S1") == 1
    assert sample(families, "derive_users", state="S5") == 0
    assert sample(families, "derive_runs_24h", job="rollup", status="failed") == 1
    assert sample(families, "derive_last_run_users_changed", job="derive") == 1
    assert sample(families, "derive_healthy") == 0
    assert sample(families, "derive_problems") == 1
    assert families["derive_lag_seconds"].unit == "seconds"


def test_openmetrics_counts_rejections_per_reason_and_window(
    dsn: str, pg: psycopg.Connection
) -> None:
    successful_run(dsn, pg)
    pg.execute(
        "INSERT INTO audience_events (created_at, user_id, event_type, event_category, metadata)"
        " VALUES (clock_timestamp() - interval '2 days', %s, 'validation_fail', 'system',"
        ' \'{"reasons": ["volume_spike"]}\')',
        (uid(5),),
    )

    _, families = metrics_of(dsn)

    assert sample(families, "derive_rejections", reason="volume_spike", window="24h") == 0
    assert sample(families, "derive_rejections", reason="volume_spike", window="7d") == 1
    assert sample(families, "derive_rejected_users_7d", reason="volume_spike") == 1


def test_a_job_with_a_max_lag_that_never_ran_is_late(dsn: str, pg: psycopg.Connection) -> None:
    successful_run(dsn, pg)

    report, families = metrics_of(dsn, max_lag=parse_max_lags(["prune=26h"]))

    assert report.problems == ["no prune run has succeeded yet"]
    assert sample(families, "derive_lag_seconds", job="prune") == float("inf")
    assert sample(families, "derive_max_lag_seconds", job="prune") == 26 * 3600


def test_a_failed_run_of_another_job_is_a_problem(dsn: str, pg: psycopg.Connection) -> None:
    successful_run(dsn, pg)
    with connect(dsn) as db, pytest.raises(RuntimeError), job_run(db, job="prune", as_of=NOW):
        raise RuntimeError("disk full")

    with connect(dsn) as db:
        report = collect_status(db)

    (problem,) = report.problems
    assert problem.startswith("the last prune run (")
    assert problem.endswith("failed: RuntimeError: disk full")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], {"derive": timedelta(minutes=30)}),
        (["1h"], {"derive": timedelta(hours=1)}),
        (["prune=26h", "10m"], {"derive": timedelta(minutes=10), "prune": timedelta(hours=26)}),
    ],
)
def test_max_lag_values(values: list[str], expected: dict[str, timedelta]) -> None:
    assert parse_max_lags(values) == expected


@pytest.mark.parametrize("value", ["=1h", "prune=", "prune=soon", "1 week"])
def test_bad_max_lag_values_name_the_value(value: str) -> None:
    with pytest.raises(UsageError, match="invalid --max-lag"):
        parse_max_lags([value])


def start_run(pg: psycopg.Connection, *, seconds: int) -> tuple[str, str]:
    """A derive run started the way every job starts one; returns its id and secret token."""
    with pg.transaction():
        pg.execute("SET LOCAL ROLE service_role")
        row = pg.execute(
            "SELECT run_id::text, token FROM derive_start_run('derive', 'derive', now(), NULL,"
            " NULL, '{}', %s)",
            (seconds,),
        ).fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


def test_a_run_whose_lease_expired_is_flagged(dsn: str, pg: psycopg.Connection) -> None:
    successful_run(dsn, pg)
    start_run(pg, seconds=1)
    time.sleep(1.5)

    report, families = metrics_of(dsn)

    assert report.problems == [
        "a derive run is marked running but its lease expired (process killed?); the next"
        " derive run marks it failed"
    ]
    assert sample(families, "derive_expired_leases", job="derive") == 1


def test_a_run_that_wrote_states_and_never_finished_is_flagged(
    dsn: str, pg: psycopg.Connection
) -> None:
    successful_run(dsn, pg)
    run_id, token = start_run(pg, seconds=600)
    # Someone holding the marker writes a state in a transaction of their own and commits.
    with pg.transaction():
        pg.execute("SET LOCAL ROLE service_role")
        pg.execute("SELECT set_config('derive.run_id', %s, true)", (run_id,))
        pg.execute("SELECT set_config('derive.run_token', %s, true)", (token,))
        pg.execute("UPDATE audience_state SET engagement_score = 99")
    pg.execute(
        "UPDATE derivation_runs SET status = 'failed', finished_at = now() WHERE run_id = %s",
        (run_id,),
    )

    report, families = metrics_of(dsn)

    (problem,) = [p for p in report.problems if "wrote audience_state" in p]
    assert problem.startswith(f"run {run_id} (derive, failed")
    assert sample(families, "derive_unfinished_writer_runs", job="derive") == 1


def test_openmetrics_shows_the_mode_and_candidates_of_an_incremental_run(
    dsn: str, pg: psycopg.Connection
) -> None:
    successful_run(dsn, pg)
    insert_events(pg, [event(2, "scroll_depth_75", "engagement", as_of=NOW)])
    run(dsn, as_of=NOW + timedelta(minutes=15))

    _, families = metrics_of(dsn)

    assert sample(families, "derive_last_run_mode", job="derive", mode="incremental") == 1
    reasons = {s.labels["reason"]: s.value for s in families["derive_last_run_candidates"].samples}
    assert sum(reasons.values()) >= 1
