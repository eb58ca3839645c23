"""The stateful state machine (SPEC §2.6), for every user at once.

``new_state = downgrade(upgrade(prior))``: start at the stored state (S0 for a new user), climb while
the next gate passes (several levels in one run), then apply the retention rules as a cascade until
none applies. Gates and rules come from the rules file; the number of expressions depends on the
number of gates and states, never on the number of users.
"""

from __future__ import annotations

from datetime import datetime

import polars as pl

from derive.config import STATES, Gate, Rules
from derive.transforms.metrics import LAST_EVENT_TYPE, LATEST_EVENT_AT

NEVER_ACTIVE_DAYS = 999
_OPS = {
    ">=": lambda c, v: c >= v,
    ">": lambda c, v: c > v,
    "<=": lambda c, v: c <= v,
    "<": lambda c, v: c < v,
    "==": lambda c, v: c == v,
}


def state_index(column: str) -> pl.Expr:
    """``S3`` -> 3 (null stays null)."""
    return pl.col(column).replace_strict(
        {s: i for i, s in enumerate(STATES)}, default=None, return_dtype=pl.Int8
    )


def state_name(expr: pl.Expr) -> pl.Expr:
    """3 -> ``S3``."""
    return expr.replace_strict(dict(enumerate(STATES)), default=None, return_dtype=pl.String)


def clauses_passed(gate: Gate) -> pl.Expr:
    """How many of the gate's clauses hold (a clause holds when all its comparisons do)."""
    return pl.sum_horizontal(
        [
            pl.all_horizontal([_OPS[t.op](pl.col(t.metric), t.value) for t in clause]).cast(pl.Int8)
            for clause in gate.clauses
        ]
    )


def _gate_col(k: int) -> str:
    return f"_gate_{k}"


def evaluate(
    metrics: pl.LazyFrame, stored: pl.LazyFrame, /, *, as_of: datetime, rules: Rules
) -> pl.LazyFrame:
    """Every evaluated user (events in the window or a stored state) with prior and new state.

    Output columns: ``user_id``, ``prior_state`` (null for a new user), ``climbed_state``,
    ``new_state``, the rules' metrics, ``passed_<gate>`` clause counts, ``last_event_type``,
    ``last_activity_at``, ``inactivity_days``, ``down_<i>_rule`` / ``down_<i>_to`` for each
    applied retention step, and the stored columns prefixed ``stored_``.
    """
    metric_names = [m.name for m in rules.metrics]
    stored_cols = stored.select(
        "user_id",
        prior_state=pl.col("current_state"),
        stored_score=pl.col("engagement_score"),
        stored_last_event_type=pl.col("last_event_type"),
        stored_last_activity_at=pl.col("last_activity_at"),
        stored_state_updated_at=pl.col("state_updated_at"),
        stored_last_audit_id=pl.col("last_audit_id"),
    )
    users = metrics.join(stored_cols, on="user_id", how="full", coalesce=True)
    last_activity = pl.max_horizontal(LATEST_EVENT_AT, "stored_last_activity_at")
    frame = users.with_columns(
        [pl.col(m).fill_null(0) for m in metric_names],
        last_event_type=pl.coalesce(LAST_EVENT_TYPE, "stored_last_event_type"),
        last_activity_at=last_activity,
        inactivity_days=pl.when(last_activity.is_null())
        .then(NEVER_ACTIVE_DAYS)
        .otherwise((pl.lit(as_of) - last_activity).dt.total_days())
        .cast(pl.Int64),
        _prior=state_index("prior_state").fill_null(0),
    ).with_columns([clauses_passed(g).alias(f"passed_{g.id}") for g in rules.gates])
    # run_k: how many consecutive gates pass starting at gate k (gate k lifts S_k to S_k+1).
    n = len(rules.gates)
    frame = frame.with_columns(
        [
            (pl.col(f"passed_{g.id}") >= g.min_pass).alias(_gate_col(k))
            for k, g in enumerate(rules.gates)
        ]
    )
    run: pl.Expr = pl.lit(0, dtype=pl.Int8)
    runs: dict[int, pl.Expr] = {n: run}
    for k in range(n - 1, -1, -1):
        run = pl.when(pl.col(_gate_col(k))).then(runs[k + 1] + 1).otherwise(0).cast(pl.Int8)
        runs[k] = run
    climb = pl.lit(0, dtype=pl.Int8)
    for k in range(n):
        climb = pl.when(pl.col("_prior") == k).then(runs[k]).otherwise(climb)
    frame = frame.with_columns(_climbed=(pl.col("_prior") + climb).cast(pl.Int8))
    frame = _cascade(frame, rules)
    return frame.with_columns(
        climbed_state=state_name(pl.col("_climbed")),
        new_state=state_name(pl.col("_current")),
    ).drop([_gate_col(k) for k in range(n)] + ["_prior", "_climbed", "_current"])


def _cascade(frame: pl.LazyFrame, rules: Rules) -> pl.LazyFrame:
    """Apply retention rules until none applies; record each step as ``down_<i>_rule/_to``.

    Each step lowers the state, so at most ``len(STATES) - 1`` steps can happen.
    """
    frame = frame.with_columns(_current=pl.col("_climbed"))
    if not rules.downgrades:
        return frame
    for i in range(len(STATES) - 1):
        rule_id: pl.Expr = pl.lit(None, dtype=pl.String)
        target: pl.Expr = pl.lit(None, dtype=pl.Int8)
        for rule in reversed(rules.downgrades):  # first matching rule in file order wins
            applies = (pl.col("_current") == STATES.index(rule.from_state)) & (
                pl.col("inactivity_days") >= rule.inactivity_days
            )
            rule_id = pl.when(applies).then(pl.lit(rule.id)).otherwise(rule_id)
            target = (
                pl.when(applies)
                .then(pl.lit(STATES.index(rule.to_state), pl.Int8))
                .otherwise(target)
            )
        frame = frame.with_columns(
            rule_id.alias(f"down_{i}_rule"), target.alias(f"down_{i}_to")
        ).with_columns(_current=pl.coalesce(f"down_{i}_to", "_current"))
    return frame
