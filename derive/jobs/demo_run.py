"""``derive demo``: synthetic data in a fresh database, then a real derivation run over it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from derive.config import Rules, derive_home, utc_now
from derive.errors import ContractError
from derive.io.connect import connect
from derive.io.embedded import fresh_database
from derive.io.migrate import migrate
from derive.jobs.demo import load_demo_data
from derive.jobs.derivation import RunReport, run_derivation

DEMO_DATABASE = "derive_demo"
LOOKBACK_DAYS = 120


@dataclass(frozen=True)
class DemoResult:
    """Where the demo ran, what it loaded and what the derivation did."""

    database: str
    dsn: str
    embedded: bool
    loaded: dict[str, Any]
    report: RunReport


def run_demo(dsn: str | None, *, users: int, seed: int, dirty: bool, rules: Rules) -> DemoResult:
    """Load ``users`` synthetic users and derive their states.

    Without a DSN the demo gets its own database on the embedded server, made afresh each time, so
    it never touches the ``derive`` database. With a DSN the database must hold no events yet.

    Raises:
        ContractError: the given database already holds events.
    """
    from datetime import timedelta

    target = dsn or fresh_database(derive_home(), DEMO_DATABASE)
    as_of = utc_now()
    with connect(target) as db:
        migrate(db)
        present = db.fetch_value("SELECT count(*) FROM audience_events")
        db.rollback()
        if present:
            raise ContractError(
                f"database {db.label} already holds {present} events; the demo needs an empty "
                "database (omit --dsn to use the embedded demo database)"
            )
        loaded = load_demo_data(
            db, users=users, as_of=as_of, rules=rules, days=LOOKBACK_DAYS, seed=seed, dirty=dirty
        )
        report = run_derivation(
            db, as_of=as_of, lookback=timedelta(days=LOOKBACK_DAYS), rules=rules
        )
        return DemoResult(
            database=db.label, dsn=target, embedded=dsn is None, loaded=loaded, report=report
        )
