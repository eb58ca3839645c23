"""Settings and the rules model.

The rules file is parsed into frozen dataclasses and validated as a whole: a bad file fails with a
``ConfigError`` naming the key and the value, before any database work starts.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from derive.errors import ConfigError, UsageError
from derive.rules import canonical_rules_path

STATES: tuple[str, ...] = ("S0", "S1", "S2", "S3", "S4", "S5")
SYSTEM_CATEGORY = "system"

_DURATION = re.compile(r"^\s*(\d+)\s*([dhms])\s*$")
_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
DURATION_FORMS = "a whole number followed by d, h, m or s, e.g. 120d, 36h, 15m, 90s"

#: The allowed ranges of every duration and timestamp the commands take. Any time minus any
#: duration (and plus a few days of cadence) stays a time that Python, Arrow and PostgreSQL all
#: represent, so no window bound can overflow.
MAX_DURATION = timedelta(days=36500)
EARLIEST = datetime(1900, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)
DURATION_RANGE = "from 1s to 36500d (100 years)"
TIMESTAMP_RANGE = "from 1900-01-01 to 9000-01-01 (UTC)"


def parse_duration(text: str) -> timedelta:
    """Parse ``120d``, ``36h``, ``15m`` or ``90s`` into a positive timedelta of at most 100 years.

    Raises:
        UsageError: for anything else, naming the value and the accepted forms or range.
    """
    match = _DURATION.match(text or "")
    if match is None or int(match.group(1)) <= 0:
        raise UsageError(f"invalid duration {text!r}: use {DURATION_FORMS}")
    count, unit = int(match.group(1)), match.group(2)
    # Compared as integers first: timedelta() itself overflows on a long enough digit string.
    if count * _UNIT_SECONDS[unit] > MAX_DURATION.total_seconds():
        raise UsageError(f"duration {text!r} is out of range: use {DURATION_RANGE}")
    return timedelta(**{_UNITS[unit]: count})


SIZE_FORMS = "a positive number followed by a unit, e.g. 256MiB, 2GiB, 1.5G, 512M (K, M, G, T are powers of 1024, KB, MB, GB, TB powers of 1000)"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)\s*$", re.IGNORECASE)
_SIZE_POWERS = {"K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str) -> int:
    """Parse a memory size (``256MiB``, ``2GiB``, ``1.5G``, ``512MB``) into bytes.

    ``K``/``KiB``, ``M``/``MiB``, ... are powers of 1024; ``KB``, ``MB``, ... powers of 1000.

    Raises:
        UsageError: for anything else (zero, negative, unknown unit), naming the value and the
            accepted forms.
    """
    match = _SIZE.match(text or "")
    if match is None:
        raise UsageError(f"invalid memory size {text!r}: use {SIZE_FORMS}")
    number, unit = float(match.group(1)), match.group(2).upper()
    if unit == "B":
        size = number
    else:
        base = 1000 if unit.endswith("B") and not unit.endswith("IB") else 1024
        size = number * base ** _SIZE_POWERS[unit[0]]
    if size < 1 or size > 2**60:
        raise UsageError(f"invalid memory size {text!r}: use {SIZE_FORMS}")
    return int(size)


def machine_memory() -> int:
    """Physical memory of this machine in bytes (MemTotal of /proc/meminfo, else sysconf)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def format_duration(value: timedelta) -> str:
    """Inverse of :func:`parse_duration` for whole units (used in summaries and run rows)."""
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_timestamp(text: str) -> datetime:
    """Parse an ISO-8601 timestamp; a value without a zone is taken as UTC.

    Raises:
        UsageError: when the text is not ISO-8601.
    """
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"invalid timestamp {text!r}: use ISO-8601, e.g. 2026-11-22T08:00:00Z"
        ) from None
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    try:
        in_range = EARLIEST <= value <= LATEST
    except OverflowError:  # an offset that moves 0001-01-01 or 9999-12-31 out of datetime's range
        in_range = False
    if not in_range:
        raise UsageError(f"timestamp {text!r} is out of range: use a time {TIMESTAMP_RANGE}")
    return value


