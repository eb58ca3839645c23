"""Whether a rules file allows exact incremental runs (SPEC §2.10).

An incremental run skips every user with no new rows, no event crossing a window edge and no
retention threshold crossed. That is exact only if, for such a user, time passing can never make
a gate pass that failed: every metric a gate reads may only shrink as events age out of its
sub-window (counts, distinct sessions, scores of non-negative weights), and every comparison
must be ``>=`` or ``>`` (a shrinking metric never starts to satisfy them). The stored score must
also not move with time alone, so the score metric may not have a sub-window of its own.
"""

from __future__ import annotations

from derive.config import Rules

MONOTONE_OPS = (">=", ">")


def non_monotone(rules: Rules, /) -> list[str]:
    """Why ``rules`` rule out incremental runs, one sentence per offending term; empty when fine."""
    problems: list[str] = []
    for gate in rules.gates:
        for clause in gate.clauses:
            for term in clause:
                if term.op not in MONOTONE_OPS:
                    problems.append(
                        f"gate {gate.id} compares {term.metric} {term.op} {term.value:g}"
                        " (only >= and > stay false as metrics shrink with time)"
                    )
    negative = sorted(t for t, w in rules.weights.items() if w < 0)
    if negative:
        problems.append(f"negative weights ({', '.join(negative)}) let scores grow with time")
    score = next(m for m in rules.metrics if m.kind == "score")
    if score.within_days is not None:
        problems.append(
            f"the score metric {score.name} has within_days = {score.within_days}: stored scores"
            " would change as events age out of it"
        )
    return problems
