"""Ctrl-C during a database call whose statement had already finished is not lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from derive.io.interrupts import _wrap

# A blocking call through the driver manager's real SIGINT handling: the signal arrives while the
# call blocks, the driver's interrupt thread runs the cancel, and the cancel finds nothing to stop
# (the statement it would cancel is done), so the call returns normally.
_FINISHED_STATEMENT = textwrap.dedent(
    """
    import os, signal, sys, time
    from adbc_driver_manager import dbapi
    from derive.io.connect import connect

    connect(sys.argv[1]).close()  # opening a connection installs the guard

    def finished_statement():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the driver's interrupt thread runs the cancel meanwhile
        return "returned"

    try:
        print(dbapi._blocking_call(finished_statement, (), {}, lambda: None))
    except KeyboardInterrupt:
        print("KeyboardInterrupt")
    """
)


def test_a_sigint_whose_cancel_finds_nothing_to_stop_still_interrupts(dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _FINISHED_STATEMENT, dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "KeyboardInterrupt"


def test_a_cancel_that_lands_after_its_call_returned_interrupts_the_next_call() -> None:
    late: list[object] = []

    def blocking(func: object, args: object, kwargs: object, cancel: object) -> str:
        late.append(cancel)  # the interrupt thread holds the cancel, runs it after the return
        return "first"

    call = _wrap(blocking)
    assert call(None, (), {}, lambda: None) == "first"
    late[0]()  # type: ignore[operator]

    with pytest.raises(KeyboardInterrupt):
        call(None, (), {}, lambda: None)
    assert call(None, (), {}, lambda: None) == "first"  # raised once, then calls go on


def test_a_cancel_that_stopped_its_statement_is_not_raised_again() -> None:
    def cancelled(func: object, args: object, kwargs: object, cancel: object) -> str:
        cancel()  # type: ignore[operator]
        raise RuntimeError("canceling statement due to user request")

    call = _wrap(cancelled)
    with pytest.raises(RuntimeError):
        call(None, (), {}, lambda: None)

    assert _wrap(lambda *_: "next")(None, (), {}, lambda: None) == "next"


def test_a_reader_thread_leaves_the_interrupt_to_the_main_thread() -> None:
    import threading

    late: list[object] = []
    call = _wrap(lambda f, a, k, cancel: late.append(cancel) or "done")
    call(None, (), {}, lambda: None)
    late[0]()  # type: ignore[operator]
    seen: list[object] = []
    reader = threading.Thread(target=lambda: seen.append(call(None, (), {}, lambda: None)))
    reader.start()
    reader.join()

    assert seen == ["done"]
    with pytest.raises(KeyboardInterrupt):
        call(None, (), {}, lambda: None)
