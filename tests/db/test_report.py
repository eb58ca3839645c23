"""``derive report``: a self-contained HTML dashboard that renders in a real headless browser."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import psycopg
import pytest
from polars.testing import assert_frame_equal

from derive.config import load_rules
from derive.io.connect import connect
from derive.jobs.demo import load_demo_data
from derive.jobs.derivation import run_derivation
from derive.jobs.report import (
    SECTIONS,
    STATE_MEANINGS,
    _evidence,
    collect_report,
    nice_ticks,
    render_html,
    write_report,
)
from derive.transforms.report import state_funnel, transition_totals, transitions_by_day

AS_OF = datetime(2026, 6, 30, tzinfo=UTC)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


@pytest.fixture
def dashboard_dsn(dsn: str) -> str:
    """Demo data (with dirt, so there are rejections) derived at three daily as-of points."""
    rules = load_rules()
    with connect(dsn) as db:
        load_demo_data(db, users=200, as_of=AS_OF, rules=rules, seed=3, dirty=True)
        for days_before in (2, 1, 0):
            run_derivation(
                db,
                as_of=AS_OF - timedelta(days=days_before),
                lookback=timedelta(days=120),
                rules=rules,
            )
    return dsn


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    assert binary is not None, "chromium is required: apt-get install -y chromium"
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def console_messages(stderr: str) -> list[str]:
    """Lines chromium logs for the page's console (errors, failed loads, exceptions)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def write(dsn: str, path: Path, *, days: int = 30) -> Path:
    with connect(dsn) as db:
        data = collect_report(db, as_of=AS_OF, days=days)
    write_report(data, path)
    return path


@pytest.mark.browser
def test_report_renders_in_headless_chromium_without_console_errors(
    dashboard_dsn: str, tmp_path: Path
) -> None:
    page = write(dashboard_dsn, tmp_path / "report.html")

    dumped = chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri())
    shot = tmp_path / "report.png"
    captured = chromium(tmp_path, "--window-size=1100,2600", f"--screenshot={shot}", page.as_uri())

    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert console_messages(dumped.stderr) == []
    for anchor, title in SECTIONS:
        assert f'id="{anchor}"' in dumped.stdout
        assert f"<h2>{title}</h2>" in dumped.stdout
    assert dumped.stdout.count("<svg") == 6
    assert captured.returncode == 0, captured.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 50_000


# Elements HTML closes on its own: no end tag, or an optional one.
VOID = frozenset({"meta", "br", "hr", "img", "input", "link", "wbr", "col", "source"})


class Outline(HTMLParser):
    """Parses a page the way a browser reads it and records its outline and any broken nesting."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.problems: list[str] = []
        self.ids: list[str] = []
        self.headings: list[str] = []
        self.svgs = 0
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids += [value for name, value in attrs if name == "id" and value]
        self.svgs += tag == "svg"
        self._in_h2 = tag == "h2"
        if tag == "h2":
            self.headings.append("")
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids += [value for name, value in attrs if name == "id" and value]

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2 = False
        if not self.open or self.open[-1] != tag:
            self.problems.append(f"</{tag}> closes <{self.open[-1] if self.open else '-'}>")
            return
        self.open.pop()

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.headings[-1] += data


def test_report_parses_as_html_with_every_section(dashboard_dsn: str, tmp_path: Path) -> None:
    """The default run's check of the page (the chromium test needs a browser: marker browser)."""
    text = write(dashboard_dsn, tmp_path / "report.html").read_text()

    outline = Outline()
    outline.feed(text)
    outline.close()

    assert text.startswith("<!DOCTYPE html>")
    assert outline.problems == []
    assert outline.open == []
    assert [anchor for anchor, _ in SECTIONS if anchor in outline.ids] == [a for a, _ in SECTIONS]
    assert outline.headings == [title for _, title in SECTIONS]
    assert outline.svgs == 6


def test_report_is_self_contained(dashboard_dsn: str, tmp_path: Path) -> None:
    text = write(dashboard_dsn, tmp_path / "report.html").read_text()

    svgs = re.findall(r"<svg.*?</svg>", text, flags=re.DOTALL)
    assert len(svgs) == 6
    for svg in svgs:
        ET.fromstring(svg)  # well-formed XML, or this raises
    assert "<script" not in text
    assert "<link" not in text
    assert " src=" not in text
    assert re.findall(r"https?://[^\"' ]+", text) == ["http://www.w3.org/2000/svg"] * 6


