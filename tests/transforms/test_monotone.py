"""Which rules allow exact incremental runs: each reason a rules file rules them out, alone."""

from __future__ import annotations

from dataclasses import replace

from derive.config import Comparison, Rules, load_rules
from derive.transforms.monotone import non_monotone


def _rules() -> Rules:
    return load_rules()


def test_the_shipped_rules_allow_incremental_runs() -> None:
    assert non_monotone(_rules()) == []


def test_a_negative_weight_rules_them_out() -> None:
    rules = _rules()
    catalog = {cat: dict(types) for cat, types in rules.catalog.items()}
    catalog["engagement"]["content_view"] = -1.0

    assert non_monotone(replace(rules, catalog=catalog)) == [
        "negative weights (content_view) let scores grow with time"
    ]


def test_a_zero_weight_is_not_negative() -> None:
    rules = _rules()
    catalog = {cat: dict(types) for cat, types in rules.catalog.items()}
    catalog["engagement"]["content_view"] = 0.0

    assert non_monotone(replace(rules, catalog=catalog)) == []


def test_a_score_with_a_sub_window_rules_them_out() -> None:
    rules = _rules()
    metrics = tuple(replace(m, within_days=30) if m.kind == "score" else m for m in rules.metrics)

    assert non_monotone(replace(rules, metrics=metrics)) == [
        "the score metric score has within_days = 30: stored scores would change as events age"
        " out of it"
    ]


def test_each_comparison_other_than_greater_rules_them_out_naming_its_gate() -> None:
    rules = _rules()
    first = rules.gates[0]
    term = first.clauses[0][0]
    for op, allowed in ((">=", True), (">", True), ("<=", False), ("<", False), ("==", False)):
        bent = replace(term, op=op)
        gate = replace(first, clauses=((bent, *first.clauses[0][1:]), *first.clauses[1:]))
        problems = non_monotone(replace(rules, gates=(gate, *rules.gates[1:])))
        assert (problems == []) is allowed, op
        if not allowed:
            assert problems == [
                f"gate {first.id} compares {term.metric} {op} {term.value:g}"
                " (only >= and > stay false as metrics shrink with time)"
            ]
    assert isinstance(term, Comparison)
