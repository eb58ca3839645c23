"""``derive report``: the failure dashboard as one self-contained HTML page.

Reads small per-day aggregates (``derive.io.history``), shapes them (``derive.transforms.report``)
and draws every plot as inline SVG generated here: no JavaScript, no fonts or styles fetched, so
the file opens offline and can be mailed or archived as is. Sections: the state funnel S0..S5,
transitions over time (from ``state_change_logged``), rejections by reason over time (from
``validation_fail``), run durations, and the most rejected users with their evidence.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from derive import __version__
from derive.io import history
from derive.io.connect import Db
from derive.schema import REJECT_REASONS
from derive.transforms import report as shape

SECTIONS: tuple[tuple[str, str], ...] = (
    ("funnel", "State funnel"),
    ("scores", "Score distribution"),
    ("states-over-time", "States over time"),
    ("transitions", "Transitions over time"),
    ("rejections", "Rejections by reason over time"),
    ("runs", "Run durations"),
    ("top-rejected", "Most rejected users"),
)

_PALETTE = {
    "first_seen": "#9aa5b1",
    "upgrade": "#2f855a",
    "downgrade": "#c05621",
    "full run": "#2b6cb0",
    "user subset": "#7f9cf5",
    "failed": "#c53030",
    "unknown_event_category": "#805ad5",
    "consent_missing": "#d69e2e",
    "volume_spike": "#e53e3e",
    "state_jump": "#2c7a7b",
}
# What each state means under the canonical rules (derive/rules/canonical.toml), for the reader
# of the page; a rules file of one's own may move the gates.
STATE_MEANINGS: dict[str, str] = {
    "S0": "seen: no gate passed yet (every user enters here)",
    "S1": "engaged: a deep event, or score >= 5 and active, in the last 7 days",
    "S2": "returning: a repeat visit in 30 days, score >= 12, or 2+ sessions with 3+ qualified views",
    "S3": "subscribed: a subscription with consent recorded",
    "S4": "advocate: shared, referred, commented or mentioned within 60 days",
    "S5": "champion: 2 of 3+ advocacy events, score >= 35, 2+ repeat visits, a long-form completion",
}
_STATE_COLORS = ("#a0aec0", "#90cdf4", "#4299e1", "#2b6cb0", "#2c5282", "#1a365d")
_EVIDENCE_CHARS = 1500  # longer evidence is cut (the full text stays in the database)
_EXTRA_COLORS = ("#718096", "#b83280", "#3182ce", "#dd6b20", "#38a169")


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows, already shaped."""

    database: str
    generated_at: datetime
    start: datetime
    end: datetime
    funnel: pl.DataFrame
    transitions: pl.DataFrame
    transition_totals: pl.DataFrame
    rejections: pl.DataFrame
    reasons: list[str]
    runs: pl.DataFrame
    top_rejected: pl.DataFrame
    malformed_rows: int = 0  # system rows of the window left out: their derived_at is not a time
    #: Runs that wrote audience_state and never finished (a write outside derive's protocol).
    unfinished_writers: list[str] = field(default_factory=list)
    anchor: str = "--as-of"  # what the window ends at: --as-of, the latest run's as_of, or now
    scores: pl.DataFrame | None = None  # users per score bin (label, S0..S5)
    states_over_time: pl.DataFrame | None = None  # users per state per history step (as_of, S0..S5)


