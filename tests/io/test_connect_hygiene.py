"""Connection hygiene: every connection names itself ``derive``; TLS parameters pass through."""

from __future__ import annotations

import pytest

from derive.io.connect import connect, with_application_name, without_password


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://u@h:6543/db", "postgresql://u@h:6543/db?application_name=derive"),
        (
            "postgresql://u@h/db?sslmode=require&sslrootcert=/ca.pem",
            "postgresql://u@h/db?sslmode=require&sslrootcert=/ca.pem&application_name=derive",
        ),
        ("postgresql://u@h/db?application_name=cron", "postgresql://u@h/db?application_name=cron"),
        (
            "host=h dbname=db sslmode=verify-full",
            "host=h dbname=db sslmode=verify-full application_name=derive",
        ),
        ("host=h application_name = mine", "host=h application_name = mine"),
        ("", ""),
    ],
)
def test_application_name_is_added_unless_named(dsn: str, expected: str) -> None:
    assert with_application_name(dsn) == expected


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://u:s%40cret@h:6543/db", "postgresql://u@h:6543/db"),
        ("postgresql://u@h/db?sslmode=require", "postgresql://u@h/db?sslmode=require"),
        ("postgresql://u@h/db?password=x&sslmode=require", "postgresql://u@h/db?sslmode=require"),
        ("postgresql://h/db", "postgresql://h/db"),
        ("host=h password = x user=u", "host=h user=u"),
        ("host=h dbname=password_log", "host=h dbname=password_log"),
    ],
)
def test_a_printed_dsn_loses_only_its_password(dsn: str, expected: str) -> None:
    assert without_password(dsn) == expected


def test_a_dsn_with_sslmode_disable_connects_as_derive(dsn: str) -> None:
    with connect(f"{dsn}?sslmode=disable") as db:
        assert db.fetch_value("SELECT current_setting('application_name')") == "derive"
        assert db.fetch_value("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is False
