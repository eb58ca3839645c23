"""A small writer of the OpenMetrics text format (Prometheus text exposition).

Only gauges are written, so the same text is valid OpenMetrics 1.0 and Prometheus text 0.0.4 (whose
parsers read ``# UNIT`` and ``# EOF`` as comments): a node-exporter textfile collector and a push
gateway both accept it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass
class Gauge:
    """One metric family of type gauge and its samples (labels -> value)."""

    name: str
    help: str
    unit: str = ""
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"invalid metric name {self.name!r}")
        if self.unit and not self.name.endswith(f"_{self.unit}"):
            raise ValueError(f"metric {self.name!r} must end with its unit _{self.unit}")

    def add(self, value: float | None, **labels: str) -> Gauge:
        """Add a sample; ``None`` (unknown) adds nothing, so the series is absent."""
        if value is None:
            return self
        for key in labels:
            if not _LABEL.match(key):
                raise ValueError(f"invalid label name {key!r}")
        self.samples.append((labels, float(value)))
        return self


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def render(families: Iterable[Gauge]) -> str:
    """The exposition text of ``families`` (families without samples are left out), ``# EOF`` last."""
    lines: list[str] = []
    for family in families:
        if not family.samples:
            continue
        lines.append(f"# HELP {family.name} {_escape(family.help)}")
        lines.append(f"# TYPE {family.name} gauge")
        if family.unit:
            lines.append(f"# UNIT {family.name} {family.unit}")
        for labels, value in family.samples:
            text = ",".join(f'{key}="{_escape(val)}"' for key, val in labels.items())
            lines.append(
                f"{family.name}{{{text}}} {_number(value)}"
                if text
                else f"{family.name} {_number(value)}"
            )
    lines.append("# EOF")
    return "\n".join(lines) + "\n"
