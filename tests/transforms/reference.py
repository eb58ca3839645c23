"""Plain-Python reference implementations of SPEC rules, written for clarity, not speed.

The property tests check the vectorised transforms against these loops on random inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from derive.config import STATES, Rules


def dedupe_kept(rows: Iterable[Mapping[str, Any]], *, window: timedelta) -> dict[bytes, bool]:
    """SPEC §2.4 as the obvious loop: event id -> kept.

    Per (user_id, event_type, session_id) group (a null session is a group of its own), in
    (created_at, id) order: keep the first event and every event at least ``window`` after the most
    recent kept one.
    """
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        key = (row["user_id"], row["event_type"], row["session_id"])
        groups.setdefault(key, []).append(row)
    kept: dict[bytes, bool] = {}
    for members in groups.values():
        last_kept: datetime | None = None
        for row in sorted(members, key=lambda r: (r["created_at"], r["id"])):
            keep = last_kept is None or row["created_at"] - last_kept >= window
            if keep:
                last_kept = row["created_at"]
            kept[row["id"]] = keep
    return kept


def _comparison_holds(value: float, op: str, threshold: float) -> bool:
    return {
        ">=": value >= threshold,
        ">": value > threshold,
        "<=": value <= threshold,
        "<": value < threshold,
        "==": value == threshold,
    }[op]


def gate_passes(gate_index: int, metrics: Mapping[str, float], rules: Rules) -> bool:
    """Whether gate ``gate_index`` (S_k -> S_k+1) passes on these metric values."""
    gate = rules.gates[gate_index]
    held = sum(
        all(_comparison_holds(metrics[t.metric], t.op, t.value) for t in clause)
        for clause in gate.clauses
    )
    return held >= gate.min_pass


@dataclass(frozen=True)
class Step:
    """One level step of a user's path: from, to and the gate or rule that caused it."""

    prior_state: str | None
    new_state: str
    rule_id: str


def state_path(
    prior: str | None, metrics: Mapping[str, float], inactivity_days: int, rules: Rules
) -> list[Step]:
    """SPEC §2.6 one user at a time: first_seen, climb gate by gate, then the retention cascade.

    Returns the audit steps: none when a stored user ends where it started (no net change), even
    if it climbed and fell back within the run.
    """
    stored = prior
    steps: list[Step] = []
    if prior is None:
        steps.append(Step(None, STATES[0], "first_seen"))
        prior = STATES[0]
    level = STATES.index(prior)
    while level < len(rules.gates) and gate_passes(level, metrics, rules):
        steps.append(Step(STATES[level], STATES[level + 1], rules.gates[level].id))
        level += 1
    applied = True
    while applied:
        applied = False
        for rule in rules.downgrades:
            if STATES[level] == rule.from_state and inactivity_days >= rule.inactivity_days:
                target = STATES.index(rule.to_state)
                steps.append(Step(STATES[level], rule.to_state, rule.id))
                level = target
                applied = True
                break
    if stored is not None and STATES[level] == stored:
        return []
    return steps
