"""``derive run``: derive the users whose state can differ, write only the differences.

read (one snapshot) -> pure transforms (``derive.transforms.pipeline``) -> one write transaction
that also finishes the run's row. A run is one of three modes (SPEC §2.10):

- ``full``: every user in the window and every stored state (first run, ``--full``, rules or
  lookback changed, as_of before the base run, gates that are not monotone);
- ``incremental`` (the default once a base exists): only the candidate users of SPEC §2.10,
  found by index range scans, read with one join against their list;
- ``users``: the users named with ``--user``.

All three call the same :func:`~derive.transforms.pipeline.derive_states`; they differ only in
which users are read. The run holds the job's lease throughout and is logged in
``derivation_runs`` with its mode, base run, watermark and candidates per reason.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import polars as pl

from derive import __version__
from derive.config import STATES, Rules, format_duration
from derive.errors import UsageError
from derive.io import incremental, read
from derive.io.connect import Db
from derive.io.runlog import job_run
from derive.io.write import WriteResult, write_derivation
from derive.schema import EVENTS, STORED_STATES, empty
from derive.transforms.monotone import non_monotone
from derive.transforms.pipeline import Derivation, derive_states

JOB = "derive"
Mode = Literal["full", "incremental", "users"]

#: An incremental run whose candidates exceed this share of the stored users reads the whole
#: window instead (same answer, SPEC §2.10: a full run equals an incremental one; cheaper then).
FULL_READ_SHARE = 0.5


@dataclass(frozen=True)
class Plan:
    """Which users a run evaluates, and why."""

    mode: Mode
    full_reason: str | None = None
    base: incremental.BaseRun | None = None


def plan_run(
    db: Db,
    *,
    as_of: datetime,
    lookback: timedelta,
    rules: Rules,
    users: Sequence[str] = (),
    full: bool = False,
) -> Plan:
    """Decide the mode of a run from the flags, the rules and the latest base run (SPEC §2.10)."""
    if users:
        return Plan("users")
    if full:
        return Plan("full", "--full")
    problems = non_monotone(rules)
    if problems:
        return Plan("full", "rules not monotone: " + "; ".join(problems))
    base = incremental.latest_base(db, job=JOB)
    if base is None or base.read_snapshot is None:
        return Plan("full", "no base run")
    if base.rules_version != rules.tag:
        return Plan("full", f"rules tag changed ({base.rules_version} -> {rules.tag})", base)
    if base.lookback != lookback:
        was = "none" if base.lookback is None else format_duration(base.lookback)
        return Plan("full", f"lookback changed ({was} -> {format_duration(lookback)})", base)
    if as_of < base.as_of:
        return Plan(
            "full", f"as_of before the base run's ({as_of.isoformat()} < {base.as_of.isoformat()})"
        )
    return Plan("incremental", None, base)


@dataclass
class RunReport:
    """What a run read, decided and wrote; printed by the CLI and stored in ``derivation_runs``."""

    run_id: str
    as_of: datetime
    lookback: timedelta
    rules_version: str
    dry_run: bool
    mode: Mode = "full"
    full_reason: str | None = None
    base_run_id: str | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)

    @property
    def headline(self) -> str:
        """The summary's first line: mode, and why for a full run."""
        if self.mode == "full":
            return f"full run ({self.full_reason})"
        if self.mode == "users":
            return "run for the users named with --user"
        return f"incremental run (base {self.base_run_id})"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "run_id": self.run_id,
            "mode": self.mode,
            "full_reason": self.full_reason,
            "base_run_id": self.base_run_id,
            "as_of": self.as_of.isoformat(),
            "lookback": format_duration(self.lookback),
            "rules_version": self.rules_version,
            "dry_run": self.dry_run,
            "counts": self.counts,
            "timings": self.timings,
            "states_before": self.before,
            "states_after": self.after,
        }


