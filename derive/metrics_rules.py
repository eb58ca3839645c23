"""The surface-metric rules: accepted metric kinds, per-kind aggregation, monetary kinds, cadence.

The file (default: the packaged ``derive/rules/metrics.toml``) is validated as a whole: a bad file
fails with a ``ConfigError`` naming the key and the value before any database work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from derive.config import parse_duration, read_toml
from derive.errors import ConfigError, UsageError

#: The ``surface_metric_kind`` enum of migration 0002; a rules file may only name these kinds.
METRIC_KINDS: tuple[str, ...] = (
    "profile_view",
    "search_impression",
    "search_rank",
    "click_through",
    "dm_inbound",
    "dm_outbound",
    "reply_rate",
    "subscription_new",
    "subscription_total",
    "tip_amount",
    "tip_count",
    "booking_inquiry",
    "booking_confirmed",
    "gross_revenue",
    "net_revenue",
)

Aggregate = Literal["sum", "mean", "min", "max"]
AGGREGATES: tuple[str, ...] = ("sum", "mean", "min", "max")


@dataclass(frozen=True)
class KindRule:
    """How one metric kind is validated and aggregated across surfaces."""

    name: str
    aggregate: Aggregate
    monetary: bool = False


@dataclass(frozen=True)
class CadenceBand:
    """Windows that ended at most ``max_age`` ago are refreshed every ``refresh_every``."""

    max_age: timedelta
    refresh_every: timedelta


@dataclass(frozen=True)
class MetricsRules:
    """The validated surface-metric rules."""

    version: str
    sha256: str
    kinds: tuple[KindRule, ...]
    cadence: tuple[CadenceBand, ...]
    source: str = field(default="", compare=False)

    @property
    def kind_names(self) -> tuple[str, ...]:
        """The metric kinds the ingestion accepts."""
        return tuple(k.name for k in self.kinds)

    @property
    def monetary_kinds(self) -> tuple[str, ...]:
        """Kinds whose rows need a currency and aggregate only within one currency."""
        return tuple(k.name for k in self.kinds if k.monetary)

    @property
    def final_after(self) -> timedelta:
        """Windows that ended longer ago than this are never refreshed again."""
        return self.cadence[-1].max_age

    @property
    def tag(self) -> str:
        """``version+sha`` short form written into run rows."""
        return f"metrics-{self.version}+{self.sha256[:12]}"


def metrics_rules_path() -> Path:
    """Path of the packaged surface-metric rules file."""
    return Path(str(files("derive.rules").joinpath("metrics.toml")))


def load_metrics_rules(path: Path | str | None = None) -> MetricsRules:
    """Read and validate a surface-metric rules file (default: the packaged one).

    Raises:
        ConfigError: naming the file, the key and the value that is wrong.
    """
    file = Path(path) if path is not None else metrics_rules_path()
    data, sha = read_toml(file)
    return _parse(str(file), data, sha)


def _fail(source: str, key: str, value: object, expected: str) -> ConfigError:
    return ConfigError(
        f"rules file {source!r}: key {key!r} has value {value!r}; expected {expected}"
    )


def _parse(source: str, data: dict[str, Any], sha: str) -> MetricsRules:
    version = data.get("version")
    if not isinstance(version, str) or not version:
        raise _fail(source, "version", version, "a non-empty string")
    kinds_raw = data.get("kinds")
    if not isinstance(kinds_raw, dict) or not kinds_raw:
        raise _fail(source, "kinds", kinds_raw, "a table of metric_kind = { aggregate = ... }")
    kinds = []
    for name, spec in kinds_raw.items():
        if name not in METRIC_KINDS:
            raise _fail(
                source,
                f"kinds.{name}",
                name,
                f"a kind of the database enum: {', '.join(METRIC_KINDS)}",
            )
        if not isinstance(spec, dict):
            raise _fail(
                source, f"kinds.{name}", spec, "a table { aggregate = ..., monetary = ... }"
            )
        aggregate = spec.get("aggregate")
        if aggregate not in AGGREGATES:
            raise _fail(
                source, f"kinds.{name}.aggregate", aggregate, f"one of {', '.join(AGGREGATES)}"
            )
        monetary = spec.get("monetary", False)
        if not isinstance(monetary, bool):
            raise _fail(source, f"kinds.{name}.monetary", monetary, "true or false")
        unknown = sorted(set(spec) - {"aggregate", "monetary"})
        if unknown:
            raise _fail(
                source,
                f"kinds.{name}.{unknown[0]}",
                spec[unknown[0]],
                "only aggregate and monetary",
            )
        kinds.append(KindRule(name, aggregate, monetary))

    bands_raw = data.get("cadence")
    if not isinstance(bands_raw, list) or not bands_raw:
        raise _fail(source, "cadence", bands_raw, "a non-empty array of { max_age, refresh_every }")
    bands: list[CadenceBand] = []
    for i, spec in enumerate(bands_raw):
        if not isinstance(spec, dict):
            raise _fail(source, f"cadence[{i}]", spec, "a table { max_age, refresh_every }")
        max_age = _duration(source, f"cadence[{i}].max_age", spec.get("max_age"))
        every = _duration(source, f"cadence[{i}].refresh_every", spec.get("refresh_every"))
        if bands and max_age <= bands[-1].max_age:
            raise _fail(
                source,
                f"cadence[{i}].max_age",
                spec.get("max_age"),
                "a longer age than the band before (youngest band first)",
            )
        # Ticks of the bands must nest (every tick of a slower band is one of the faster band's):
        # an unchanged aggregate's stale_after is its band's next tick (see
        # derive.transforms.rollup.rollup_clock), which then never moves earlier when the window
        # ages into a slower band.
        if bands and (every <= timedelta(0) or every % bands[-1].refresh_every):
            raise _fail(
                source,
                f"cadence[{i}].refresh_every",
                spec.get("refresh_every"),
                f"a whole multiple of the band before's refresh_every"
                f" ({spec_text(bands[-1].refresh_every)})",
            )
        bands.append(CadenceBand(max_age, every))
    return MetricsRules(version, sha, tuple(kinds), tuple(bands), source)


def spec_text(value: timedelta) -> str:
    """A duration as the rules file writes it (``15m``, ``1h``, ``1d``)."""
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _duration(source: str, key: str, value: object) -> timedelta:
    if not isinstance(value, str):
        raise _fail(source, key, value, "a duration such as 24h, 7d or 15m")
    try:
        return parse_duration(value)
    except UsageError:
        raise _fail(source, key, value, "a duration such as 24h, 7d or 15m") from None
