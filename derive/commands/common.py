"""What the command modules share: option types, value parsers, the consoles and the printing."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperArgument, TyperCommand, TyperGroup

from derive.config import (
    DURATION_FORMS,
    Rules,
    load_rules,
    parse_duration,
    parse_size,
    parse_timestamp,
)
from derive.errors import UsageError

if TYPE_CHECKING:
    from derive.jobs.executor import Executor


class _Argument(TyperArgument):
    """An argument shown as man pages show one: ``FILE`` (not ``{FILE}`` or ``FILE <path>``)."""

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name if self.nargs == 1 else f"{name}..."

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


def _no_flag_types(params: list[Any]) -> list[Any]:
    """Help in one style: flags show no ``<bool>`` type, arguments only their metavar."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        if type(param) is TyperArgument:
            param.__class__ = _Argument
    return params


class Command(TyperCommand):
    """A command whose help shows flags without a value type."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _no_flag_types(super().get_params(ctx))


class Group(TyperGroup):
    """A command group whose help shows flags without a value type."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _no_flag_types(super().get_params(ctx))


F = TypeVar("F", bound=Callable[..., None])


def examples(*lines: str) -> Callable[[F], F]:
    """Attach 1-3 example command lines to a command; the wiring shows them at the end of its help."""

    def attach(func: F) -> F:
        func.examples = lines  # type: ignore[attr-defined]
        return func

    return attach


def epilog(func: Any) -> str | None:
    """The help's closing examples of ``func`` (see :func:`examples`), as a markdown block."""
    return epilog_of(*getattr(func, "examples", ()))


def epilog_of(*lines: str) -> str | None:
    """Example command lines as the markdown block that closes a help page."""
    if not lines:
        return None
    return "**Examples**\n\n```\n" + "\n".join(lines) + "\n```"


out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def duration(value: str, option: str) -> timedelta:
    """Parse a duration option (120d, 15m, 36h); a bad value is a usage error naming ``option``."""
    try:
        return parse_duration(value)
    except UsageError as exc:
        if "out of range" in str(exc):
            raise typer.BadParameter(str(exc), param_hint=option) from None
        raise typer.BadParameter(
            f"{value!r} is not a duration: use {DURATION_FORMS}", param_hint=option
        ) from None


def timestamp(value: str | None, option: str) -> datetime | None:
    """Parse an ISO-8601 option (UTC when it has no zone); a bad value is a usage error."""
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except UsageError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


DSN_FORMS = (
    "a URL postgresql://user[:password]@host[:port]/database, or key=value pairs such as "
    "'host=localhost port=5432 dbname=app user=me'"
)
_KEY_VALUE = re.compile(r"^\s*[A-Za-z_]+\s*=")


def dsn(value: str | None) -> str | None:
    """Accept a PostgreSQL URL or a key=value DSN; anything else is a usage error naming both."""
    if not value:
        return None
    from derive.io.connect import redact

    scheme, sep, _ = value.partition("://")
    if sep and scheme.lower() in ("postgresql", "postgres"):
        return value
    if sep:
        raise typer.BadParameter(
            f"{redact(value)!r} is a {scheme} URL, derive needs PostgreSQL: use {DSN_FORMS}"
        )
    if _KEY_VALUE.match(value):
        return value
    raise typer.BadParameter(f"{redact(value)!r} is not a PostgreSQL DSN: use {DSN_FORMS}")