def collect_report(
    db: Db, *, as_of: datetime | None, days: int, top: int = 20, runs: int = 200
) -> ReportData:
    """Read and shape the dashboard's data for the ``days`` up to ``as_of``.

    Without ``as_of`` the window ends at the as_of of the latest successful derive run (so a
    run made with a past ``--as-of`` shows up), or now when there is none; the header says which.
    """
    now = history.server_now(db)
    latest = None if as_of is not None else history.latest_derive_as_of(db)
    end = as_of or latest or now
    anchor = (
        "--as-of"
        if as_of is not None
        else "the latest derive run's as_of"
        if latest is not None
        else "now (no derive run yet)"
    )
    start = end - timedelta(days=days)
    first_day, last_day = start.date(), end.date()
    distribution = pl.LazyFrame(
        list(history.state_distribution(db).items()),
        schema={"current_state": pl.String(), "users": pl.Int64()},
        orient="row",
    )
    transitions = history.daily_transitions(db, start=start, end=end).lazy()
    rejections = history.daily_rejections(db, start=start, end=end)
    seen = set(rejections.get_column("reason").unique().to_list())
    reasons = [r for r in REJECT_REASONS if r in seen] + sorted(seen - set(REJECT_REASONS))
    return ReportData(
        database=db.label,
        generated_at=now,
        start=start,
        end=end,
        funnel=shape.state_funnel(distribution).collect(),
        transitions=shape.transitions_by_day(transitions, start=first_day, end=last_day).collect(),
        transition_totals=shape.transition_totals(transitions).collect(),
        rejections=shape.rejections_by_day(
            rejections.lazy(), reasons=reasons, start=first_day, end=last_day
        ).collect(),
        reasons=reasons,
        runs=shape.run_series(history.run_durations(db, limit=runs).lazy()).collect(),
        top_rejected=history.top_rejected(db, start=start, end=end, limit=top),
        malformed_rows=history.malformed_system_rows(db, start=start, end=end),
        unfinished_writers=[
            f"{run_id} ({job}, {status}, started by {who}, first write {first:%Y-%m-%d %H:%M})"
            for run_id, job, status, who, first in history.unfinished_writers(db)
        ],
        anchor=anchor,
        scores=_score_bins(db),
        states_over_time=shape.states_over_time(
            history.state_history(db, start=start, end=end).lazy()
        ).collect(),
    )


def _score_bins(db: Db) -> pl.DataFrame:
    """Stored users per score bin: about ten round-width bins from 0 to the top score."""
    top = history.max_score(db)
    ticks = nice_ticks(top, count=10)
    width = ticks[1] - ticks[0]
    bins = max(1, len(ticks) - 1)
    return shape.score_bins(
        history.score_histogram(db, width=width).lazy(), width=width, bins=bins
    ).collect()


def write_report(data: ReportData, path: Path) -> int:
    """Render and write the page atomically (temporary file + rename); returns its size."""
    page = render_html(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(page, encoding="utf-8")
    os.replace(temporary, path)
    return len(page.encode())


# -- SVG ---------------------------------------------------------------------------------------------

_W, _H = 860, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 16, 64


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _color(name: str, index: int) -> str:
    if name in STATE_MEANINGS:
        return _STATE_COLORS[list(STATE_MEANINGS).index(name)]
    return _PALETTE.get(name, _EXTRA_COLORS[index % len(_EXTRA_COLORS)])


def nice_ticks(maximum: float, count: int = 5) -> list[float]:
    """Round axis ticks from 0 to at least ``maximum`` (steps of 1, 2 or 5 times 10^k)."""
    if maximum <= 0:
        return [0.0, 1.0]
    raw = maximum / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    top = math.ceil(maximum / step) * step
    return [i * step for i in range(round(top / step) + 1)]


def _fmt(value: float) -> str:
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:,.2f}" if value < 10 else f"{value:,.1f}"


def _legend(names: Sequence[str], y: float) -> str:
    parts, x = [], float(_LEFT)
    for i, name in enumerate(names):
        parts.append(
            f'<rect x="{x:.0f}" y="{y - 10:.0f}" width="12" height="12" rx="2" '
            f'fill="{_color(name, i)}"/><text x="{x + 17:.0f}" y="{y:.0f}" class="legend">'
            f"{_esc(name)}</text>"
        )
        x += 30 + 7.2 * len(name)
    return "".join(parts)


def _empty_svg(message: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} 80" role="img" '
        f'class="chart empty"><text x="{_W / 2:.0f}" y="45" text-anchor="middle" class="muted">'
        f"{_esc(message)}</text></svg>"
    )


