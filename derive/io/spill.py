"""Rows spilled to Arrow IPC files, one per shard, while one streamed read is partitioned.

A full run in shards reads the window once (one sequential scan) and writes each batch's rows to
their shard's file; each shard then reads its own file back. Memory holds one batch while
spilling and one shard while deriving.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import polars as pl
import pyarrow as pa
import pyarrow.ipc

from derive.transforms.shard import ShardBounds, shard_index


class ShardSpill:
    """Per-shard IPC files of one or more tables under a private temporary directory."""

    def __init__(self, bounds: list[ShardBounds], directory: str | None = None) -> None:
        self.bounds = bounds
        self.root = Path(tempfile.mkdtemp(prefix="derive-shards-", dir=directory))

    def _path(self, name: str, index: int) -> Path:
        return self.root / f"{name}-{index}.arrow"

    def spill(self, name: str, frames: Iterable[pl.DataFrame], schema: pl.Schema) -> int:
        """Partition every frame by shard and append each part to its shard's file; rows spilled."""
        empty = pl.DataFrame(schema=schema).to_arrow()
        writers = [
            pa.ipc.new_file(str(self._path(name, i)), empty.schema) for i in range(len(self.bounds))
        ]
        rows = 0
        try:
            for frame in frames:
                if frame.height == 0:
                    continue
                rows += frame.height
                # In with_columns a one-shard index (a literal) broadcasts to every row.
                index = shard_index(pl.col("user_id"), self.bounds)
                parts = frame.with_columns(_shard=index).partition_by(
                    "_shard", as_dict=True, include_key=False
                )
                for (shard,), part in parts.items():
                    writers[int(shard)].write_table(part.to_arrow().cast(empty.schema))
        finally:
            for writer in writers:
                writer.close()
        return rows

    def read(self, name: str, index: int) -> pl.DataFrame:
        """One shard's rows of ``name`` (the file is removed once read)."""
        path = self._path(name, index)
        with pa.OSFile(str(path), "rb") as source:
            table = pa.ipc.open_file(source).read_all()
        frame = pl.DataFrame(pl.from_arrow(table))
        path.unlink()
        return frame

    def close(self) -> None:
        """Remove every file left."""
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ShardSpill:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