def test_report_shows_the_stored_funnel_and_the_rejected_users(
    dashboard_dsn: str, tmp_path: Path
) -> None:
    with connect(dashboard_dsn) as db:
        data = collect_report(db, as_of=AS_OF, days=30)
        stored = db.fetch_df(
            "SELECT current_state, count(*) AS users FROM audience_state GROUP BY 1"
        )
        rejected = db.fetch_all(
            "SELECT user_id::text, count(*) FROM audience_events"
            " WHERE event_type = 'validation_fail' GROUP BY 1"
        )
    write_report(data, tmp_path / "r.html")

    text = (tmp_path / "r.html").read_text()

    by_state = dict(stored.iter_rows())
    assert dict(data.funnel.select("state", "users").iter_rows()) == {
        s: by_state.get(s, 0) for s in ("S0", "S1", "S2", "S3", "S4", "S5")
    }
    assert data.funnel.item(0, "reached") == sum(by_state.values())
    assert len(rejected) > 0
    assert dict(data.top_rejected.select("user_id", "rejections").iter_rows()) == dict(rejected)
    for user, _ in rejected:
        assert user in text
    assert data.transitions.height == 31
    assert data.transitions.get_column("first_seen").sum() == sum(by_state.values())
    assert "consent_missing" in data.reasons
    assert data.runs.get_column("series").to_list() == ["full run"] * 3


def test_report_on_an_empty_database_says_so(dsn: str, tmp_path: Path) -> None:
    text = write(dsn, tmp_path / "empty.html").read_text()

    assert "no stored states yet" in text
    assert "no data in this window" in text
    assert "no rejections logged in this window" in text
    assert "no finished runs" in text
    assert "no rejected users in this window" in text


@pytest.mark.parametrize(
    ("maximum", "expected"),
    [
        (0, [0.0, 1.0]),
        (1, [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]),
        (7, [0.0, 2.0, 4.0, 6.0, 8.0]),
        (10, [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]),
        (11, [0.0, 5.0, 10.0, 15.0]),
        (293, [0.0, 100.0, 200.0, 300.0]),
    ],
)
def test_nice_ticks_cover_the_maximum_in_round_steps(maximum: float, expected: list[float]) -> None:
    assert nice_ticks(maximum) == expected


def test_state_funnel_counts_users_who_reached_each_state() -> None:
    distribution = pl.LazyFrame({"current_state": ["S0", "S2", "S5"], "users": [5, 3, 2]})

    result = state_funnel(distribution).collect()

    expected = pl.DataFrame(
        {
            "state": ["S0", "S1", "S2", "S3", "S4", "S5"],
            "users": [5, 0, 3, 0, 0, 2],
            "reached": [10, 5, 5, 2, 2, 2],
            "share_reached": [1.0, 0.5, 0.5, 0.2, 0.2, 0.2],
        }
    )
    assert_frame_equal(result, expected)


def test_transitions_by_day_classifies_steps_and_fills_quiet_days() -> None:
    daily = pl.LazyFrame(
        {
            "day": [datetime(2026, 1, 2), datetime(2026, 1, 2), datetime(2026, 1, 4)],
            "prior_state": ["", "S0", "S3"],
            "new_state": ["S0", "S1", "S2"],
            "n": [4, 2, 1],
        }
    )

    result = transitions_by_day(daily, start=date(2026, 1, 1), end=date(2026, 1, 4)).collect()
    totals = transition_totals(daily).collect()

    expected = pl.DataFrame(
        {
            "day": [date(2026, 1, d) for d in (1, 2, 3, 4)],
            "first_seen": [0, 4, 0, 0],
            "upgrade": [0, 2, 0, 0],
            "downgrade": [0, 0, 0, 1],
        }
    )
    assert_frame_equal(result, expected)
    assert totals.rows() == [
        ("new → S0", "first_seen", 4),
        ("S0 → S1", "upgrade", 2),
        ("S3 → S2", "downgrade", 1),
    ]