@dataclass
class Inputs:
    """Everything a run reads, from one snapshot."""

    events: pl.DataFrame
    stored: pl.DataFrame
    recent: pl.DataFrame
    side: dict[str, int | None]
    snapshot: str
    evaluated: pl.Series | None = None  # the candidate users; None = everyone
    candidates: dict[str, int] = field(default_factory=dict)
    state_counts: dict[str, int] | None = None  # whole-table distribution (incremental runs)
    requests_upto: int = 0


def _full_read(db: Db, *, as_of: datetime, lookback: timedelta, rules: Rules) -> Inputs:
    """The whole window on ``db`` while a sibling connection sharing the snapshot reads the rest.

    On 2 cores the overlap hides ~1 s of the 100k-user read. (Splitting the window itself into
    parallel slices was measured slower: each slice scans the whole table.)
    """
    exported = read.begin_snapshot(db)

    def bind(conn: Db) -> None:
        read.set_window(conn, as_of=as_of, lookback=lookback, relog_after=rules.relog_after)

    bind(db)
    sibling = db.sibling()
    side_results: list[Any] = []

    def side_reads() -> None:
        try:
            read.begin_snapshot(sibling, snapshot=exported)
            bind(sibling)
            side_results.extend(
                [
                    read.read_states(sibling),
                    read.read_recent_rejections(sibling),
                    read.read_side_counts(sibling, window_start=as_of - lookback, as_of=as_of),
                    incremental.pending_requests(sibling),
                ]
            )
        except BaseException as exc:  # re-raised in the caller's thread
            side_results[:] = [exc]

    worker = threading.Thread(target=side_reads, name="derive-side-reads")
    try:
        worker.start()
        snapshot = incremental.read_snapshot(db)
        events = read.read_events(db)
        worker.join()
    finally:
        worker.join()
        sibling.close()
        db.rollback()
    if len(side_results) == 1 and isinstance(side_results[0], BaseException):
        raise side_results[0]
    stored, recent, side, upto = side_results
    return Inputs(events, stored, recent, side, snapshot, requests_upto=upto)


def _users_read(
    db: Db,
    *,
    as_of: datetime,
    lookback: timedelta,
    rules: Rules,
    users: Sequence[str],
    plan: Plan,
) -> Inputs:
    """The windows of listed users (``--user``) or of the candidates (incremental), one snapshot."""
    read.begin_snapshot(db)
    try:
        read.set_window(db, as_of=as_of, lookback=lookback, relog_after=rules.relog_after)
        snapshot = incremental.read_snapshot(db)
        candidates: dict[str, int] = {}
        state_counts: dict[str, int] | None = None
        upto = 0
        if plan.mode == "incremental":
            assert plan.base is not None
            incremental.set_bounds(
                db,
                base=plan.base,
                as_of=as_of,
                lookback=lookback,
                thresholds=tuple(d.inactivity_days for d in rules.downgrades),
            )
            upto = incremental.pending_requests(db)
            found = incremental.read_candidates(db)
            ids = found.get_column("user_id").unique().sort()
            candidates = _count_reasons(found, total=ids.len())
            state_counts = read.read_state_counts(db)
            if ids.len() > FULL_READ_SHARE * max(sum(state_counts.values()), 1):
                db.rollback()
                inputs = _full_read(db, as_of=as_of, lookback=lookback, rules=rules)
                inputs.candidates = candidates | {"read_whole_window": 1}
                return inputs
            listed = [bytes(u).hex() for u in ids.to_list()]
        else:
            ids = pl.Series(
                "user_id", sorted({bytes.fromhex(u.replace("-", "")) for u in users}), pl.Binary
            )
            listed = [u.hex() for u in ids.to_list()]
        if listed:
            db.set_local(users=",".join(listed))
            events = read.read_events(db, users=listed)
            stored = read.read_states(db, users=listed)
        else:
            events, stored = empty(EVENTS), empty(STORED_STATES)
        recent = read.read_recent_rejections(db)
    finally:
        db.rollback()
    # Counted by full runs only: each is a range scan over the whole window.
    side: dict[str, int | None] = dict.fromkeys(("anonymous", "future", "system_rows_malformed"))
    return Inputs(
        events,
        stored,
        recent,
        side,
        snapshot,
        evaluated=ids,
        candidates=candidates,
        state_counts=state_counts,
        requests_upto=upto,
    )