def stacked_bars(
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    unit: str,
    empty: str = "no data in this window",
) -> str:
    """A stacked bar chart (one bar per label, one colour per series) as an SVG element."""
    totals = [sum(values[i] for values in series.values()) for i in range(len(labels))]
    if not labels or max(totals, default=0) <= 0:
        return _empty_svg(empty)
    ticks = nice_ticks(max(totals))
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    scale = plot_h / ticks[-1]
    slot = plot_w / len(labels)
    bar = min(48.0, max(1.0, slot * 0.8))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H + 24}" role="img" '
        f'class="chart" aria-label="{_esc(title)}"><title>{_esc(title)}</title>'
    ]
    for t in ticks:
        y = _TOP + plot_h - t * scale
        out.append(
            f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
            f"{_fmt(t)}</text>"
        )
    out.append(
        f'<text x="14" y="{_TOP + plot_h / 2:.0f}" class="tick" text-anchor="middle" '
        f'transform="rotate(-90 14 {_TOP + plot_h / 2:.0f})">{_esc(unit)}</text>'
    )
    every = max(1, math.ceil(len(labels) / 16))
    for i, label in enumerate(labels):
        x = _LEFT + i * slot + (slot - bar) / 2
        base = float(_TOP + plot_h)
        for k, (name, values) in enumerate(series.items()):
            value = values[i]
            if value <= 0:
                continue
            h = value * scale
            base -= h
            out.append(
                f'<rect x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{_color(name, k)}"><title>{_esc(label)} · {_esc(name)}: '
                f"{_fmt(value)}</title></rect>"
            )
        if i % every == 0:
            lx = x + bar / 2
            ly = _TOP + plot_h + 12
            out.append(
                f'<text x="{lx:.1f}" y="{ly:.0f}" class="tick" text-anchor="end" '
                f'transform="rotate(-40 {lx:.1f} {ly:.0f})">{_esc(label)}</text>'
            )
    out.append(
        f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h}" '
        'class="axis"/>'
    )
    out.append(_legend(list(series), _H + 16))
    out.append("</svg>")
    return "".join(out)


def funnel_svg(funnel: pl.DataFrame) -> str:
    """Horizontal funnel: users who reached at least each state, with the share of all users."""
    rows = funnel.to_dicts()
    largest = max((r["reached"] for r in rows), default=0)
    if largest <= 0:
        return _empty_svg("no stored states yet: run `derive run`")
    row_h, label_w, width = 38, 70, _W - 70 - 220
    height = row_h * len(rows) + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {height}" role="img" '
        'class="chart" aria-label="State funnel"><title>State funnel S0..S5</title>'
    ]
    for i, r in enumerate(rows):
        y = 5 + i * row_h
        w = max(1.0, width * r["reached"] / largest) if r["reached"] else 0.0
        x = label_w + (width - w) / 2
        shade = 0.35 + 0.65 * (i + 1) / len(rows)
        out.append(
            f'<text x="{label_w - 10}" y="{y + row_h / 2 + 4:.0f}" text-anchor="end" '
            f'class="label">{_esc(r["state"])}</text>'
            f'<rect x="{x:.1f}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" rx="3" '
            f'fill="#2b6cb0" fill-opacity="{shade:.2f}"><title>{_esc(r["state"])}: '
            f"{r['reached']:,} reached, {r['users']:,} there now</title></rect>"
            f'<text x="{label_w + width + 12}" y="{y + row_h / 2 + 4:.0f}" class="label">'
            f"{r['reached']:,} reached ({100 * r['share_reached']:.1f} %) · {r['users']:,} now"
            "</text>"
        )
    out.append("</svg>")
    return "".join(out)


