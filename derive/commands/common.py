"""What the command modules share: option types, value parsers, the consoles and the printing."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from derive.config import (
    DURATION_FORMS,
    Rules,
    load_rules,
    parse_duration,
    parse_size,
    parse_timestamp,
)
from derive.errors import UsageError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def duration(value: str | None) -> timedelta | None:
    """Parse a duration option (120d, 15m, 36h); a bad value is a usage error."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except UsageError as exc:
        if "out of range" in str(exc):
            raise typer.BadParameter(str(exc)) from None
        raise typer.BadParameter(f"{value!r} is not a duration; use {DURATION_FORMS}") from None


def timestamp(value: str | None) -> datetime | None:
    """Parse an ISO-8601 option; a bad value is a usage error."""
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except UsageError as exc:
        raise typer.BadParameter(str(exc)) from None


DsnOpt = Annotated[
    str | None,
    typer.Option(
        "--dsn",
        envvar="DERIVE_DSN",
        show_envvar=True,
        help="PostgreSQL URL, e.g. postgresql://user@host:5432/db (default: the embedded server).",
    ),
]
RulesOpt = Annotated[
    Path | None,
    typer.Option("--rules", help="Rules file (TOML); default: the packaged canonical rules."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
AsOfOpt = Annotated[
    str | None,
    typer.Option("--as-of", help="Reference time, ISO-8601 (default: now).", metavar="TS"),
]


def rules_from(path: Path | None) -> Rules:
    """Load the rules named by ``--rules`` (or the canonical ones)."""
    return load_rules(path)


def print_json(payload: Any) -> None:
    """Print ``payload`` as JSON on stdout (datetimes as ISO-8601)."""
    sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")


ShardsOpt = Annotated[
    int | None,
    typer.Option(
        "--shards",
        min=1,
        max=4096,
        help="Split a full run's users into this many user_id ranges (default: from the"
        " window's size and --memory-limit).",
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
    timings = "  ".join(f"{k} {v:.2f}s" for k, v in report.timings.items())
    out.print(f"timings: {timings}")


MetricsRulesOpt = Annotated[
    Path | None,
    typer.Option(
        "--rules",
        help="Surface-metric rules (TOML): kinds, aggregation, monetary kinds, cadence; "
        "default: the packaged derive/rules/metrics.toml.",
    ),
]


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A compact rich table."""
    t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
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
