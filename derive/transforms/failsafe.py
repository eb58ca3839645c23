"""Fail-safes (SPEC §2.3): users whose data looks wrong are rejected with reasons and evidence.

A rejected user gets no state write this run and one ``validation_fail`` system event, unless an
identical rejection (same reasons) was logged within the relog interval.
"""

from __future__ import annotations

from datetime import timedelta

import polars as pl

from derive.config import Rules

_ISO = "%Y-%m-%dT%H:%M:%S%.6fZ"

REJECTIONS_SCHEMA = pl.Schema(
    {
        "user_id": pl.Binary(),
        "reasons": pl.List(pl.String()),
        "reasons_key": pl.String(),
        "evidence": pl.String(),
    }
)


def _json_evidence(reason: str, fields: list[str]) -> pl.Expr:
    """``"reason": {...}`` as JSON text built from already aggregated columns."""
    return pl.concat_str([pl.lit(f'"{reason}":'), pl.struct(fields).struct.json_encode()]).alias(
        reason
    )


def unknown_categories(classified: pl.LazyFrame, /) -> pl.LazyFrame:
    """Users with events in categories outside the catalog."""
    return (
        classified.filter(pl.col("invalid_reason") == "unknown_category")
        .group_by("user_id")
        .agg(categories=pl.col("event_category").unique().sort(), events=pl.len())
        .select("user_id", _json_evidence("unknown_event_category", ["categories", "events"]))
    )


def missing_consent(valid: pl.LazyFrame, /, *, rules: Rules) -> pl.LazyFrame:
    """Users with a subscription-category event whose metadata lacks a boolean consent_recorded."""
    return (
        valid.filter(
            pl.col("event_category").is_in(list(rules.consent_categories))
            & pl.col("consent_recorded").is_null()
        )
        .group_by("user_id")
        .agg(
            event_types=pl.col("event_type").unique().sort(),
            events=pl.len(),
            first_at=pl.col("created_at").min().dt.to_string(_ISO),
        )
        .select("user_id", _json_evidence("consent_missing", ["event_types", "events", "first_at"]))
    )


def volume_spikes(classified: pl.LazyFrame, /, *, rules: Rules) -> pl.LazyFrame:
    """Users with more than the limit of events in any rolling hour, counted before dedupe.

    Only users with more events in total than the limit can spike, so the rolling count runs on
    those alone.
    """
    limit = rules.spike_max_events_per_hour
    heavy = (
        classified.select("user_id", "created_at")
        .filter(pl.len().over("user_id") > limit)
        .sort("user_id", "created_at")
    )
    per_hour = heavy.rolling(
        index_column="created_at", period=timedelta(hours=1), group_by="user_id"
    ).agg(in_hour=pl.len())
    return (
        per_hour.group_by("user_id")
        .agg(
            peak=pl.col("in_hour").max(),
            peak_end=pl.col("created_at").sort_by("in_hour", descending=True).first(),
        )
        .filter(pl.col("peak") > limit)
        .select(
            "user_id",
            max_events_in_one_hour="peak",
            limit=pl.lit(limit),
            hour_ending_at=pl.col("peak_end").dt.to_string(_ISO),
        )
        .select(
            "user_id",
            _json_evidence("volume_spike", ["max_events_in_one_hour", "limit", "hour_ending_at"]),
        )
    )


def state_jumps(stored: pl.LazyFrame, /) -> pl.LazyFrame:
    """Stored states that disagree with their last audit row (or have none): silent edits."""
    disagrees = (
        pl.col("audit_new_state").is_null()
        | (pl.col("audit_new_state") != pl.col("current_state"))
        | ~pl.col("audit_user_matches").fill_null(False)
    )
    return (
        stored.filter(disagrees)
        .select(
            "user_id",
            stored_state="current_state",
            audited_state="audit_new_state",
            last_audit_id="last_audit_id",
        )
        .select(
            "user_id",
            _json_evidence("state_jump", ["stored_state", "audited_state", "last_audit_id"]),
        )
    )


def rejections(
    classified: pl.LazyFrame, valid: pl.LazyFrame, stored: pl.LazyFrame, /, *, rules: Rules
) -> pl.LazyFrame:
    """One row per rejected user: ``reasons`` (sorted), ``reasons_key`` and ``evidence`` (JSON)."""
    parts = {
        "unknown_event_category": unknown_categories(classified),
        "consent_missing": missing_consent(valid, rules=rules),
        "volume_spike": volume_spikes(classified, rules=rules),
        "state_jump": state_jumps(stored),
    }
    users = pl.concat([p.select("user_id") for p in parts.values()]).unique()
    joined = users
    for frame in parts.values():
        joined = joined.join(frame, on="user_id", how="left")
    names = list(parts)
    reasons = pl.concat_list(
        [pl.when(pl.col(n).is_not_null()).then(pl.lit(n)) for n in names]
    ).list.drop_nulls()
    return joined.select(
        "user_id",
        reasons=reasons,
        reasons_key=reasons.list.join(","),
        evidence=pl.concat_str(
            [
                pl.lit("{"),
                pl.concat_str([pl.col(n) for n in names], separator=",", ignore_nulls=True),
                pl.lit("}"),
            ]
        ),
    )


def to_log(rejected: pl.LazyFrame, recent: pl.LazyFrame, /) -> pl.LazyFrame:
    """Rejections not already logged with the same reasons within the relog interval."""
    return rejected.join(recent, on=["user_id", "reasons_key"], how="anti")
