"""Durations, timestamps and the rules file: accepted forms, and errors that name the bad value."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from derive.config import (
    DURATION_FORMS,
    DURATION_RANGE,
    TIMESTAMP_RANGE,
    Retention,
    format_duration,
    load_rules,
    parse_duration,
    parse_size,
    parse_timestamp,
)
from derive.errors import ConfigError, UsageError
from derive.rules import canonical_rules_path

# -- durations -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("120d", timedelta(days=120)),
        ("36h", timedelta(hours=36)),
        ("15m", timedelta(minutes=15)),
        ("90s", timedelta(seconds=90)),
        ("1s", timedelta(seconds=1)),
        (" 7d ", timedelta(days=7)),
    ],
)
def test_parse_duration_accepts_whole_units(text: str, expected: timedelta) -> None:
    result = parse_duration(text)

    assert result == expected


@pytest.mark.parametrize(
    "text", ["0d", "1w", "", "12", "-3d", "1.5h", "d", "10 days", "120D", "3d4h", "0s", "1 2d"]
)
def test_parse_duration_rejects_anything_else_naming_value_and_forms(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_duration(text)

    assert repr(text) in str(caught.value)
    assert DURATION_FORMS in str(caught.value)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("text", ["120d", "36h", "15m", "90s"])
def test_format_duration_inverts_parse_duration(text: str) -> None:
    result = format_duration(parse_duration(text))

    assert result == text


# -- timestamps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-22T08:00:00Z", datetime(2026, 11, 22, 8, tzinfo=UTC)),
        ("2026-11-22T08:00:00", datetime(2026, 11, 22, 8, tzinfo=UTC)),
        ("2026-11-22", datetime(2026, 11, 22, tzinfo=UTC)),
        (
            "2026-11-22T10:00:00+02:00",
            datetime(2026, 11, 22, 10, tzinfo=timezone(timedelta(hours=2))),
        ),
        ("2026-11-22T08:00:00.123456Z", datetime(2026, 11, 22, 8, 0, 0, 123456, tzinfo=UTC)),
    ],
)
def test_parse_timestamp_reads_iso_8601_and_defaults_to_utc(text: str, expected: datetime) -> None:
    result = parse_timestamp(text)

    assert result == expected
    assert result.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize("text", ["yesterday", "", "22/11/2026", "2026-13-01", "now"])
def test_parse_timestamp_rejects_other_text_with_an_example(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_timestamp(text)

    assert repr(text) in str(caught.value)
    assert "ISO-8601" in str(caught.value)


# -- allowed ranges --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["36500d", "876000h", "52560000m", "3153600000s"])
def test_durations_up_to_100_years_are_accepted(text: str) -> None:
    assert parse_duration(text) == timedelta(days=36500)


@pytest.mark.parametrize(
    "text", ["36501d", "876001h", "3153600001s", "1000000d", "100000000000000000000d"]
)
def test_a_duration_beyond_100_years_is_out_of_range_naming_the_range(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_duration(text)

    assert repr(text) in str(caught.value)
    assert DURATION_RANGE in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1900-01-01", datetime(1900, 1, 1, tzinfo=UTC)),
        ("1900-01-01T05:00:00+05:00", datetime(1900, 1, 1, tzinfo=UTC)),
        ("9000-01-01T00:00:00Z", datetime(9000, 1, 1, tzinfo=UTC)),
    ],
)
def test_timestamps_at_the_ends_of_the_range_are_accepted(text: str, expected: datetime) -> None:
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "0001-01-01",
        "0001-01-01T00:00:00+05:00",  # before year 1 in UTC: datetime cannot even compare it
        "9999-12-31T23:59:59-05:00",  # after year 9999 in UTC
        "1899-12-31T23:59:59Z",
        "1900-01-01T04:59:59+05:00",
        "9000-01-01T00:00:01Z",
    ],
)
def test_a_timestamp_outside_1900_to_9000_is_out_of_range_naming_the_range(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_timestamp(text)

    assert repr(text) in str(caught.value)
    assert TIMESTAMP_RANGE in str(caught.value)


# -- rules ---------------------------------------------------------------------------------------------

CANONICAL = canonical_rules_path().read_text(encoding="utf-8")


def test_canonical_rules_load() -> None:
    rules = load_rules()

    assert rules.version == "2026.11.1"
    assert [g.id for g in rules.gates] == ["G1", "G2", "G3", "G4", "G5"]
    assert [d.id for d in rules.downgrades] == ["R3", "R2", "R1"]
    assert rules.weights["email_subscribe"] == 6
    assert rules.event_category["content_view"] == "engagement"
    assert rules.dedupe_window == timedelta(seconds=3)
    assert rules.spike_max_events_per_hour == 500
    assert rules.min_duration_seconds == 20
    assert rules.min_scroll_depth_percent == 30
    assert len(rules.sha256) == 64


def test_a_copied_canonical_file_loads_equal(tmp_path: Path) -> None:
    copy = tmp_path / "rules.toml"
    copy.write_text(CANONICAL, encoding="utf-8")

    result = load_rules(copy)

    assert result == load_rules()


def write_with(tmp_path: Path, old: str, new: str, *, count: int = 1) -> Path:
    """The canonical file with the ``count``-th occurrence of ``old`` replaced by ``new``."""
    parts = CANONICAL.split(old)
    assert len(parts) > count, f"{old!r} occurs fewer than {count} times in the canonical rules"
    text = old.join(parts[:count]) + new + old.join(parts[count:])
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("old", "new", "count", "key", "value"),
    [
        pytest.param(
            '{ metric = "repeat_30d", op = ">=", value = 1 }',
            '{ metric = "repeat_31d", op = ">=", value = 1 }',
            1,
            "gates[1].clauses[0][0].metric",
            "repeat_31d",
            id="unknown-metric-in-gate",
        ),
        pytest.param(
            "window_seconds = 3",
            'window_seconds = "x"',
            1,
            "dedupe.window_seconds",
            "'x'",
            id="non-numeric-dedupe-window",
        ),
        pytest.param(
            'categories = ["advocacy"]',
            'categories = ["advocacy", "telemetry"]',
            1,
            "metrics.advocacy_60d.categories",
            "telemetry",
            id="unknown-metric-category",
        ),
        pytest.param(
            'event_types = ["repeat_session_30d"]',
            'event_types = ["repeat_session_31d"]',
            1,
            "metrics.repeat_30d.event_types",
            "repeat_session_31d",
            id="unknown-metric-event-type",
        ),
        pytest.param(
            '{ metric = "deep_7d", op = ">=", value = 1 }',
            '{ metric = "deep_7d", op = "=>", value = 1 }',
            1,
            "gates[0].clauses[0][0].op",
            "=>",
            id="bad-operator",
        ),
        pytest.param(
            "inactivity_days = 75",
            "inactivity_days = -1",
            1,
            "downgrades[0].inactivity_days",
            "-1",
            id="negative-inactivity",
        ),
        pytest.param(
            "content_share = 5",
            'content_share = "five"',
            1,
            "catalog.advocacy.content_share",
            "five",
            id="non-numeric-weight",
        ),
        pytest.param(
            'to = "S2"',
            'to = "S3"',
            1,
            "gates[1].to",
            "S3",
            id="gate-skips-a-state",
        ),
        pytest.param(
            "spike_max_events_per_hour = 500",
            "spike_max_events_per_hour = 0",
            1,
            "failsafe.spike_max_events_per_hour",
            "0",
            id="zero-spike-limit",
        ),
        pytest.param(
            "min_pass = 2",
            "min_pass = 5",
            1,
            "gates[4].min_pass",
            "5",
            id="min-pass-too-large",
        ),
        pytest.param(
            'kind = "sessions"',
            'kind = "distinct"',
            1,
            "metrics.sessions_30d.kind",
            "distinct",
            id="unknown-metric-kind",
        ),
        pytest.param(
            'event_type = "content_view"',
            'event_type = "page_view"',
            1,
            "qualification.event_type",
            "page_view",
            id="unknown-qualified-type",
        ),
    ],
)
def test_a_bad_rules_file_names_the_key_and_the_value(
    tmp_path: Path, old: str, new: str, count: int, key: str, value: str
) -> None:
    path = write_with(tmp_path, old, new, count=count)

    with pytest.raises(ConfigError) as caught:
        load_rules(path)

    message = str(caught.value)
    assert repr(key) in message
    assert value in message
    assert str(path) in message
    assert caught.value.exit_code == 2


def test_a_missing_rules_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"

    with pytest.raises(ConfigError, match="cannot read rules file"):
        load_rules(missing)


def test_a_rules_file_that_is_not_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text("version = \n", encoding="utf-8")

    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_rules(path)


def test_the_rules_hash_changes_with_the_file(tmp_path: Path) -> None:
    path = write_with(
        tmp_path, "spike_max_events_per_hour = 500", "spike_max_events_per_hour = 400"
    )

    result = load_rules(path)

    assert result.sha256 != load_rules().sha256
    assert result.spike_max_events_per_hour == 400


# -- retention -----------------------------------------------------------------------------------------


def test_canonical_retention_defaults() -> None:
    result = load_rules().retention

    assert result == Retention(
        events_margin_days=30,
        system_events_days=730,
        payload_days=90,
        state_history_days=365,
        batch_rows=10_000,
    )


def test_a_rules_file_without_retention_gets_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(CANONICAL.split("[retention]")[0], encoding="utf-8")

    assert load_rules(path).retention == Retention()


def test_forever_keeps_a_kind(tmp_path: Path) -> None:
    path = write_with(tmp_path, "payload_days = 90", 'payload_days = "forever"')

    assert load_rules(path).retention.payload_days is None


@pytest.mark.parametrize(
    ("old", "new", "key", "value"),
    [
        ("payload_days = 90", "payload_days = 0", "retention.payload_days", "0"),
        ("payload_days = 90", 'payload_days = "never"', "retention.payload_days", "never"),
        ("batch_rows = 10000", "batch_rows = 0", "retention.batch_rows", "0"),
        ("payload_days = 90", "payload_dayz = 90", "retention.payload_dayz", "90"),
        # validation_fail rows are read for 24 h (relog): they must outlive that.
        (
            "system_events_days = 730",
            "system_events_days = 1",
            "retention.system_events_days",
            "1",
        ),
    ],
)
def test_a_bad_retention_value_names_the_key(
    tmp_path: Path, old: str, new: str, key: str, value: str
) -> None:
    path = write_with(tmp_path, old, new)

    with pytest.raises(ConfigError) as caught:
        load_rules(path)

    assert repr(key) in str(caught.value)
    assert value in str(caught.value)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("256MiB", 256 * 2**20),
        ("2GiB", 2 * 2**30),
        ("1.5G", int(1.5 * 2**30)),
        ("512M", 512 * 2**20),
        ("64k", 64 * 1024),
        ("500MB", 500 * 10**6),
        ("1B", 1),
        (" 3 gib ", 3 * 2**30),
    ],
)
def test_memory_sizes_in_binary_and_decimal_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "0MiB", "-1GiB", "10XB", "", "MiB", "1.5", "0.5B", "1e3M"])
def test_a_bad_memory_size_names_the_value_and_the_forms(text: str) -> None:
    with pytest.raises(UsageError, match="use a positive number followed by a unit") as raised:
        parse_size(text)
    assert repr(text) in str(raised.value)


@pytest.mark.parametrize(
    ("env", "expected"), [({}, "in-memory"), ({"POLARS_ENGINE_AFFINITY": "streaming"}, "streaming")]
)
def test_importing_derive_picks_polars_in_memory_engine_unless_the_user_chose(
    env: dict[str, str], expected: str
) -> None:
    # The streaming engine's fixed cost per query dominated an incremental run's compute.
    probe = "import derive, polars; print(polars.Config.state()['POLARS_ENGINE_AFFINITY'])"
    clean = {k: v for k, v in os.environ.items() if k != "POLARS_ENGINE_AFFINITY"}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected
