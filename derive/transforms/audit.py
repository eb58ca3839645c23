"""The diff against stored state and the audit rows (SPEC §2.6 "Audit" and "Write").

For a net change prior -> new, one audit row per level step on the path: ``first_seen`` for a new
user (null -> S0), then each gate climbed, then each retention rule applied, in that order. Each
row's ``rule_trigger`` is JSON naming the gate or rule and the metric values that fired it. No net
change, no audit row.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl

from derive.config import STATES, Rules
from derive.transforms.states import state_index, state_name

AUDIT_SCHEMA = pl.Schema(
    {
        "user_id": pl.Binary(),
        "step": pl.Int32(),
        "steps": pl.Int32(),
        "prior_state": pl.String(),
        "new_state": pl.String(),
        "rule_id": pl.String(),
        "rule_trigger": pl.String(),
    }
)


def _changed_state() -> pl.Expr:
    return pl.col("prior_state").is_null() | (pl.col("prior_state") != pl.col("new_state"))


def _gate_triggers(rules: Rules) -> list[pl.Expr]:
    """Per gate, the JSON evidence: rule id, clauses passed, and every metric the gate reads."""
    return [
        pl.struct(
            rule=pl.lit(g.id),
            clauses_passed=pl.col(f"passed_{g.id}"),
            clauses_needed=pl.lit(g.min_pass),
            metrics=pl.struct([pl.col(m) for m in g.metrics]),
        )
        .struct.json_encode()
        .alias(f"_trigger_{k}")
        for k, g in enumerate(rules.gates)
    ]


def audit_rows(evaluated: pl.LazyFrame, /, *, rules: Rules) -> pl.LazyFrame:
    """The ``state_change_logged`` rows of every user whose state changed, in path order."""
    changed = evaluated.filter(_changed_state()).with_columns(
        _prior=state_index("prior_state"), _climbed=state_index("climbed_state")
    )
    first_seen = changed.filter(pl.col("_prior").is_null()).select(
        "user_id",
        _seq=pl.lit(0, pl.Int32()),
        prior_state=pl.lit(None, pl.String()),
        new_state=pl.lit(STATES[0]),
        rule_id=pl.lit("first_seen"),
        rule_trigger=pl.lit('{"rule":"first_seen"}'),
    )
    start = pl.col("_prior").fill_null(0)
    climbs = (
        changed.with_columns(*_gate_triggers(rules), _k=pl.int_ranges(start, pl.col("_climbed")))
        .explode("_k")
        .filter(pl.col("_k").is_not_null())
    )
    trigger: pl.Expr = pl.lit(None, pl.String())
    gate_id: pl.Expr = pl.lit(None, pl.String())
    for k, g in enumerate(rules.gates):
        trigger = pl.when(pl.col("_k") == k).then(pl.col(f"_trigger_{k}")).otherwise(trigger)
        gate_id = pl.when(pl.col("_k") == k).then(pl.lit(g.id)).otherwise(gate_id)
    climbs = climbs.select(
        "user_id",
        _seq=(pl.col("_k") - start + 1).cast(pl.Int32()),
        prior_state=state_name(pl.col("_k")),
        new_state=state_name(pl.col("_k") + 1),
        rule_id=gate_id,
        rule_trigger=trigger,
    )
    downs = []
    climbed_steps = pl.col("_climbed") - start
    for i in range(len(STATES) - 1 if rules.downgrades else 0):
        before = pl.col(f"down_{i - 1}_to") if i else pl.col("_climbed")
        downs.append(
            changed.filter(pl.col(f"down_{i}_rule").is_not_null()).select(
                "user_id",
                _seq=(climbed_steps + 1 + i).cast(pl.Int32()),
                prior_state=state_name(before),
                new_state=state_name(pl.col(f"down_{i}_to")),
                rule_id=pl.col(f"down_{i}_rule"),
                rule_trigger=pl.struct(
                    rule=pl.col(f"down_{i}_rule"),
                    inactivity_days=pl.col("inactivity_days"),
                    last_activity_at=pl.col("last_activity_at").dt.to_string(
                        "%Y-%m-%dT%H:%M:%S%.6fZ"
                    ),
                ).struct.json_encode(),
            )
        )
    rows = pl.concat([first_seen, climbs, *downs], how="vertical")
    return (
        rows.sort("user_id", "_seq")
        .with_columns(
            step=(pl.int_range(pl.len()).over("user_id") + 1).cast(pl.Int32()),
            steps=pl.len().over("user_id").cast(pl.Int32()),
        )
        .select(list(AUDIT_SCHEMA.names()))
    )


def state_writes(
    evaluated: pl.LazyFrame, audit: pl.LazyFrame, /, *, as_of: datetime, rules: Rules
) -> pl.LazyFrame:
    """Rows to upsert into ``audience_state``: users whose state, score or last type changed.

    ``state_updated_at`` moves to ``as_of`` only when the state changes. ``last_rule_trigger`` and
    ``audit_steps`` describe the user's last audit step (null / 0 when the state did not change; the
    write then keeps the stored trigger and audit pointer).
    """
    last_step = audit.filter(pl.col("step") == pl.col("steps")).select(
        "user_id", last_rule_trigger="rule_trigger", audit_steps="steps"
    )
    state_changed = _changed_state()
    score = pl.col(rules.score_metric)
    differs = (
        state_changed
        | pl.col("stored_score").is_null()
        | (score != pl.col("stored_score"))
        | pl.col("last_event_type").ne_missing(pl.col("stored_last_event_type"))
    )
    return (
        evaluated.filter(differs)
        .join(last_step, on="user_id", how="left")
        .select(
            "user_id",
            current_state="new_state",
            state_changed=state_changed,
            state_updated_at=pl.when(state_changed)
            .then(pl.lit(as_of))
            .otherwise(pl.col("stored_state_updated_at")),
            engagement_score=score,
            last_event_type="last_event_type",
            last_activity_at="last_activity_at",
            last_rule_trigger="last_rule_trigger",
            audit_steps=pl.col("audit_steps").fill_null(0),
            metrics=pl.struct([pl.col(m.name) for m in rules.metrics]).struct.json_encode(),
        )
    )