def _count_reasons(found: pl.DataFrame, *, total: int) -> dict[str, int]:
    """Distinct users per candidate reason, plus the distinct total."""
    per = found.unique().group_by("reason").len()
    counts = dict.fromkeys(incremental.REASONS, 0)
    for reason, n in per.iter_rows():
        counts[incremental.REASONS[int(reason)]] = int(n)
    counts["total"] = total
    return counts


def read_inputs(
    db: Db,
    *,
    as_of: datetime,
    lookback: timedelta,
    rules: Rules,
    users: Sequence[str] = (),
    plan: Plan | None = None,
) -> Inputs:
    """Everything a run of ``plan`` reads (default: a full run, or ``--user`` when users are given)."""
    plan = plan or (Plan("users") if users else Plan("full", "--full"))
    if plan.mode == "full":
        return _full_read(db, as_of=as_of, lookback=lookback, rules=rules)
    return _users_read(db, as_of=as_of, lookback=lookback, rules=rules, users=users, plan=plan)


def _counts(d: Derivation, inputs: Inputs) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "events_read": d.events_read,
        "events_invalid": d.invalid,
        "events_deduplicated": d.deduplicated,
        "events_anonymous": inputs.side["anonymous"],
        "events_future": inputs.side["future"],
        "system_rows_malformed": inputs.side["system_rows_malformed"],
        "users_evaluated": d.users_evaluated,
        "users_changed": d.writes.height,
        "state_changes": d.state_changes,
        "users_rejected": d.rejected.height,
        "rejected_by_reason": d.rejected_by_reason,
        "rejections_logged": d.to_log.height,
        "audit_rows": d.audit.height,
    }
    if inputs.candidates:
        counts["candidates"] = inputs.candidates
    return counts


def _distributions(d: Derivation, inputs: Inputs) -> tuple[dict[str, int], dict[str, int]]:
    """Whole-table state distribution before and after (a partial read amends the stored one)."""
    if inputs.state_counts is None or inputs.evaluated is None:
        return d.before, d.after
    before = {s: inputs.state_counts.get(s, 0) for s in STATES}
    after = {s: before[s] - d.before[s] + d.after[s] for s in STATES}
    return before, after


def run_derivation(
    db: Db,
    *,
    as_of: datetime,
    lookback: timedelta,
    rules: Rules,
    users: Sequence[str] = (),
    dry_run: bool = False,
    full: bool = False,
) -> RunReport:
    """Run the audience-state derivation once (incremental when a base allows it).

    Raises:
        LockBusy: another run holds the lease (recorded as ``skipped``; exit 75).
    """
    args = {"users": list(users), "dry_run": dry_run, "rules": rules.source, "full": full}
    with job_run(
        db,
        job=JOB,
        as_of=as_of,
        lookback=lookback,
        rules_version=rules.tag,
        args=args,
        record=not dry_run,
    ) as run:
        plan = plan_run(db, as_of=as_of, lookback=lookback, rules=rules, users=users, full=full)
        with run.phase("read"):
            inputs = read_inputs(
                db, as_of=as_of, lookback=lookback, rules=rules, users=users, plan=plan
            )
        with run.phase("compute"):
            result = derive_states(
                inputs.events, inputs.stored, inputs.recent, as_of=as_of, rules=rules
            )
        before, after = _distributions(result, inputs)
        counts = _counts(result, inputs)
        run.extra = {
            "mode": plan.mode,
            "full_reason": plan.full_reason,
            "base_run_id": plan.base.run_id if plan.base and plan.mode == "incremental" else None,
            "read_snapshot": inputs.snapshot if plan.mode != "users" else None,
        }
        if not dry_run:
            write_started = time.perf_counter()

            def finish(written: WriteResult) -> None:
                counts["users_changed"] = written.states_written
                counts["audit_rows"] = written.audit_rows
                counts["rejections_logged"] = written.validation_fail_rows
                run.counts.update(counts, states_before=before, states_after=after)
                run.timings.update(written.timings)
                run.timings["write"] = round(time.perf_counter() - write_started, 4)
                run.finish_in(db)

            write_derivation(
                db,
                run=run,
                as_of=as_of,
                derived_by=f"derive {__version__}",
                rules_version=rules.tag,
                states=result.writes,
                audit=result.audit,
                rejections=result.to_log,
                rejected=result.rejected.select("user_id", "reasons_key"),
                evaluated=inputs.evaluated,
                requests_upto=inputs.requests_upto if plan.mode != "users" else 0,
                before_commit=finish,
            )
    return RunReport(
        run_id=run.run_id,
        as_of=as_of,
        lookback=lookback,
        rules_version=rules.tag,
        dry_run=dry_run,
        mode=plan.mode,
        full_reason=plan.full_reason,
        base_run_id=run.extra["base_run_id"],
        counts=counts,
        timings=dict(run.timings),
        before=before,
        after=after,
    )


