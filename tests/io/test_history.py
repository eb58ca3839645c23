"""The parquet state-history directory: its manifest is a stored file, read defensively."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from derive.errors import UsageError
from derive.io.history import Backfill, ParquetHistory

BACKFILL = Backfill(
    origin=datetime(2026, 1, 1, tzinfo=UTC),
    step=timedelta(days=1),
    lookback=timedelta(days=120),
    rules_version="test",
)


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b"\xff\xfe", b"[" * 5000 + b"]" * 5000],
    ids=["empty", "broken", "not-utf8", "nested-5000"],
)
def test_a_manifest_that_is_not_json_is_a_usage_error_naming_the_file(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / ParquetHistory.MANIFEST).write_bytes(content)

    with pytest.raises(UsageError) as caught:
        ParquetHistory(tmp_path, BACKFILL).open()

    assert str(tmp_path / ParquetHistory.MANIFEST) in str(caught.value)


def test_a_manifest_of_another_backfill_is_refused(tmp_path: Path) -> None:
    ParquetHistory(tmp_path, BACKFILL).open()
    other = Backfill(BACKFILL.origin, BACKFILL.step, timedelta(days=30), BACKFILL.rules_version)

    with pytest.raises(UsageError, match="other parameters"):
        ParquetHistory(tmp_path, other).open()