def utc_now() -> datetime:
    """Current time in UTC, truncated to microseconds (PostgreSQL's resolution)."""
    return datetime.now(UTC)


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


def derive_home() -> Path:
    """Data directory for the embedded server: ``DERIVE_HOME`` or the user data dir."""
    env = os.environ.get("DERIVE_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("derive"))


def dsn_from_env(explicit: str | None) -> str | None:
    """The DSN to use: ``--dsn`` first, then ``DERIVE_DSN``; ``None`` means the embedded server."""
    return explicit or os.environ.get("DERIVE_DSN") or None


# --------------------------------------------------------------------------------------------------
# Rules model
# --------------------------------------------------------------------------------------------------

Op = Literal[">=", ">", "<=", "<", "=="]
MetricKind = Literal["score", "count", "sessions"]
OPS: tuple[str, ...] = (">=", ">", "<=", "<", "==")
METRIC_KINDS: tuple[str, ...] = ("score", "count", "sessions")
ONLY_FILTERS: tuple[str, ...] = ("qualified", "consented")


@dataclass(frozen=True)
class Comparison:
    """``metric op value``, one term of a gate clause."""

    metric: str
    op: Op
    value: float


@dataclass(frozen=True)
class Gate:
    """An upgrade step ``from_state -> to_state``; passes when ``min_pass`` clauses hold."""

    id: str
    from_state: str
    to_state: str
    min_pass: int
    clauses: tuple[tuple[Comparison, ...], ...]

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric the gate reads, in first-use order (for rule_trigger evidence)."""
        seen: dict[str, None] = {}
        for clause in self.clauses:
            for term in clause:
                seen.setdefault(term.metric, None)
        return tuple(seen)


@dataclass(frozen=True)
class Downgrade:
    """A retention rule: ``from_state -> to_state`` once inactivity reaches ``inactivity_days``."""

    id: str
    from_state: str
    to_state: str
    inactivity_days: int


@dataclass(frozen=True)
class MetricDef:
    """A per-user metric over valid, deduplicated events (see the rules file for the kinds)."""

    name: str
    kind: MetricKind
    event_types: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    within_days: int | None = None
    only: str | None = None


@dataclass(frozen=True)
class Retention:
    """What ``derive prune`` deletes, by age in days (``None``: kept forever).

    Attributes:
        events_margin_days: non-system events go once older than the longest lookback derive has
            used (and the last full run's window) plus this margin; retention never cuts into a
            lookback.
        system_events_days: audit and validation_fail rows; the audit row a stored state points
            at and every ``subject_erased`` row are always kept.
        payload_days: raw ``payload_jsonb`` of surface_metrics and prospect_touchpoints (the
            amount and currency attribution reads are kept).
        state_history_days: ``audience_state_history`` steps, by their as_of.
        batch_rows: rows per delete transaction (short transactions, short locks).
    """

    events_margin_days: int | None = 30
    system_events_days: int | None = 730
    payload_days: int | None = 90
    state_history_days: int | None = 365
    batch_rows: int = 10_000


@dataclass(frozen=True)
class Rules:
    """The validated rules: catalog, qualification, dedupe, fail-safes, metrics, gates, downgrades."""

    version: str
    sha256: str
    catalog: dict[str, dict[str, float]]
    qualified_event_type: str
    min_duration_seconds: float
    min_scroll_depth_percent: float
    dedupe_window: timedelta
    spike_max_events_per_hour: int
    relog_after: timedelta
    consent_categories: tuple[str, ...]
    metrics: tuple[MetricDef, ...]
    gates: tuple[Gate, ...]
    downgrades: tuple[Downgrade, ...]
    retention: Retention = field(default_factory=Retention)
    source: str = field(default="", compare=False)

    @property
    def event_category(self) -> dict[str, str]:
        """event_type -> its category, over the whole catalog (system included)."""
        return {et: cat for cat, types in self.catalog.items() for et in types}

    @property
    def weights(self) -> dict[str, float]:
        """event_type -> weight, for the scored (non-system) catalog."""
        return {
            et: w
            for cat, types in self.catalog.items()
            if cat != SYSTEM_CATEGORY
            for et, w in types.items()
        }

    @property
    def scored_categories(self) -> tuple[str, ...]:
        """Every catalog category but ``system``."""
        return tuple(c for c in self.catalog if c != SYSTEM_CATEGORY)

    @property
    def score_metric(self) -> str:
        """Name of the metric stored as ``engagement_score`` (the one of kind ``score``)."""
        return next(m.name for m in self.metrics if m.kind == "score")

    @property
    def tag(self) -> str:
        """``version+sha`` short form written into audit rows and run rows."""
        return f"{self.version}+{self.sha256[:12]}"


def load_rules(path: Path | str | None = None) -> Rules:
    """Read and validate a rules file (default: the packaged canonical rules).

    Raises:
        ConfigError: naming the file, the key and the value that is wrong.
    """
    file = Path(path) if path is not None else canonical_rules_path()
    data, sha = read_toml(file)
    return _RulesParser(str(file)).parse(data, sha)


def read_toml(file: Path) -> tuple[dict[str, Any], str]:
    """A rules file's TOML document and the sha256 of its bytes.

    Raises:
        ConfigError: the file cannot be read or is not TOML (naming the file).
    """
    try:
        raw_bytes = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read rules file {str(file)!r}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw_bytes.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"rules file {str(file)!r} is not valid TOML: {exc}") from None
    return data, hashlib.sha256(raw_bytes).hexdigest()


class _RulesParser:
    """Turns the TOML document into :class:`Rules`, naming the key of any bad value."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, value: object, expected: str) -> ConfigError:
        return ConfigError(
            f"rules file {self.source!r}: key {key!r} has value {value!r}; expected {expected}"
        )

    def table(self, data: dict[str, Any], key: str, path: str) -> dict[str, Any]:
        value = data.get(key)
        if not isinstance(value, dict):
            raise self.fail(f"{path}{key}", value, "a table")
        return value

    def number(self, data: dict[str, Any], key: str, path: str, *, minimum: float = 0) -> float:
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise self.fail(f"{path}{key}", value, f"a number >= {minimum}")
        return float(value)

    def text(self, data: dict[str, Any], key: str, path: str) -> str:
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise self.fail(f"{path}{key}", value, "a non-empty string")
        return value

    def state(self, data: dict[str, Any], key: str, path: str) -> str:
        value = data.get(key)
        if value not in STATES:
            raise self.fail(f"{path}{key}", value, f"one of {', '.join(STATES)}")
        return str(value)

    def strings(
        self, data: dict[str, Any], key: str, path: str, allowed: set[str]
    ) -> tuple[str, ...]:
        value = data.get(key, [])
        if not isinstance(value, list) or any(v not in allowed for v in value):
            raise self.fail(f"{path}{key}", value, f"a list drawn from {sorted(allowed)}")
        return tuple(value)

    def parse(self, data: dict[str, Any], sha: str) -> Rules:
        version = self.text(data, "version", "")
        catalog_raw = self.table(data, "catalog", "")
        catalog: dict[str, dict[str, float]] = {}
        seen: dict[str, str] = {}
        for category, types in catalog_raw.items():
            if not isinstance(types, dict) or not types:
                raise self.fail(f"catalog.{category}", types, "a table of event_type = weight")
            catalog[category] = {}
            for event_type, _ in types.items():
                if event_type in seen:
                    raise self.fail(
                        f"catalog.{category}.{event_type}",
                        event_type,
                        f"an event type listed once (already under {seen[event_type]!r})",
                    )
                seen[event_type] = category
                catalog[category][event_type] = self.number(
                    types, event_type, f"catalog.{category}."
                )
        if SYSTEM_CATEGORY not in catalog:
            raise self.fail("catalog.system", None, "the system category with its event types")

        qual = self.table(data, "qualification", "")
        qualified_type = self.text(qual, "event_type", "qualification.")
        if qualified_type not in seen:
            raise self.fail(
                "qualification.event_type", qualified_type, "an event type of the catalog"
            )
        dedupe = self.table(data, "dedupe", "")
        failsafe = self.table(data, "failsafe", "")
        categories = set(catalog) - {SYSTEM_CATEGORY}
        event_types = {et for et, cat in seen.items() if cat != SYSTEM_CATEGORY}

        metrics = self.parse_metrics(self.table(data, "metrics", ""), event_types, categories)
        names = {m.name for m in metrics}
        if sum(m.kind == "score" for m in metrics) != 1:
            raise self.fail(
                "metrics",
                sorted(m.name for m in metrics if m.kind == "score"),
                'exactly one metric of kind "score" (it becomes engagement_score)',
            )
        gates = self.parse_gates(data.get("gates"), names)
        downgrades = self.parse_downgrades(data.get("downgrades"))
        relog_after = timedelta(hours=self.number(failsafe, "relog_after_hours", "failsafe."))
        retention = self.parse_retention(data.get("retention"), relog_after)
        return Rules(
            version=version,
            sha256=sha,
            catalog=catalog,
            qualified_event_type=qualified_type,
            min_duration_seconds=self.number(qual, "min_duration_seconds", "qualification."),
            min_scroll_depth_percent=self.number(
                qual, "min_scroll_depth_percent", "qualification."
            ),
            dedupe_window=timedelta(seconds=self.number(dedupe, "window_seconds", "dedupe.")),
            spike_max_events_per_hour=int(
                self.number(failsafe, "spike_max_events_per_hour", "failsafe.", minimum=1)
            ),
            relog_after=relog_after,
            consent_categories=self.strings(
                failsafe, "consent_categories", "failsafe.", categories
            ),
            metrics=metrics,
            gates=gates,
            downgrades=downgrades,
            retention=retention,
            source=self.source,
        )

    def parse_metrics(
        self, raw: dict[str, Any], event_types: set[str], categories: set[str]
    ) -> tuple[MetricDef, ...]:
        out = []
        for name, spec in raw.items():
            path = f"metrics.{name}."
            if not isinstance(spec, dict):
                raise self.fail(f"metrics.{name}", spec, "a table")
            kind = spec.get("kind")
            if kind not in METRIC_KINDS:
                raise self.fail(f"{path}kind", kind, f"one of {', '.join(METRIC_KINDS)}")
            within = spec.get("within_days")
            if within is not None and (
                isinstance(within, bool) or not isinstance(within, int) or within < 1
            ):
                raise self.fail(f"{path}within_days", within, "a whole number of days >= 1")
            only = spec.get("only")
            if only is not None and only not in ONLY_FILTERS:
                raise self.fail(f"{path}only", only, f"one of {', '.join(ONLY_FILTERS)}")
            out.append(
                MetricDef(
                    name=name,
                    kind=kind,
                    event_types=self.strings(spec, "event_types", path, event_types),
                    categories=self.strings(spec, "categories", path, categories),
                    within_days=within,
                    only=only,
                )
            )
        return tuple(out)

    def parse_gates(self, raw: object, metric_names: set[str]) -> tuple[Gate, ...]:
        if not isinstance(raw, list) or not raw:
            raise self.fail("gates", raw, "a non-empty array of tables")
        gates = []
        for i, spec in enumerate(raw):
            path = f"gates[{i}]."
            if not isinstance(spec, dict):
                raise self.fail(f"gates[{i}]", spec, "a table")
            from_state, to_state = self.state(spec, "from", path), self.state(spec, "to", path)
            if STATES.index(to_state) != STATES.index(from_state) + 1:
                raise self.fail(
                    f"{path}to", to_state, f"the state right after {from_state} (no skipping)"
                )
            clauses_raw = spec.get("clauses")
            if not isinstance(clauses_raw, list) or not clauses_raw:
                raise self.fail(f"{path}clauses", clauses_raw, "a non-empty array of clauses")
            clauses = []
            for j, clause in enumerate(clauses_raw):
                if not isinstance(clause, list) or not clause:
                    raise self.fail(
                        f"{path}clauses[{j}]", clause, "a non-empty array of comparisons"
                    )
                terms = []
                for k, term in enumerate(clause):
                    tpath = f"{path}clauses[{j}][{k}]."
                    if not isinstance(term, dict):
                        raise self.fail(tpath[:-1], term, "a table {metric, op, value}")
                    metric = term.get("metric")
                    if metric not in metric_names:
                        raise self.fail(f"{tpath}metric", metric, f"one of {sorted(metric_names)}")
                    op = term.get("op")
                    if op not in OPS:
                        raise self.fail(f"{tpath}op", op, f"one of {', '.join(OPS)}")
                    terms.append(
                        Comparison(metric, op, self.number(term, "value", tpath, minimum=-1e18))
                    )
                clauses.append(tuple(terms))
            min_pass = spec.get("min_pass", 1)
            if (
                isinstance(min_pass, bool)
                or not isinstance(min_pass, int)
                or not 1 <= min_pass <= len(clauses)
            ):
                raise self.fail(
                    f"{path}min_pass", min_pass, f"a whole number from 1 to {len(clauses)}"
                )
            gates.append(
                Gate(self.text(spec, "id", path), from_state, to_state, min_pass, tuple(clauses))
            )
        chain = [g.from_state for g in gates]
        if chain != list(STATES[: len(gates)]):
            raise self.fail(
                "gates",
                [f"{g.from_state}->{g.to_state}" for g in gates],
                "gates in order S0->S1, S1->S2, ... with no gaps",
            )
        return tuple(gates)

    def parse_retention(self, raw: object, relog_after: timedelta) -> Retention:
        if raw is None:
            return Retention()
        if not isinstance(raw, dict):
            raise self.fail("retention", raw, "a table")
        known = {f for f in Retention.__dataclass_fields__}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise self.fail(f"retention.{unknown[0]}", raw[unknown[0]], f"one of {sorted(known)}")
        defaults = Retention()
        days: dict[str, int | None] = {}
        for key in ("events_margin_days", "system_events_days", "payload_days",
                    "state_history_days"):  # fmt: skip
            value = raw.get(key, getattr(defaults, key))
            if value == "forever" or value is None:
                days[key] = None
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise self.fail(
                    f"retention.{key}", value, 'a whole number of days >= 1 or "forever"'
                )
            else:
                days[key] = value
        system = days["system_events_days"]
        if system is not None and timedelta(days=system) <= relog_after:
            raise self.fail(
                "retention.system_events_days",
                system,
                f"more days than failsafe.relog_after_hours ({relog_after}), which reads them",
            )
        batch = raw.get("batch_rows", defaults.batch_rows)
        if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 1_000_000:
            raise self.fail("retention.batch_rows", batch, "a whole number from 1 to 1000000")
        return Retention(
            events_margin_days=days["events_margin_days"],
            system_events_days=system,
            payload_days=days["payload_days"],
            state_history_days=days["state_history_days"],
            batch_rows=batch,
        )

    def parse_downgrades(self, raw: object) -> tuple[Downgrade, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            raise self.fail("downgrades", raw, "an array of tables")
        out = []
        for i, spec in enumerate(raw):
            path = f"downgrades[{i}]."
            if not isinstance(spec, dict):
                raise self.fail(f"downgrades[{i}]", spec, "a table")
            from_state, to_state = self.state(spec, "from", path), self.state(spec, "to", path)
            if STATES.index(to_state) >= STATES.index(from_state):
                raise self.fail(f"{path}to", to_state, f"a state below {from_state}")
            days = spec.get("inactivity_days")
            if isinstance(days, bool) or not isinstance(days, int) or days < 0:
                raise self.fail(f"{path}inactivity_days", days, "a whole number of days >= 0")
            out.append(Downgrade(self.text(spec, "id", path), from_state, to_state, days))
        return tuple(out)
