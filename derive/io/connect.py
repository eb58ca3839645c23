"""Connections: resolving the DSN, opening ADBC connections, running SQL, wrapping driver errors.

Everything goes through :class:`Db`, a thin layer over one ADBC connection that keeps explicit
transactions (autocommit off), binds parameters (never interpolates values) and turns driver
exceptions into :class:`~derive.errors.SourceError` with a message that names the host but never
the password.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import polars as pl
import pyarrow as pa

from derive.errors import SourceError

_PASSWORD_KV = re.compile(r"(password\s*=\s*)(\S+)", re.IGNORECASE)
_PASSWORD_URL = re.compile(r"(://[^:/@]+:)([^@]*)(@)")


def redact(text: str) -> str:
    """Remove passwords from a DSN or from a driver message that quotes one."""
    return _PASSWORD_KV.sub(r"\1***", _PASSWORD_URL.sub(r"\1***\3", text))


def without_password(dsn: str) -> str:
    """The DSN with its password left out (libpq then takes it from PGPASSWORD or ~/.pgpass)."""
    if "://" not in dsn:
        return " ".join(_PASSWORD_KV.sub("", dsn).split())
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}@{host}"
    query = urlencode(
        [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"]
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def describe_dsn(dsn: str) -> str:
    """``host:port/database`` of a URL or key=value DSN, for messages (no user, no password)."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
        database = parts.path.lstrip("/") or "(default database)"
        return f"{host}:{port}/{database}"
    kv = dict(re.findall(r"(\w+)\s*=\s*('[^']*'|\S+)", dsn))
    host = kv.get("host", "localhost").strip("'")
    return f"{host}:{kv.get('port', '5432')}/{kv.get('dbname', '(default database)')}"


def _dsn_port(dsn: str) -> int:
    """The port a DSN names (5432 when it names none)."""
    if "://" in dsn:
        try:
            return urlsplit(dsn).port or 5432
        except ValueError:
            return 5432
    match = re.search(r"(?:^|\s)port\s*=\s*'?(\d+)", dsn)
    return int(match.group(1)) if match else 5432


_APPLICATION_NAME = re.compile(r"(^|[?&\s])application_name\s*=")


def with_application_name(dsn: str) -> str:
    """``dsn`` with ``application_name=derive`` added unless it names one (other parameters,
    TLS ones included, are passed through untouched), so hosted servers show who is connected."""
    if not dsn or _APPLICATION_NAME.search(dsn):
        return dsn
    if "://" in dsn:
        return f"{dsn}{'&' if '?' in dsn else '?'}application_name=derive"
    return f"{dsn} application_name=derive"