DsnOpt = Annotated[
    str | None,
    typer.Option(
        "--dsn",
        envvar="DERIVE_DSN",
        show_envvar=True,
        callback=dsn,
        metavar="DSN",
        help="PostgreSQL URL, e.g. postgresql://user@host:5432/db, or key=value pairs "
        "(default: the embedded server).",
    ),
]
RulesOpt = Annotated[
    Path | None,
    typer.Option(
        "--rules",
        help="Rules file (TOML); default: the packaged canonical rules.",
        metavar="FILE",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
TIME_FORM = "ISO-8601, e.g. 2026-11-22T08:00:00Z or 2026-11-22; without a zone it is UTC"
AsOfOpt = Annotated[
    str | None,
    typer.Option("--as-of", help=f"Reference time, {TIME_FORM} (default: now).", metavar="TIME"),
]


def rules_from(path: Path | None) -> Rules:
    """Load the rules named by ``--rules`` (or the canonical ones)."""
    return load_rules(path)


def iso(value: Any) -> str:
    """One ISO-8601 form everywhere (2026-11-22T08:00:00+00:00, as isoformat gives it)."""
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value)


def _json_value(value: Any) -> Any:
    return iso(value)


def print_json(payload: Any) -> None:
    """Print ``payload`` as JSON on stdout (datetimes and dates as ISO-8601)."""
    sys.stdout.write(json.dumps(payload, indent=2, default=_json_value) + "\n")


ShardsOpt = Annotated[
    int | None,
    typer.Option(
        "--shards",
        min=1,
        max=4096,
        help="Split a full run's users into this many user_id ranges (default: from the"
        " window's size and --memory-limit).",
        metavar="N",
    ),
]
MemoryLimitOpt = Annotated[
    str | None,
    typer.Option(
        "--memory-limit",
        envvar="DERIVE_MEMORY_LIMIT",
        metavar="SIZE",
        help="Memory a full run may use for one shard's rows, e.g. 256MiB, 2GiB, 1.5G"
        " (default: a quarter of this machine's memory).",
    ),
]


ExecutorOpt = Annotated[
    str,
    typer.Option(
        "--executor",
        metavar="NAME",
        help="Where a full run's shards are derived: local (this process) or ray (Ray tasks;"
        " needs pip install 'derive[ray]'). The write is always one transaction on --dsn.",
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        envvar="RAY_ADDRESS",
        show_envvar=True,
        metavar="ADDRESS",
        help="Ray cluster to join with --executor ray, e.g. 10.0.0.5:6379, or auto (the cluster"
        " running on this machine); default: a local Ray started for the run.",
    ),
]
ReadDsnOpt = Annotated[
    str | None,
    typer.Option(
        "--read-dsn",
        envvar="DERIVE_READ_DSN",
        show_envvar=True,
        metavar="DSN",
        help="Where a full run's shards read (a streaming read replica of --dsn); waited for"
        " until it has replayed the primary's WAL (DERIVE_REPLICA_WAIT seconds, default 60).",
    ),
]


def executor_from(name: str, address: str | None) -> Executor:
    """The executor of ``--executor``/``--ray-address`` (close it when done)."""
    from derive.jobs.executor import EXECUTORS, make_executor

    if name not in EXECUTORS:
        raise typer.BadParameter(
            f"{name!r}: use one of {', '.join(EXECUTORS)}", param_hint="--executor"
        )
    return make_executor(name, address)


def memory_size(value: str | None) -> int | None:
    """Parse a ``--memory-limit`` value; a bad value is a usage error naming the accepted forms."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except UsageError as exc:
        raise typer.BadParameter(str(exc)) from None


UsersOpt = Annotated[
    list[str] | None,
    typer.Option("--user", help="Derive only this user (repeatable).", metavar="UUID"),
]


def uuids(values: list[str] | None) -> list[str]:
    """Normalise ``--user`` values; a value that is not a UUID is a usage error."""
    import uuid

    out_ids = []
    for value in values or []:
        try:
            out_ids.append(str(uuid.UUID(value)))
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not a UUID", param_hint="--user") from None
    return out_ids


def print_run_summary(report: Any) -> None:
    """The one-screen summary of a derivation run."""
    c = report.counts
    head = "dry run (nothing written)" if report.dry_run else f"run {report.run_id}"
    out.print(f"[bold]{report.headline}[/]", markup=True)
    out.print(
        f"[bold]{head}[/]  as_of {report.as_of.isoformat()}  lookback "
        f"{int(report.lookback.total_seconds() // 86400)}d  rules {report.rules_version}"
    )
    invalid = c["events_invalid"]
    rows = [
        ["events read", c["events_read"]],
        ["  invalid", sum(invalid.values())],
        *[[f"    {reason}", n] for reason, n in invalid.items()],
        ["  deduplicated", c["events_deduplicated"]],
        *[
            [label, c[key]]
            for label, key in (
                ("  anonymous (not derived)", "events_anonymous"),
                ("  after as_of (ignored)", "events_future"),
            )
            if c.get(key) is not None  # counted by full runs only
        ],
        ["users evaluated", c["users_evaluated"]],
        *[
            [f"  candidates: {reason}", n]
            for reason, n in c.get("candidates", {}).items()
            if reason != "total" and n
        ],
        [
            "  changed (rows written)" if not report.dry_run else "  would change",
            c["users_changed"],
        ],
        ["  state changes", c["state_changes"]],
        ["  rejected", c["users_rejected"]],
        *[[f"    {reason}", n] for reason, n in c["rejected_by_reason"].items()],
        ["audit rows", c["audit_rows"]],
        ["validation_fail rows", c["rejections_logged"]],
    ]
    out.print(table("", ["counts", ""], rows))
    states = list(report.before)
    out.print(
        table(
            "",
            ["state", *states],
            [
                ["before", *[report.before[s] for s in states]],
                ["after", *[report.after[s] for s in states]],
            ],
        )
    )
    print_timings(report.timings)


def print_timings(timings: dict[str, float]) -> None:
    """One line of per-step seconds; nothing when no step was timed (e.g. a resumed no-op)."""
    if timings:
        out.print("timings: " + "  ".join(f"{k} {v:.2f}s" for k, v in timings.items()))


MetricsRulesOpt = Annotated[
    Path | None,
    typer.Option(
        "--rules",
        help="Surface-metric rules (TOML): kinds, aggregation, monetary kinds, cadence; "
        "default: the packaged derive/rules/metrics.toml.",
        metavar="FILE",
    ),
]


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A compact rich table; its first column (the key: a user id, a name) is never cut short."""
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    key_width = max(
        [len(col) for col in columns[:1]] + [len(str(row[0])) for row in rows if row], default=0
    )
    for i, col in enumerate(columns):
        if i == 0:
            t.add_column(col, justify="left", no_wrap=True, min_width=key_width)
        else:
            t.add_column(col, justify="right")
    for row in rows:
        t.add_row(*[str(v) for v in row])
    return t


def print_verify(result: Any, *, as_json: bool) -> None:
    """``derive run --verify``: equal, or the differing users (first 20; all with ``--json``)."""
    rows = result.differences.to_dicts()
    if as_json:
        print_json(
            {
                "as_of": result.as_of.isoformat(),
                "users_compared": result.users_compared,
                "equal": result.equal,
                "differences": rows,
            }
        )
        return
    if result.equal:
        out.print(
            f"verify as_of {result.as_of.isoformat()}: {result.users_compared} users, stored"
            " states equal a full run"
        )
        return
    out.print(
        f"verify as_of {result.as_of.isoformat()}: {len(rows)} of {result.users_compared} users"
        " differ from a full run" + (" (first 20; --json lists all)" if len(rows) > 20 else "")
    )
    columns = list(rows[0])
    out.print(table("", columns, [[r[c] for c in columns] for r in rows[:20]]))
