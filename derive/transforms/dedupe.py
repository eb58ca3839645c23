"""Anchored near-duplicate removal (SPEC §2.4).

Within a ``(user_id, event_type, session_id)`` group ordered by ``(created_at, id)`` an event is kept
when it is the first, or at least ``window`` after the most recent *kept* event. A null session_id
is a group of its own.

Why this is cheap to vectorise: an event whose gap to its predecessor in the group is at least
``window`` is always kept (the last kept event is no later than the predecessor). Such events start
a *burst*; only the events inside a burst (gaps below ``window``) need the anchored walk, and that
walk restarts at each burst start. So the loop below runs once per kept event *within the deepest
burst* (a 2-second drip for a minute: about 20 passes), over the small frame of burst members only.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import polars as pl

GROUP = ("user_id", "event_type", "session_id")
ORDER = ("created_at", "id")


def uuid_key(column: str) -> pl.Expr:
    """A 16-byte uuid as an unsigned 128-bit integer: same order as PostgreSQL's uuid, and far
    cheaper to sort, hash and join than the binary (measured: the dedupe sort 5.9 s -> 3.6 s at
    2.2M rows on a loaded 2-core machine)."""
    return pl.col(column).bin.reinterpret(dtype=pl.UInt128, endianness="big")


def _same_group_as_previous() -> pl.Expr:
    return pl.all_horizontal([pl.col(k).eq_missing(pl.col(k).shift(1)) for k in GROUP])


def group_hash() -> pl.Expr:
    """One 64-bit key per ``GROUP`` (null session_id hashes as a value of its own)."""
    return pl.struct(*GROUP).hash()


def kept_mask(events: pl.LazyFrame, /, *, window: timedelta) -> pl.Series:
    """For each input row, whether the anchored rule keeps it (a boolean Series in input order).

    Only the narrow key columns (``GROUP``, ``created_at``, ``id``) are read and sorted; the wide
    frame is never reordered (measured: 1.2 s -> 0.5 s at 2.2M rows). Groups only need to be
    contiguous, in no particular order, so the sort is on one hashed group key, then time and id
    (measured at M, 2.06M rows: 1.55 s -> 0.41 s for the five-column sort with two string keys).
    A hash collision would merge two groups: it is detected (a row with its predecessor's hash but
    another group) and the rows are then sorted on the group columns themselves. The keys are
    collected here (a documented materialisation point): the anchored walk needs the burst depth.
    """
    keys = events.select(
        pl.int_range(pl.len(), dtype=pl.get_index_type()).alias("_input"),
        *[pl.col(c) for c in GROUP],
        pl.col("created_at"),
        uuid_key("id").alias("_id"),
    )
    ordered = _ordered(
        keys.with_columns(_group=group_hash()).sort(["_group", "created_at", "_id"]),
        window=window,
        collisions=True,
    )
    if ordered.get_column("_collision").any():
        ordered = _ordered(
            keys.sort([uuid_key("user_id"), "event_type", "session_id", "created_at", "_id"]),
            window=window,
            collisions=False,
        )
    # A row belongs to a burst of two or more when it is not a start, or the next row is not one.
    members = ordered.filter(
        ~pl.col("_burst_start") | ~pl.col("_burst_start").shift(-1).fill_null(True)
    ).select("_row", "_burst", "_burst_start", "created_at")
    kept_sorted = ordered.get_column("_burst_start").to_numpy().copy()
    kept_sorted[_walk_bursts(members, window=window).to_numpy()] = True
    kept = np.empty(len(kept_sorted), dtype=bool)
    kept[ordered.get_column("_input").to_numpy()] = kept_sorted
    return pl.Series("kept", kept)


def _ordered(sorted_keys: pl.LazyFrame, *, window: timedelta, collisions: bool) -> pl.DataFrame:
    """Burst starts and burst numbers of rows sorted so that each group is contiguous."""
    same_group = _same_group_as_previous()
    collision = (
        pl.col("_group").eq_missing(pl.col("_group").shift(1)) & ~same_group
        if collisions
        else pl.lit(False)
    )
    return (
        sorted_keys.select(
            "_input",
            "created_at",
            _burst_start=~same_group
            | ((pl.col("created_at") - pl.col("created_at").shift(1)) >= window),
            _collision=collision,
        )
        .with_row_index("_row")
        .with_columns(_burst=pl.col("_burst_start").cum_sum())
        .collect()
    )


def mark_duplicates(events: pl.LazyFrame, /, *, window: timedelta) -> pl.LazyFrame:
    """Add a boolean ``kept`` column (False for near-duplicates); row order is kept."""
    frame = events.collect()
    return frame.lazy().with_columns(kept_mask(frame.lazy(), window=window))


def _walk_bursts(members: pl.DataFrame, *, window: timedelta) -> pl.Series:
    """Rows kept inside bursts (besides the burst starts), by the anchored rule."""
    anchors = members.filter(pl.col("_burst_start")).select("_burst", anchor=pl.col("created_at"))
    pending = members.filter(~pl.col("_burst_start")).select("_row", "_burst", "created_at")
    kept: list[pl.Series] = []
    while pending.height:
        joined = pending.join(anchors, on="_burst", how="inner")
        # The first pending event at least `window` after the anchor is kept and becomes the anchor;
        # everything before it in the burst is a duplicate of the previous anchor.
        chosen = (
            joined.filter(pl.col("created_at") >= pl.col("anchor") + window)
            .group_by("_burst")
            .agg(pl.col("_row").min().alias("_chosen"), pl.col("created_at").min().alias("anchor"))
        )
        if chosen.height == 0:
            break
        kept.append(chosen.get_column("_chosen"))
        pending = (
            joined.join(chosen.select("_burst", "_chosen"), on="_burst", how="inner")
            .filter(pl.col("_row") > pl.col("_chosen"))
            .select("_row", "_burst", "created_at")
        )
        anchors = chosen.select("_burst", "anchor")
    if not kept:
        return pl.Series("_row", [], dtype=pl.get_index_type())
    return pl.concat(kept).alias("_row")


def dedupe_events(events: pl.LazyFrame, /, *, window: timedelta) -> pl.LazyFrame:
    """Keep only the events :func:`mark_duplicates` keeps."""
    return mark_duplicates(events, window=window).filter("kept").drop("kept")