def _first_line(exc: BaseException) -> str:
    text = redact(str(exc))
    text = re.sub(r"^[A-Z_]+: (\[libpq\] )?", "", text.strip())
    text = text.split("\nQuery was:")[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else type(exc).__name__


def driver_message(exc: BaseException) -> str:
    """The useful part of a driver error, one line, password-free."""
    return _first_line(exc)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error, when it carries one."""
    state = getattr(exc, "sqlstate", None)
    if state:
        return str(state)
    match = re.search(r"SQLSTATE: ([0-9A-Z]{5})", str(exc))
    return match.group(1) if match else None


# Connection loss, by SQLSTATE (admin shutdown, crash, connection failure, protocol error: what a
# pooler sends when it cuts a client) or by the text of libpq's and PgBouncer's messages.
_LOST_STATES = frozenset({"57P01", "57P02", "57P03", "08000", "08003", "08006", "08P01"})
_LOST_TEXT = re.compile(
    r"terminating connection|server closed the connection|connection to server .*lost"
    r"|no connection to the server|query_timeout|idle transaction timeout|server conn crashed"
    r"|EOF detected|SSL SYSCALL|could not receive data|connection reset|broken pipe",
    re.IGNORECASE,
)


def is_connection_lost(exc: BaseException) -> bool:
    """Whether a driver error means the server or a pooler closed the connection."""
    return sqlstate(exc) in _LOST_STATES or bool(_LOST_TEXT.search(str(exc)))


class ConnectionLost(SourceError):
    """The server or a pooler between closed the connection in the middle of a statement."""


class Db:
    """One ADBC connection with explicit transactions.

    Use :func:`connect` to open one. Statements run inside an implicit transaction that lasts until
    :meth:`commit` or :meth:`rollback`; :meth:`transaction` wraps a block in one.
    """

    def __init__(self, conn: Any, label: str, dsn: str = "") -> None:
        self._conn = conn
        self.label = label
        self._dsn = dsn  # to open a sibling connection; never shown
        self._proxied: bool | None = None

    def proxied(self) -> bool:
        """Whether the server listens on another port than the DSN's: a pooler or a proxy between.

        Behind a transaction-mode pooler every open transaction holds one of the pool's few
        server connections (Supabase's port 6543 in front of 5432; PgBouncer's default_pool_size),
        so a job must not hold two at once: the lease's heartbeat and the next cron run need one.
        Asked once per connection, at a transaction boundary (it ends the open transaction).
        """
        if self._proxied is None:
            self.rollback()
            server = self.fetch_value("SELECT current_setting('port')::int")
            self.rollback()
            self._proxied = server is not None and int(server) != _dsn_port(self._dsn)
        return self._proxied

    @property
    def dsn(self) -> str:
        """The connection string this connection was opened with (for a task's own connection;
        never shown)."""
        return self._dsn

    def sibling(self) -> Db:
        """A new connection to the same database.

        It shares this connection's ADBC database object, so the driver's type catalogue (read
        from pg_type when a database object is created: ~50 ms) is not read again (~2 ms).
        """
        import adbc_driver_manager

        try:
            clone = self._conn.adbc_clone()
        except adbc_driver_manager.Error as exc:
            raise SourceError(
                f"cannot connect to PostgreSQL at {self.label}: {_first_line(exc)} "
                "(check --dsn or DERIVE_DSN)"
            ) from None
        return Db(clone, self.label, self._dsn)

    # -- plumbing -----------------------------------------------------------------------------------
    @property
    def raw(self) -> Any:
        """The underlying ADBC DB-API connection."""
        return self._conn

    def _wrap(self, exc: BaseException, sql: str, *, rows: int | None = None) -> SourceError:
        head = " ".join(sql.split())[:80]
        if is_connection_lost(exc):
            so_far = f" after {rows:,} rows" if rows else ""
            return ConnectionLost(
                f"lost the connection to PostgreSQL at {self.label} during `{head}`{so_far}:"
                f" {_first_line(exc)}. The server or a pooler between closed it (a pooler's"
                " query_timeout or other limit, a restart, an administrator); the open"
                " transaction was rolled back, nothing of it was kept. Run again; if it happens"
                " again on large reads, connect in session mode (Supabase: the direct"
                " connection or the pooler's port 5432, not 6543) or raise the pooler's limits"
                " (PgBouncer: query_timeout, idle_transaction_timeout)."
            )
        return SourceError(f"PostgreSQL at {self.label} rejected `{head}`: {_first_line(exc)}")

    def lift_timeouts(self) -> None:
        """No statement or idle-in-transaction timeout for the open transaction (``SET LOCAL``).

        Hosted servers set low defaults per role or database (Supabase: seconds to minutes);
        a window read or a bulk write of a large run outlasts them. Transaction-local, so nothing
        is left on a pooled server connection.
        """
        self.execute(
            "SELECT set_config('statement_timeout', '0', true),"
            " set_config('idle_in_transaction_session_timeout', '0', true)"
        )

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        """Run one statement, binding ``params`` to ``$1, $2, ...``."""
        import adbc_driver_manager

        with self._conn.cursor() as cur:
            try:
                cur.execute(sql, params)
            except adbc_driver_manager.Error as exc:
                raise self._wrap(exc, sql) from exc

    def fetch_arrow(self, sql: str, params: Sequence[Any] | None = None) -> pa.Table:
        """Run a query and return its result as one Arrow table.

        A query without parameters is streamed with COPY (binary) by the driver; bind values
        through :meth:`set_local` first to keep that fast path.
        """
        import adbc_driver_manager

        with self._conn.cursor() as cur:
            try:
                cur.execute(sql, params)
                table: pa.Table = cur.fetch_arrow_table()
            except (adbc_driver_manager.Error, pa.ArrowException, OSError) as exc:
                raise self._wrap(exc, sql) from exc
        return table

    def stream_df(self, sql: str) -> Iterator[pl.DataFrame]:
        """Run a query (no parameters: the driver's COPY path) and yield its rows batch by batch.

        Only one batch is held at a time (plus the driver's read-ahead), so the result may be
        larger than memory.
        """
        import adbc_driver_manager

        rows = 0
        with self._conn.cursor() as cur:
            try:
                cur.execute(sql)
                reader = cur.fetch_record_batch()
                for batch in reader:
                    rows += batch.num_rows
                    frame = pl.from_arrow(_plain_arrow(pa.Table.from_batches([batch])))
                    assert isinstance(frame, pl.DataFrame)
                    yield frame
            except (adbc_driver_manager.Error, pa.ArrowException, OSError) as exc:
                # A result cut mid-stream surfaces from the batch reader as an Arrow IO error.
                raise self._wrap(exc, sql, rows=rows) from exc

    def fetch_df(self, sql: str, params: Sequence[Any] | None = None) -> pl.DataFrame:
        """Like :meth:`fetch_arrow`, as a Polars frame (uuid columns arrive as 16-byte binary)."""
        frame = pl.from_arrow(_plain_arrow(self.fetch_arrow(sql, params)))
        assert isinstance(frame, pl.DataFrame)
        return frame

    def fetch_all(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a small query and return its rows as tuples."""
        import adbc_driver_manager

        with self._conn.cursor() as cur:
            try:
                cur.execute(sql, params)
                rows: list[tuple[Any, ...]] = cur.fetchall()
            except adbc_driver_manager.Error as exc:
                raise self._wrap(exc, sql) from exc
        return rows

    def fetch_value(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        """First column of the first row, or ``None``."""
        rows = self.fetch_all(sql, params)
        return rows[0][0] if rows else None

    def set_local(self, **settings: str) -> None:
        """``set_config(name, value, true)`` for each setting: transaction-local, bound values.

        Queries then read them with ``current_setting('derive.name')`` and need no parameters,
        which keeps ADBC on its COPY-based read path.
        """
        for name, value in settings.items():
            self.execute("SELECT set_config($1, $2, true)", (f"derive.{name}", value))

    def ingest(
        self,
        table: str,
        data: pl.DataFrame | pa.Table,
        *,
        mode: Literal["create", "append"] = "create",
    ) -> int:
        """Bulk-load ``data`` into a temporary table ``table`` (binary COPY). Returns rows.

        ``mode="create"`` makes the table; ``"append"`` adds to one made before.
        """
        import adbc_driver_manager

        arrow = data.to_arrow() if isinstance(data, pl.DataFrame) else data
        with self._conn.cursor() as cur:
            try:
                rows = cur.adbc_ingest(table, arrow, mode=mode, temporary=True)
            except adbc_driver_manager.Error as exc:
                raise self._wrap(exc, f"COPY INTO temporary table {table}") from exc
        return int(rows if rows is not None and rows >= 0 else arrow.num_rows)

    def commit(self) -> None:
        """Commit the open transaction."""
        import adbc_driver_manager

        try:
            self._conn.commit()
        except adbc_driver_manager.Error as exc:
            raise self._wrap(exc, "COMMIT") from exc

    def rollback(self) -> None:
        """Roll back the open transaction (quietly if the connection is already broken)."""
        import adbc_driver_manager

        with suppress(adbc_driver_manager.Error):
            self._conn.rollback()

    @contextmanager
    def transaction(self, *, role: str | None = None) -> Iterator[Db]:
        """A transaction that commits on success and rolls back on any error.

        Args:
            role: ``SET LOCAL ROLE`` for the block (the job writes as ``service_role``).
        """
        self.rollback()  # start from a clean slate: nothing pending from earlier reads
        try:
            self.lift_timeouts()
            if role is not None:
                self.execute(f'SET LOCAL ROLE "{role}"')
            yield self
        except BaseException:
            self.rollback()
            raise
        self.commit()

    def close(self) -> None:
        """Close the connection (rolling back anything left open)."""
        self.rollback()
        with suppress(Exception):
            self._conn.close()

    def __enter__(self) -> Db:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain_arrow(table: pa.Table) -> pa.Table:
    """Replace extension types (uuid, json, opaque numeric) by their storage types."""
    columns = []
    for column in table.columns:
        if isinstance(column.type, pa.ExtensionType):
            columns.append(
                pa.chunked_array(
                    [chunk.storage for chunk in column.chunks], type=column.type.storage_type
                )
            )
        else:
            columns.append(column)
    return pa.Table.from_arrays(columns, names=table.column_names)


def connect(dsn: str, *, autocommit: bool = False) -> Db:
    """Open an ADBC connection; a failure becomes a one-line :class:`SourceError`.

    Raises:
        SourceError: naming ``host:port/database`` and the server's reason, never the password.
    """
    import adbc_driver_manager
    from adbc_driver_postgresql import dbapi

    from derive.io.interrupts import install

    install()
    label = describe_dsn(dsn)
    try:
        conn = dbapi.connect(with_application_name(dsn), autocommit=autocommit)
    except adbc_driver_manager.Error as exc:
        raise SourceError(
            f"cannot connect to PostgreSQL at {label}: {_first_line(exc)} "
            "(check --dsn or DERIVE_DSN)"
        ) from None
    except Exception as exc:
        raise SourceError(
            f"cannot connect to PostgreSQL at {label}: {redact(str(exc))} (check --dsn or DERIVE_DSN)"
        ) from None
    return Db(conn, label, dsn)
