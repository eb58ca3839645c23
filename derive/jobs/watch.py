"""The two execution modes of seed 000: Mode A (scheduled) and Mode B (``derive watch``).

Mode A is ``derive run`` every 15 minutes; :func:`schedule_units` prints the crontab lines and the
systemd timer for it. Mode B is the same incremental run (SPEC §2.8, §2.10), started when the
insert trigger's notification wakes the watcher (debounced) or, with ``--poll`` or where LISTEN
is unavailable (a transaction-mode pooler), on a poll interval: same code, same lease, same run log
and audit rows as a cron run.

Rules of the watcher:

- notifications only wake it. Their payload is never read (any role may NOTIFY any channel): what
  a run derives comes from the watermark, so a flood or a garbage payload costs at most one cheap
  probe per debounce interval, never a run per message;
- before spending a run on a wake-up it asks the database whether anything arrived that the base
  run did not see (two index probes); a run also starts every ``max_idle`` regardless, so time
  driven changes (retention, rows leaving the window) and pending SQL requests are served even
  when nothing is inserted;
- a run that finds the lease taken (a cron run in progress) or fails is retried with a backoff
  that grows and caps, and resets only after a run succeeded;
- after a reconnection nothing needs catching up: the next run finds every row the last
  succeeded run did not see, whatever its created_at;
- ``stop()`` (SIGTERM in the CLI) lets a running run finish and returns.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from derive.config import Rules, format_duration
from derive.errors import DeriveError, LockBusy, SourceError
from derive.io.connect import Db, connect
from derive.io.incremental import anything_new, latest_base
from derive.io.migrate import ensure_migrated
from derive.io.notify import Listener
from derive.jobs.derivation import JOB, run_derivation


@dataclass
class WatchStats:
    """What a watcher did; printed when it stops."""

    wakes: int = 0
    notifications: int = 0
    foreign_payloads: int = 0
    probes_nothing_new: int = 0
    runs: int = 0
    users_evaluated: int = 0
    users_changed: int = 0
    lock_busy: int = 0
    failed_runs: int = 0
    reconnects: int = 0
    polling: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


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
    """Mode B: wake on notifications (or poll), then run the incremental derivation.

    Args:
        dsn_source: returns the DSN to (re)connect to; called at every connection attempt, so an
            embedded server that comes back on another port is found again.
        debounce: run once no notification arrived for this long ...
        max_delay: ... or once the first unserved wake-up waited this long (steady streams).
        poll: seconds between probes without notifications (``None``: listen; polling is also
            the fallback where LISTEN does not deliver).
        max_idle: seconds after which a run starts even if nothing new was seen.
        log: receives one line per event worth telling (runs, reconnects).
    """

    def __init__(
        self,
        dsn_source: Callable[[], str],
        *,
        rules: Rules,
        lookback: timedelta,
        debounce: float = 2.0,
        max_delay: float | None = None,
        poll: float | None = None,
        max_idle: float = 900.0,
        log: Callable[[str], None] = lambda _line: None,
    ) -> None:
        self._dsn_source = dsn_source
        self.rules = rules
        self.lookback = lookback
        self.debounce = debounce
        self.max_delay = max_delay if max_delay is not None else max(10 * debounce, debounce)
        self.poll = poll
        self.max_idle = max_idle
        self.log = log
        self.stats = WatchStats()
        self._stop = threading.Event()
        self._listener: Listener | None = None
        self._db: Db | None = None
        self._dirty_since: float | None = None  # first unserved wake-up (monotonic)
        self._last_wake = 0.0
        self._last_run = 0.0
        self._retry_at = 0.0
        self._run_backoff = Backoff(initial=1.0, cap=60.0)

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
                self._connect(first=first)
                first = False
                self._serve(backoff)
            except SourceError as exc:
                self._disconnect()
                if self.stopping:
                    break
                delay = backoff.next()  # reset only once a run succeeded, not on reconnect
                self.stats.reconnects += 1
                self.log(f"database unavailable ({exc}); reconnecting in {delay:.1f}s")
                self._stop.wait(delay)
        self._disconnect()
        return self.stats

    # -- connection ----------------------------------------------------------------------------------
    def _connect(self, *, first: bool) -> None:
        dsn = self._dsn_source()
        self._db = connect(dsn)
        if first:
            ensure_migrated(self._db)  # without the triggers no notification would ever come
        if self.poll is None:
            listener = Listener(dsn)
            if listener.delivers():
                self._listener = listener
                self.log(f"listening on {listener.label}")
            else:
                listener.close()
                self.poll = 10.0
                self.log(
                    f"LISTEN does not deliver on {listener.label} (a transaction-mode pooler?):"
                    f" polling every {self.poll:g}s; for notifications connect in session mode"
                    " (e.g. Supabase's direct connection or pooler port 5432)"
                )
        if self.poll is not None:
            self.stats.polling = True
            self.log(f"polling {self._db.label} every {self.poll:g}s")
        self._dirty_since = self._dirty_since or time.monotonic()  # look once after (re)connecting

    def _disconnect(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- the loop ------------------------------------------------------------------------------------
    def _wake(self, now: float) -> None:
        self.stats.wakes += 1
        self._last_wake = now
        if self._dirty_since is None:
            self._dirty_since = now

    def _due(self, now: float) -> bool:
        if now < self._retry_at:
            return False
        if now - self._last_run >= self.max_idle:
            return True
        if self._dirty_since is None:
            return False
        return now - self._last_wake >= self.debounce or now - self._dirty_since >= self.max_delay

    def _serve(self, reconnect_backoff: Backoff) -> None:
        assert self._db is not None
        last_poll = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            if self._due(now):
                if self._run_once():
                    reconnect_backoff.reset()
                continue
            timeout = 0.5
            if self._dirty_since is not None:
                wake_at = max(self._last_wake + self.debounce, self._retry_at)
                timeout = max(0.01, min(timeout, wake_at - now))
            if self._listener is not None:
                got = self._listener.wait(timeout)
                if got.notifications:
                    self.stats.notifications += got.notifications
                    self.stats.foreign_payloads += got.foreign
                    self._wake(time.monotonic())
            else:
                self._stop.wait(timeout)
                assert self.poll is not None
                if time.monotonic() - last_poll >= self.poll:
                    # A poll tick is due at once: the debounce is for bursts of notifications.
                    last_poll = time.monotonic()
                    self._wake(last_poll)
                    self._last_wake = last_poll - self.debounce

    def _run_once(self) -> bool:
        """Probe, then run the incremental derivation; ``True`` when a run succeeded or was not needed."""
        assert self._db is not None
        now = time.monotonic()
        idle = now - self._last_run >= self.max_idle
        if not idle and not anything_new(self._db, latest_base(self._db, job=JOB)):
            self.stats.probes_nothing_new += 1
            self._dirty_since = None
            return True
        tick = time.perf_counter()
        try:
            as_of = self._db.fetch_value("SELECT clock_timestamp()")
            self._db.rollback()
            report = run_derivation(self._db, as_of=as_of, lookback=self.lookback, rules=self.rules)
        except LockBusy:
            self.stats.lock_busy += 1
            delay = self._run_backoff.next()
            self._retry_at = time.monotonic() + delay
            self.log(f"another derive run holds the lock; retry in {delay:.1f}s")
            return False
        except SourceError:
            raise
        except DeriveError as exc:
            self.stats.failed_runs += 1
            delay = self._run_backoff.next()
            self._retry_at = time.monotonic() + delay
            self.log(f"run failed ({exc}); retry in {delay:.1f}s")
            return False
        self._run_backoff.reset()
        self._retry_at = 0.0
        self._last_run = time.monotonic()
        self._dirty_since = None
        changed = int(report.counts.get("users_changed", 0))
        evaluated = int(report.counts.get("users_evaluated", 0))
        self.stats.runs += 1
        self.stats.users_evaluated += evaluated
        self.stats.users_changed += changed
        self.log(
            f"{report.headline}: {evaluated} users evaluated, {changed} changed,"
            f" {report.counts.get('users_rejected', 0)} rejected in"
            f" {time.perf_counter() - tick:.2f}s (run {report.run_id})"
        )
        return True


# -- Mode A ------------------------------------------------------------------------------------------


def schedule_units(
    *,
    executable: str,
    every: timedelta = timedelta(minutes=15),
    lookback: timedelta = timedelta(days=120),
    env_file: Path = Path("/etc/derive/derive.env"),
    log_file: Path = Path("/var/log/derive/run.log"),
    user: str = "derive",
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
        "# nightly: a full dry run compared with the stored states (exit 1 lists differing users)\n"
        f"30 4 * * * set -a && . {env_file} && set +a && {command} --verify >> {log_file} 2>&1\n"
        f"# needs: {env_file} setting DERIVE_DSN=postgresql://..., and the folder"
        f" {log_file.parent} (mkdir -p {log_file.parent}; cron does not create it)\n"
    )
    service = f"""[Unit]
Description=derive: audience-state derivation (one run)
Wants=network-online.target
After=network-online.target postgresql.service

[Service]
Type=oneshot
User={user}
# Must set DERIVE_DSN=postgresql://user@host:5432/db (without it derive would use an embedded server).
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
User={user}
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
