"""``derive schedule``: ready-to-install crontab line and systemd units for Mode A."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pytest

from derive.jobs.prune import schedule_units as prune_units
from derive.jobs.watch import schedule_units
from tests.cli import derive


def units(every: timedelta) -> dict[str, str]:
    return schedule_units(executable="/opt/derive/bin/derive", every=every)


def test_default_cadence_is_every_15_minutes() -> None:
    result = schedule_units(executable="/opt/derive/bin/derive")

    cron_line = result["crontab"].splitlines()[1]
    assert cron_line == (
        "*/15 * * * * set -a && . /etc/derive/derive.env && set +a && "
        "/opt/derive/bin/derive run --lookback 120d >> /var/log/derive/run.log 2>&1"
    )
    assert "OnCalendar=*-*-* *:00/15:00" in result["derive-run.timer"]
    assert "Persistent=true" in result["derive-run.timer"]
    assert "Unit=derive-run.service" in result["derive-run.timer"]


def test_service_runs_once_and_counts_a_skipped_run_as_success() -> None:
    service = units(timedelta(minutes=15))["derive-run.service"]

    assert "Type=oneshot" in service
    assert "ExecStart=/opt/derive/bin/derive run --lookback 120d" in service
    assert "SuccessExitStatus=75" in service
    assert "EnvironmentFile=/etc/derive/derive.env" in service


def test_watch_service_stops_with_sigterm_and_restarts_on_failure() -> None:
    watch = units(timedelta(minutes=15))["derive-watch.service"]

    assert "ExecStart=/opt/derive/bin/derive watch --lookback 120d" in watch
    assert "KillSignal=SIGTERM" in watch
    assert "Restart=on-failure" in watch


@pytest.mark.parametrize(
    ("every", "cron", "calendar"),
    [
        (timedelta(minutes=1), "* * * * *", "*-*-* *:00/1:00"),
        (timedelta(minutes=30), "*/30 * * * *", "*-*-* *:00/30:00"),
        (timedelta(hours=1), "0 * * * *", "*-*-* 00/1:00:00"),
        (timedelta(hours=6), "0 */6 * * *", "*-*-* 00/6:00:00"),
    ],
)
def test_cadences_that_divide_an_hour_or_a_day(every: timedelta, cron: str, calendar: str) -> None:
    result = units(every)

    assert result["crontab"].splitlines()[1].startswith(f"{cron} set -a")
    assert f"OnCalendar={calendar}\n" in result["derive-run.timer"]


@pytest.mark.parametrize(
    "every", [timedelta(minutes=7), timedelta(minutes=90), timedelta(seconds=30)]
)
def test_cadences_cron_cannot_express_are_refused(every: timedelta) -> None:
    with pytest.raises(ValueError, match="cadence"):
        units(every)


def test_schedule_command_prints_every_unit() -> None:
    result = derive("schedule")

    assert result.returncode == 0, result.stderr
    assert "# ---- crontab ----" in result.stdout
    assert "# ---- derive-run.service ----" in result.stdout
    assert "# ---- derive-run.timer ----" in result.stdout
    assert "# ---- derive-watch.service ----" in result.stdout
    assert "*/15 * * * *" in result.stdout
    assert f"{Path(sys.executable).parent / 'derive'} run --lookback 120d" in result.stdout


def test_schedule_command_rejects_a_bad_cadence() -> None:
    result = derive("schedule", "--every", "7m")

    assert result.returncode == 2
    assert "does not divide an hour or a day" in result.stderr


def test_prune_runs_nightly() -> None:
    result = prune_units(executable="/opt/derive/bin/derive")

    assert result["crontab (prune)"].splitlines()[1] == (
        "30 3 * * * set -a && . /etc/derive/derive.env && set +a && "
        "/opt/derive/bin/derive prune >> /var/log/derive/prune.log 2>&1"
    )
    assert "OnCalendar=*-*-* 03:30:00" in result["derive-prune.timer"]
    assert "Unit=derive-prune.service" in result["derive-prune.timer"]
    assert "ExecStart=/opt/derive/bin/derive prune" in result["derive-prune.service"]
    assert "SuccessExitStatus=75" in result["derive-prune.service"]


def test_the_crontab_verifies_nightly() -> None:
    result = schedule_units(executable="/usr/local/bin/derive")

    lines = result["crontab"].splitlines()

    assert lines[3].startswith("30 4 * * * set -a")  # after the nightly prune
    assert lines[3].endswith("derive run --lookback 120d --verify >> /var/log/derive/run.log 2>&1")


def test_units_run_as_a_named_user_and_say_what_the_env_file_and_log_folder_need() -> None:
    result = schedule_units(executable="/opt/derive/bin/derive", user="analytics")

    assert "User=analytics" in result["derive-run.service"]
    assert "User=analytics" in result["derive-watch.service"]
    assert "DERIVE_DSN=" in result["derive-run.service"]
    assert "DERIVE_DSN=" in result["crontab"]
    assert "mkdir -p /var/log/derive" in result["crontab"]


def test_schedule_command_passes_the_user_on() -> None:
    result = derive("schedule", "--run-as", "analytics")

    assert result.returncode == 0, result.stderr
    assert result.stdout.count("User=analytics") == 2
