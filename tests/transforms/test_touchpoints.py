"""Touchpoint line validation: one reason per refused line, exact values for accepted ones."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import polars as pl
import pytest

from derive.schema import LINES
from derive.transforms.touchpoints import REJECT_REASONS, parse_touchpoint_lines

USER = "0b6e1f5a-7c1e-4c59-9f0e-1d2b3c4d5e6f"
PROSPECT = "9a6e1f5a-7c1e-4c59-9f0e-1d2b3c4d5e6f"


def line(**fields: Any) -> str:
    base: dict[str, Any] = {
        "user_id": USER,
        "surface": "tryst",
        "touchpoint": "dm_inbound",
        "external_id": "e1",
        "occurred_at": "2026-11-02T10:15:00Z",
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


def parse(*texts: str) -> pl.DataFrame:
    lines = pl.LazyFrame({"line_no": range(1, len(texts) + 1), "line": list(texts)}, schema=LINES)
    return parse_touchpoint_lines(lines).collect()


def test_valid_line_is_parsed_with_utc_time_and_defaults() -> None:
    result = parse(
        line(occurred_at="2026-11-02T12:15:00.5+02:00", identifier=" Bob ", prospect_id=PROSPECT)
    )

    row = result.row(0, named=True)
    assert row["reason"] is None
    assert row["occurred_at"] == datetime(2026, 11, 2, 10, 15, 0, 500000, tzinfo=UTC)
    assert row["identifier"] == " Bob "
    assert row["prospect_id"] == PROSPECT
    assert row["ingestion_source"] == "adapter_poll"
    assert row["org_id"] is None


def test_kind_is_accepted_as_an_alias_of_touchpoint() -> None:
    result = parse(line(touchpoint=..., kind="tip"))

    assert result.select("touchpoint", "reason").row(0) == ("tip", None)


def test_uuids_are_normalised_to_lower_case() -> None:
    result = parse(line(user_id=USER.upper()))

    assert result.select("user_id", "reason").row(0) == (USER, None)


def test_blank_lines_are_skipped() -> None:
    result = parse(line(), "", "   ", line(external_id="e2"))

    assert result["line_no"].to_list() == [1, 4]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{oops", "malformed_json"),
        ('{"payload": {"note": "a\\u0000b"}}', "unsupported_escape"),
        ("[1, 2]", "not_an_object"),
        ('"just a string"', "not_an_object"),
        (line(user_id=...), "missing_user_id"),
        (line(user_id="not-a-uuid"), "bad_user_id"),
        (line(org_id="42"), "bad_org_id"),
        (line(surface=" "), "missing_surface"),
        (line(touchpoint=...), "missing_touchpoint"),
        (line(touchpoint="wink"), "unknown_kind"),
        (line(external_id=...), "missing_external_id"),
        (line(occurred_at=...), "missing_occurred_at"),
        (line(occurred_at="yesterday"), "bad_timestamp"),
        (line(occurred_at="2026-11-02T10:15:00"), "bad_timestamp"),
        (line(occurred_at="2026-02-30T10:15:00Z"), "bad_timestamp"),
        (line(prospect_id="p-1"), "bad_prospect_id"),
        (line(payload=[1, 2]), "payload_not_object"),
        (line(payload="text"), "payload_not_object"),
        (line(touchpoint="tip", payload={"amount": "lots"}), "bad_amount"),
        (line(ingestion_source="carrier_pigeon"), "unknown_ingestion_source"),
    ],
)
def test_refused_line_gets_its_reason(text: str, reason: str) -> None:
    result = parse(text)

    assert result.select("line_no", "reason").rows() == [(1, reason)]


def test_every_reason_is_listed_once_in_check_order() -> None:
    assert len(set(REJECT_REASONS)) == len(REJECT_REASONS)
    assert REJECT_REASONS[0] == "malformed_json"


def test_first_failed_check_wins() -> None:
    result = parse(line(touchpoint="wink", occurred_at="never"))

    assert result["reason"].to_list() == ["unknown_kind"]


@pytest.mark.parametrize("amount", [12.5, 0, -3, "7.25", 1e3])
def test_numeric_amounts_are_accepted(amount: object) -> None:
    result = parse(line(touchpoint="tip", payload={"amount": amount, "currency": "USD"}))

    assert result["reason"].to_list() == [None]


def test_one_bad_line_does_not_stop_the_others() -> None:
    result = parse("{oops", line(external_id="e2"), "[]")

    assert result.select("line_no", "reason").rows() == [
        (1, "malformed_json"),
        (2, None),
        (3, "not_an_object"),
    ]