# -- HTML --------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1a202c;
margin:0;background:#f7fafc}
header{background:#1a365d;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;opacity:.85}
nav{padding:8px 28px;background:#e2e8f0}
nav a{margin-right:16px;color:#2a4365;text-decoration:none}
main{padding:8px 28px 40px;max-width:1000px}
section{background:#fff;border:1px solid #e2e8f0;border-radius:6px;padding:14px 18px;
margin:16px 0}
section h2{margin:0 0 8px;font-size:17px}
.chart{width:100%;height:auto;display:block}
.grid{stroke:#edf2f7}.axis{stroke:#a0aec0}
.tick{font-size:11px;fill:#4a5568}.legend,.label{font-size:12px;fill:#2d3748}
.muted{fill:#718096;color:#718096}
.warn{color:#feb2b2;font-weight:600;margin-top:6px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #edf2f7;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
pre{margin:0;white-space:pre-wrap;word-break:break-all;font-size:12px;max-width:480px;
max-height:12em;overflow:auto}
details summary{cursor:pointer;color:#2a4365}
.failed{color:#c53030;font-weight:600}
"""


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    head = "".join(
        f'<th class="num">{_esc(c)}</th>' if i in numeric else f"<th>{_esc(c)}</th>"
        for i, c in enumerate(columns)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _evidence(text: str | None) -> str:
    """Evidence folded behind a one-line summary, scrolling in a short box, cut when long."""
    if not text:
        return ""
    try:
        parsed = json.loads(text)
        pretty = json.dumps(parsed, indent=1, sort_keys=True)
        keys = ", ".join(sorted(parsed)) if isinstance(parsed, dict) else type(parsed).__name__
    except (ValueError, RecursionError):  # stored text: shown as it is when it does not parse
        pretty, keys = text, "text"
    if len(pretty) > _EVIDENCE_CHARS:
        pretty = (
            f"{pretty[:_EVIDENCE_CHARS]}\n... ({len(pretty) - _EVIDENCE_CHARS:,} more characters)"
        )
    summary = keys if len(keys) <= 60 else keys[:57] + "..."
    return f"<details><summary>{_esc(summary)}</summary><pre>{_esc(pretty)}</pre></details>"


def _section(anchor: str, title: str, body: str, note: str = "") -> str:
    caption = f'<p class="muted">{_esc(note)}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{_esc(title)}</h2>{caption}{body}</section>'


def _state_series(frame: pl.DataFrame) -> dict[str, list[float]]:
    return {state: frame.get_column(state).to_list() for state in STATE_MEANINGS}


def render_html(data: ReportData) -> str:
    """The whole page as one string."""
    titles = dict(SECTIONS)
    days = [d.isoformat() for d in data.transitions.get_column("day").to_list()]
    transitions = stacked_bars(
        days,
        {k: data.transitions.get_column(k).to_list() for k in shape.TRANSITION_KINDS},
        title="Audit steps per day",
        unit="state steps",
    )
    totals = (
        _table(
            ["step", "kind", "count"],
            [[_esc(s), _esc(k), f"{n:,}"] for s, k, n in data.transition_totals.iter_rows()],
            {2},
        )
        if data.transition_totals.height
        else ""
    )
    rejections = stacked_bars(
        [d.isoformat() for d in data.rejections.get_column("day").to_list()],
        {r: data.rejections.get_column(r).to_list() for r in data.reasons},
        title="validation_fail rows per day by reason",
        unit="rejections logged",
        empty="no rejections logged in this window",
    )
    run_labels = [
        f"{t:%m-%d %H:%M} {j}" for t, j in data.runs.select("started_at", "label").iter_rows()
    ]
    run_series = {
        name: [
            s if k == name else 0.0 for s, k in data.runs.select("seconds", "series").iter_rows()
        ]
        for name in ("full run", "user subset", "failed")
        if name in set(data.runs.get_column("series").to_list())
    }
    runs = stacked_bars(
        run_labels, run_series, title="Run wall time", unit="seconds", empty="no finished runs"
    )
    top_rows = [
        [
            f"<code>{_esc(r['user_id'])}</code>",
            f"{r['rejections']:,}",
            _esc(r["reasons"] or ""),
            _esc(r["current_state"] or "none"),
            _esc(f"{r['last_derived_at']:%Y-%m-%d %H:%M}" if r["last_derived_at"] else ""),
            _evidence(r["evidence"]),
        ]
        for r in data.top_rejected.iter_rows(named=True)
    ]
    top = (
        _table(
            ["user", "rejections", "reasons (latest)", "stored state", "last as_of", "evidence"],
            top_rows,
            {1},
        )
        if top_rows
        else '<p class="muted">no rejected users in this window</p>'
    )
    window = f"{data.start:%Y-%m-%d %H:%M} to {data.end:%Y-%m-%d %H:%M} UTC"
    malformed = (
        f'<p class="warn">{data.malformed_rows:,} state_change_logged / validation_fail rows '
        "written in this window have a derived_at that is not a time; they are left out of "
        "every chart (not written by derive: look for another writer with service_role).</p>"
        if data.malformed_rows
        else ""
    )
    if data.unfinished_writers:
        malformed += (
            '<p class="warn">audience_state was written by runs that never finished, outside '
            "derive's own protocol (forged or manual writes): "
            + "; ".join(_esc(r) for r in data.unfinished_writers)
            + ". Check the states with <code>derive run --verify</code>.</p>"
        )
    meanings = _table(
        ["state", "meaning (canonical rules)", "users now"],
        [
            [_esc(r["state"]), _esc(STATE_MEANINGS.get(r["state"], "")), f"{r['users']:,}"]
            for r in data.funnel.iter_rows(named=True)
        ],
        {2},
    )
    scores = data.scores
    score_chart = (
        stacked_bars(
            scores.get_column("label").to_list(),
            _state_series(scores),
            title="Stored users per engagement score",
            unit="users",
            empty="no stored states yet: run `derive run`",
        )
        if scores is not None
        else _empty_svg("no stored states yet: run `derive run`")
    )
    history_frame = data.states_over_time
    over_time = (
        stacked_bars(
            [f"{t:%Y-%m-%d %H:%M}" for t in history_frame.get_column("as_of").to_list()],
            _state_series(history_frame),
            title="Users per state at each history step",
            unit="users",
        )
        if history_frame is not None and history_frame.height
        else _empty_svg(
            "no state history in this window: `derive backfill --table audience_state_history`"
        )
    )
    sections = [
        _section(
            "funnel",
            titles["funnel"],
            funnel_svg(data.funnel) + meanings,
            "Users who reached at least each state (stored audience_state, now).",
        ),
        _section(
            "scores",
            titles["scores"],
            score_chart,
            "Stored users by engagement score (the score of their latest run), coloured by state.",
        ),
        _section(
            "states-over-time",
            titles["states-over-time"],
            over_time,
            f"Users per state at each step of audience_state_history (derive backfill), {window}.",
        ),
        _section(
            "transitions",
            titles["transitions"],
            transitions + totals,
            f"state_change_logged rows by derived_at day, {window}.",
        ),
        _section(
            "rejections",
            titles["rejections"],
            rejections,
            f"validation_fail rows by derived_at day; an identical rejection is logged at most "
            f"once per relog interval. {window}.",
        ),
        _section(
            "runs",
            titles["runs"],
            runs,
            f"The last {data.runs.height} finished runs of every job (skipped runs left out).",
        ),
        _section(
            "top-rejected",
            titles["top-rejected"],
            top,
            f"By validation_fail rows in the window, with the latest reasons and evidence. {window}.",
        ),
    ]
    nav = "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t in SECTIONS)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>derive report · {_esc(data.database)}</title><style>{_CSS}</style></head>"
        f"<body><header><h1>derive · audience-state dashboard</h1><p>{_esc(data.database)} · "
        f"window {_esc(window)}, ending at {_esc(data.anchor)} · generated {data.generated_at:%Y-%m-%d %H:%M:%S} UTC by derive "
        f"{_esc(__version__)}</p>{malformed}</header><nav>{nav}</nav><main>{''.join(sections)}</main>"
        "</body></html>\n"
    )