@dataclass
class VerifyReport:
    """A full dry run compared with the stored states (``derive run --verify``)."""

    as_of: datetime
    users_compared: int
    differences: pl.DataFrame  # one row per differing user, see ``VERIFY_COLUMNS``

    @property
    def equal(self) -> bool:
        """Whether every stored state equals what a full run would write."""
        return self.differences.height == 0


VERIFY_COLUMNS = (
    "user_id",
    "problem",
    "stored_state",
    "derived_state",
    "stored_score",
    "derived_score",
    "stored_last_event_type",
    "derived_last_event_type",
)


def _uuid_text(column: pl.Expr) -> pl.Expr:
    """16-byte uuids as their canonical text form."""
    h = column.bin.encode("hex")
    parts = [h.str.slice(0, 8), h.str.slice(8, 4), h.str.slice(12, 4), h.str.slice(16, 4)]
    return pl.concat_str([*parts, h.str.slice(20, 12)], separator="-")


def verify_derivation(
    db: Db,
    *,
    lookback: timedelta,
    rules: Rules,
    as_of: datetime | None = None,
) -> VerifyReport:
    """Recompute every user from scratch and list those whose stored row a full run would change.

    ``as_of`` defaults to the latest base run's, so time passing since then is no difference. A
    stored state that disagrees with its audit trail (a silent edit) is listed as ``state_jump``.
    """
    if as_of is None:
        base = incremental.latest_base(db, job=JOB)
        if base is None:
            raise UsageError(
                "nothing to verify: no full or incremental `derive run` has succeeded here yet"
            )
        as_of = base.as_of
    inputs = _full_read(db, as_of=as_of, lookback=lookback, rules=rules)
    result = derive_states(inputs.events, inputs.stored, inputs.recent, as_of=as_of, rules=rules)
    stored = inputs.stored.select(
        "user_id",
        stored_state="current_state",
        stored_score="engagement_score",
        stored_last_event_type="last_event_type",
    )
    written = result.writes.select(
        "user_id",
        problem=pl.when(pl.col("state_changed"))
        .then(pl.lit("state differs"))
        .otherwise(pl.lit("score or last event type differs")),
        derived_state=pl.col("current_state").cast(pl.String),
        derived_score="engagement_score",
        derived_last_event_type="last_event_type",
    )
    jumps = result.rejected.filter(pl.col("reasons").list.contains("state_jump")).select(
        "user_id", problem=pl.lit("state_jump: stored state disagrees with its audit trail")
    )
    differences = (
        pl.concat([written, jumps], how="diagonal_relaxed")
        .unique("user_id", keep="first", maintain_order=True)
        .join(stored, on="user_id", how="left")
        .with_columns(_uuid_text(pl.col("user_id")))
        .select(VERIFY_COLUMNS)
        .sort("user_id")
    )
    return VerifyReport(as_of=as_of, users_compared=result.users_evaluated, differences=differences)