def test_the_default_window_ends_at_the_latest_runs_as_of(dashboard_dsn: str) -> None:
    with connect(dashboard_dsn) as db:
        data = collect_report(db, as_of=None, days=30)

    assert data.end == AS_OF  # the runs' as_of lie months before the wall clock
    assert data.anchor == "the latest derive run's as_of"
    assert data.transitions.get_column("first_seen").sum() > 0
    assert "ending at the latest derive run&#x27;s as_of" in render_html(data)


def test_without_any_run_the_window_ends_now(dsn: str) -> None:
    with connect(dsn) as db:
        data = collect_report(db, as_of=None, days=30)

    assert data.anchor == "now (no derive run yet)"


def test_the_score_distribution_counts_every_stored_user_by_state(dashboard_dsn: str) -> None:
    with connect(dashboard_dsn) as db:
        data = collect_report(db, as_of=AS_OF, days=30)
        stored = dict(db.fetch_all("SELECT current_state, count(*) FROM audience_state GROUP BY 1"))
        top = db.fetch_value("SELECT max(engagement_score)::float8 FROM audience_state")

    assert data.scores is not None
    per_state = {s: data.scores.get_column(s).sum() for s in ("S0", "S1", "S2", "S3", "S4", "S5")}
    assert per_state == {s: stored.get(s, 0) for s in per_state}
    upper = float(data.scores.get_column("label").to_list()[-1].split("-")[1])
    assert upper >= top


def test_states_over_time_come_from_the_state_history(
    dashboard_dsn: str, pg: psycopg.Connection
) -> None:
    steps = [AS_OF - timedelta(days=2), AS_OF - timedelta(days=1)]
    with psycopg.connect(dashboard_dsn, autocommit=True) as conn:
        for i, step in enumerate(steps):
            conn.execute(
                "INSERT INTO audience_state_history (as_of, user_id, current_state,"
                " state_updated_at, engagement_score)"
                " SELECT %s, user_id, CASE WHEN %s = 0 THEN 'S0' ELSE current_state END, %s, 0"
                " FROM audience_state",
                (step, i, step),
            )
        users = conn.execute("SELECT count(*) FROM audience_state").fetchone()[0]  # type: ignore[index]

    with connect(dashboard_dsn) as db:
        data = collect_report(db, as_of=AS_OF, days=30)

    history = data.states_over_time
    assert history is not None
    assert history.get_column("as_of").to_list() == steps
    assert history.row(0, named=True)["S0"] == users
    assert sum(history.row(1)[1:]) == users


def test_state_meanings_are_on_the_page(dashboard_dsn: str, tmp_path: Path) -> None:
    text = write(dashboard_dsn, tmp_path / "r.html").read_text()

    for state, meaning in STATE_MEANINGS.items():
        assert f"<td>{state}</td><td>{html.escape(meaning)}</td>" in text


def test_long_evidence_is_folded_and_cut() -> None:
    evidence = json.dumps({"events": [{"id": i, "event_type": "page_view"} for i in range(2000)]})

    shown = _evidence(evidence)

    assert shown.startswith("<details><summary>events</summary><pre>")
    assert len(shown) < 2500
    assert "more characters)" in shown


def test_equally_rejected_users_are_listed_latest_rejection_first(
    dsn: str, pg: psycopg.Connection
) -> None:
    derived = AS_OF - timedelta(hours=1)
    with pg.transaction():
        pg.execute("SET LOCAL ROLE service_role")
        for user, logged in (
            (0xA, AS_OF - timedelta(minutes=30)),
            (0xB, AS_OF - timedelta(minutes=10)),
        ):
            pg.execute(
                "INSERT INTO audience_events (created_at, user_id, event_type, event_category,"
                " metadata) VALUES (%s, %s, 'validation_fail', 'system', %s::jsonb)",
                (
                    logged,
                    uuid.UUID(int=user),
                    json.dumps({"reasons": ["volume_spike"], "derived_at": derived.isoformat()}),
                ),
            )

    with connect(dsn) as db:
        data = collect_report(db, as_of=AS_OF, days=7)

    assert data.top_rejected.get_column("user_id").to_list() == [
        str(uuid.UUID(int=0xB)),
        str(uuid.UUID(int=0xA)),
    ]
