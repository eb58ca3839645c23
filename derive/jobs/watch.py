"""The two execution modes of seed 000: Mode A (scheduled) and Mode B (``derive watch``).

Mode A is ``derive run`` every 15 minutes; :func:`schedule_units` prints the crontab line and the
systemd timer for it. Mode B listens for the user ids the insert trigger announces, batches them
(debounce) and derives just those users through :func:`~derive.jobs.derivation.run_derivation`:
same code, same advisory lock, same run log and audit rows as a cron run.

Delivery rules of the watcher:

- a batch is taken out of the pending set only after its run succeeded; when the lock is busy
  (a scheduled run is in progress) or the database went away, its users go back to the pending
  set and are derived later, once;
- after a (re)connection it LISTENs first, then derives every user with events stamped since the
  last moment it knew it was listening (minus ``catch_up_margin`` for transactions that were open
  at that moment), so nothing inserted during an outage is lost;
- ``stop()`` (SIGTERM in the CLI) lets a running batch finish, derives what is still pending and
  returns.

The catch-up goes by ``created_at``: an event inserted during an outage with a ``created_at``
back-dated before the catch-up mark is not found by it (nor by any notification); the scheduled
full run derives it. Mode B complements Mode A, it does not replace it: retention downgrades
happen with time passing, not with inserts.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from derive.config import Rules, format_duration
from derive.errors import LockBusy, SourceError
from derive.io.connect import Db, connect
from derive.io.migrate import ensure_migrated
from derive.io.notify import Listener, users_with_events_since
from derive.jobs.derivation import run_derivation


@dataclass
class WatchStats:
    """What a watcher did; printed when it stops."""

    batches: int = 0
    users_derived: int = 0
    users_changed: int = 0
    lock_busy: int = 0
    reconnects: int = 0
    caught_up: int = 0
    pending_at_exit: int = 0
    latencies: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "batches": self.batches,
            "users_derived": self.users_derived,
            "users_changed": self.users_changed,
            "lock_busy": self.lock_busy,
            "reconnects": self.reconnects,
            "caught_up": self.caught_up,
            "pending_at_exit": self.pending_at_exit,
            "max_latency_seconds": round(max(self.latencies), 3) if self.latencies else None,
        }


class Backoff:
    """Exponential backoff with full jitter, capped."""

    def __init__(self, *, initial: float, cap: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.cap = cap
        self._attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """Seconds to wait before the next attempt."""
        ceiling = min(self.cap, self.initial * 2.0 ** min(self._attempt, 32))
        self._attempt += 1
        jitter: float = self._rng.uniform(0.0, ceiling / 2)
        return ceiling / 2 + jitter

    def reset(self) -> None:
        """Back to the initial delay (after a success)."""
        self._attempt = 0


class Watcher:
    """Mode B: LISTEN, debounce, derive the notified users; reconnect and catch up after outages.

    Args:
        dsn_source: returns the DSN to (re)connect to; called at every connection attempt, so an
            embedded server that comes back on another port is found again.
        debounce: derive once no new user id arrived for this long ...
        max_delay: ... or once the oldest pending id waited this long (steady streams).
        max_batch: users per derivation run; larger pending sets run in several batches.
        catch_up_margin: how far before the last known-listening moment the catch-up looks, for
            transactions that started before it and committed during the outage.
        heartbeat: seconds between liveness probes while idle (they advance the catch-up mark).
        log: receives one line per event worth telling (batches, reconnects).
    """

    def __init__(
        self,
        dsn_source: Callable[[], str],
        *,
        rules: Rules,
        lookback: timedelta,
        debounce: float = 2.0,
        max_delay: float | None = None,
        max_batch: int = 5000,
        catch_up_margin: timedelta = timedelta(minutes=5),
        heartbeat: float = 5.0,
        log: Callable[[str], None] = lambda _line: None,
    ) -> None:
        self._dsn_source = dsn_source
        self.rules = rules
        self.lookback = lookback
        self.debounce = debounce
        self.max_delay = max_delay if max_delay is not None else max(10 * debounce, debounce)
        self.max_batch = max_batch
        self.catch_up_margin = catch_up_margin
        self.heartbeat = heartbeat
        self.log = log
        self.stats = WatchStats()
        self._stop = threading.Event()
        self._listener: Listener | None = None
        self._db: Db | None = None
        self._pending: dict[str, float] = {}  # user id -> monotonic time first notified
        self._last_arrival = 0.0
        self._retry_at = 0.0
        self._lock_backoff = Backoff(initial=1.0, cap=30.0)
        self._listening_mark: datetime | None = None

    # -- control -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the watcher to finish (safe to call from a signal handler)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop.is_set()

    def run(self) -> WatchStats:
        """Watch until :meth:`stop`; returns the statistics.

        Raises:
            SchemaError: the database lacks migrations (checked at the first connection).
        """
        backoff = Backoff(initial=0.5, cap=30.0)
        first = True
        while not self.stopping:
            try:
                self._connect(catch_up=not first)
                first = False
                backoff.reset()
                self._serve()
            except SourceError as exc:
                self._disconnect()
                if self.stopping:
                    break
                delay = backoff.next()
                self.stats.reconnects += 1
                self.log(f"database unavailable ({exc}); reconnecting in {delay:.1f}s")
                self._stop.wait(delay)
        self._final_flush()
        self._disconnect()
        self.stats.pending_at_exit = len(self._pending)
        return self.stats

    # -- connection ----------------------------------------------------------------------------------
    def _connect(self, *, catch_up: bool) -> None:
        dsn = self._dsn_source()
        self._listener = Listener(dsn)
        self._db = connect(dsn)
        if not catch_up:
            ensure_migrated(self._db)  # without migration 0005 no notification would ever come
        now = self._listener.server_now()
        if catch_up and self._listening_mark is not None:
            since = self._listening_mark - self.catch_up_margin
            users = users_with_events_since(self._db, since)
            self._add(users)
            self.stats.caught_up += len(users)
            self.log(
                f"listening on {self._listener.label} again; catch-up: {len(users)} users with "
                f"events since {since.isoformat()}"
            )
            self._last_arrival = 0.0  # derive the catch-up set without waiting for the debounce
        else:
            self.log(f"listening on {self._listener.label}")
        self._listening_mark = now

    def _disconnect(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- the loop ------------------------------------------------------------------------------------
    def _add(self, users: set[str]) -> None:
        now = time.monotonic()
        for user in users:
            self._pending.setdefault(user, now)
        if users:
            self._last_arrival = now

    def _due(self, now: float) -> bool:
        if not self._pending or now < self._retry_at:
            return False
        oldest = min(self._pending.values())
        return now - self._last_arrival >= self.debounce or now - oldest >= self.max_delay

    def _serve(self) -> None:
        assert self._listener is not None
        last_probe = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            if self._due(now):
                self._derive_pending()
                continue
            timeout = min(0.5, self.heartbeat)
            if self._pending:
                wake = max(self._last_arrival + self.debounce, self._retry_at)
                timeout = max(0.01, min(timeout, wake - now))
            self._add(self._listener.wait(timeout))
            if time.monotonic() - last_probe >= self.heartbeat:
                self._listening_mark = self._listener.server_now()
                last_probe = time.monotonic()

    def _derive_pending(self) -> None:
        """Derive the pending users in batches; a batch leaves the pending set only on success."""
        assert self._db is not None
        order = sorted(self._pending, key=lambda u: (self._pending[u], u))
        for start in range(0, len(order), self.max_batch):
            batch = order[start : start + self.max_batch]
            if not self._derive_batch(batch):
                return

    def _derive_batch(self, batch: list[str]) -> bool:
        assert self._db is not None
        tick = time.perf_counter()
        try:
            as_of = self._db.fetch_value("SELECT clock_timestamp()")
            self._db.rollback()
            report = run_derivation(
                self._db, as_of=as_of, lookback=self.lookback, rules=self.rules, users=batch
            )
        except LockBusy:
            self.stats.lock_busy += 1
            delay = self._lock_backoff.next()
            self._retry_at = time.monotonic() + delay
            self.log(
                f"another derive run holds the lock; {len(self._pending)} users wait, "
                f"retry in {delay:.1f}s"
            )
            return False
        self._lock_backoff.reset()
        self._retry_at = 0.0
        done = time.monotonic()
        for user in batch:
            first = self._pending.pop(user)
            self.stats.latencies.append(done - first)
        changed = int(report.counts.get("users_changed", 0))
        self.stats.batches += 1
        self.stats.users_derived += len(batch)
        self.stats.users_changed += changed
        self.log(
            f"derived {len(batch)} users in {time.perf_counter() - tick:.2f}s: {changed} changed, "
            f"{report.counts.get('users_rejected', 0)} rejected (run {report.run_id})"
        )
        return True

    def _final_flush(self) -> None:
        """On stop: one attempt to derive what is still pending (if the database is there)."""
        if not self._pending or self._db is None:
            return
        try:
            self._derive_pending()
        except SourceError as exc:
            self.log(f"could not derive {len(self._pending)} pending users before exit: {exc}")


# -- Mode A ------------------------------------------------------------------------------------------


def schedule_units(
    *,
    executable: str,
    every: timedelta = timedelta(minutes=15),
    lookback: timedelta = timedelta(days=120),
    env_file: Path = Path("/etc/derive/derive.env"),
    log_file: Path = Path("/var/log/derive/run.log"),
) -> dict[str, str]:
    """A crontab line and a systemd service + timer that run ``derive run`` every ``every``.

    Also a ``derive-watch.service`` for Mode B, to run next to the timer: the scheduled full run
    keeps the retention downgrades and anything the watcher missed on time.

    Overlaps are safe either way: a run that finds the lock taken exits 75 (``skipped``), which
    the service declares a success.

    Raises:
        ValueError: ``every`` is not a whole number of minutes dividing an hour, or of hours
            dividing a day (cron cannot express other cadences).
    """
    minutes = every.total_seconds() / 60
    if minutes != int(minutes) or minutes <= 0:
        raise ValueError(f"cadence {format_duration(every)} is not a whole number of minutes")
    m = int(minutes)
    if m < 60 and 60 % m == 0:
        cron_when = f"*/{m} * * * *" if m > 1 else "* * * * *"
        on_calendar = f"*-*-* *:00/{m}:00"
    elif m % 60 == 0 and 24 % (m // 60) == 0:
        hours = m // 60
        cron_when = f"0 */{hours} * * *" if hours > 1 else "0 * * * *"
        on_calendar = f"*-*-* 00/{hours}:00:00"
    else:
        raise ValueError(
            f"cadence {format_duration(every)} does not divide an hour or a day; "
            "use e.g. 5m, 15m, 30m, 1h or 6h"
        )
    look = format_duration(lookback)
    command = f"{executable} run --lookback {look}"
    crontab = (
        f"# derive: audience-state derivation every {format_duration(every)} (exit 75 = skipped,"
        " another run held the lock)\n"
        f"{cron_when} set -a && . {env_file} && set +a && {command} >> {log_file} 2>&1\n"
    )
    service = f"""[Unit]
Description=derive: audience-state derivation (one run)
Wants=network-online.target
After=network-online.target postgresql.service

[Service]
Type=oneshot
EnvironmentFile={env_file}
ExecStart={command}
# 75: another run held the advisory lock; this one was skipped on purpose.
SuccessExitStatus=75
Nice=5
"""
    timer = f"""[Unit]
Description=derive: run the audience-state derivation every {format_duration(every)}

[Timer]
OnCalendar={on_calendar}
AccuracySec=1s
Persistent=true
Unit=derive-run.service

[Install]
WantedBy=timers.target
"""
    watch = f"""[Unit]
Description=derive: Mode B, derive users as their events arrive (optional, next to the timer)
Wants=network-online.target
After=network-online.target postgresql.service

[Service]
Type=simple
EnvironmentFile={env_file}
ExecStart={executable} watch --lookback {look}
# SIGTERM: finish the batch in progress, derive what is pending, exit 0.
KillSignal=SIGTERM
TimeoutStopSec=120
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""
    return {
        "crontab": crontab,
        "derive-run.service": service,
        "derive-run.timer": timer,
        "derive-watch.service": watch,
    }
