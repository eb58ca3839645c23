"""Ctrl-C during a database call is never lost.

While an ADBC call blocks, the driver manager swaps Python's SIGINT handler for its own, which
asks the server to cancel the statement (the cancelled statement then fails with query_canceled,
see :func:`derive.cli.cancelled_by_user`). When the statement has already finished on the server
(a COPY whose rows are all sent, a result still being decoded), the cancel does nothing, no error
comes back and the interrupt is gone: the job would carry on, and commit, as if Ctrl-C had never
been pressed. :func:`install` wraps the driver manager's blocking call so that a cancel asked for
during a call that then returns normally raises :class:`KeyboardInterrupt` as the call returns,
or, when the cancel lands after it, as the next call starts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any

_lock = threading.Lock()
_installed: list[bool] = []  # one entry once installed
_pending = threading.Event()


def _raise_pending() -> None:
    # Only the main thread: KeyboardInterrupt belongs there (a reader thread's error could be
    # set aside by its caller, and the interrupt with it).
    if _pending.is_set() and threading.current_thread() is threading.main_thread():
        _pending.clear()
        raise KeyboardInterrupt


def _wrap(blocking: Callable[..., Any]) -> Callable[..., Any]:
    def call(func: Any, args: Any, kwargs: Any, cancel: Callable[[], None]) -> Any:
        _raise_pending()

        def cancel_and_remember() -> None:
            _pending.set()
            cancel()

        try:
            result = blocking(func, args, kwargs, cancel_and_remember)
        except BaseException:
            _pending.clear()  # the interrupt surfaced as this error (query_canceled, or itself)
            raise
        _raise_pending()
        return result

    return call


def install() -> None:
    """Wrap ``adbc_driver_manager.dbapi``'s blocking call once per process (idempotent)."""
    with _lock:
        if _installed:
            return
        from adbc_driver_manager import dbapi

        dbapi._blocking_call = _wrap(dbapi._blocking_call)  # type: ignore[attr-defined]
        dbapi.Cursor.__del__ = _quiet_del(dbapi.Cursor.__del__)  # type: ignore[method-assign]
        _installed.append(True)


def _quiet_del(finalize: Callable[[Any], None]) -> Callable[[Any], None]:
    """A cursor collected after Ctrl-C may still hold its cancelled statement: closing it then
    fails, and Python would print that error's traceback under the job's one-line message."""

    def __del__(self: Any) -> None:
        with suppress(Exception):  # nothing to do for a cursor being collected
            finalize(self)

    return __del__
