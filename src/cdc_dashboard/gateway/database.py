"""How the gateway's routes borrow a database connection, and what they answer when the database is away.

A request that needs the database answers within a few seconds whatever the network does: a 503 with
`Retry-After` and `{"error": ...}` when PostgreSQL cannot be reached or does not answer, never a 500 and never
a hang. The bounds, all client-side (a frozen network path never returns a server-side timeout):

- `ACQUIRE_SECONDS`: waiting for a pooled connection, including opening a new one (a refused or silent
  server, or every connection busy);
- `STATEMENT_SECONDS`: any one statement on a pooled connection (the pool's `command_timeout`). Figure reads
  are index lookups on precomputed aggregates, milliseconds; a statement that takes seconds means a dead path.
- `REFRESH_SECONDS`: the one statement that may legitimately run long, a manual refresh's rebuild of a large
  business (a few seconds for 100k payments), given per call.

A connection whose statement failed that way is terminated on the spot rather than returned to the pool:
returning it would wait for a cancellation the server may never acknowledge, and the pool opens a fresh one
for the next request. That, and asyncpg replacing connections it saw close, is how the gateway recovers
by itself when the database comes back.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import AsyncIterator

import asyncpg
from asyncpg.pool import PoolConnectionProxy

__all__ = [
    "ACQUIRE_SECONDS",
    "REFRESH_SECONDS",
    "STATEMENT_SECONDS",
    "UNAVAILABLE_MESSAGE",
    "DatabaseUnavailable",
    "OneLineOutages",
    "borrow",
    "create_pool",
    "describe_error",
    "is_unavailable",
    "outage_retry_after",
]

log = logging.getLogger(__name__)

ACQUIRE_SECONDS = 2.0
STATEMENT_SECONDS = 5.0
REFRESH_SECONDS = 60.0
POOL_MAX_SIZE = 10
UNAVAILABLE_MESSAGE = "the database is unavailable; retry later"

# PostgreSQL error classes that mean "not now" rather than "wrong request": 08 connection exception, 57
# operator intervention (shutdown, crash recovery, a cancelled statement), 53300 too many connections.
_UNAVAILABLE_CLASSES = ("08", "57")
_UNAVAILABLE_STATES = ("53300",)
_FILE_SYSTEM_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class DatabaseUnavailable(Exception):
    """The database cannot be reached or did not answer in time; the request answers 503."""


def is_unavailable(exc: BaseException) -> bool:
    """True for the errors that mean the database is unreachable or silent, not that the request is wrong.

    asyncpg's other InterfaceErrors (wrong arguments, misuse of a connection) are bugs and stay 500s, except
    on a connection that is closed: `borrow` checks that, since only it knows the connection.
    """
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = exc.sqlstate or ""
        return sqlstate.startswith(_UNAVAILABLE_CLASSES) or sqlstate in _UNAVAILABLE_STATES
    if isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError):
        return True
    # OSError: refused, reset, unreachable, a name that does not resolve; not the file system's errors, which
    # in a request are bugs (a socket path that does not exist fails `borrow`'s acquire, which takes any).
    return isinstance(exc, OSError | TimeoutError) and not isinstance(exc, _FILE_SYSTEM_ERRORS)


async def create_pool(database_url: str) -> asyncpg.Pool:
    """The gateway's pool: connections opened within ACQUIRE_SECONDS, statements bounded by STATEMENT_SECONDS."""
    return await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=POOL_MAX_SIZE,
        timeout=ACQUIRE_SECONDS,
        command_timeout=STATEMENT_SECONDS,
    )


@contextlib.asynccontextmanager
async def borrow(pool: asyncpg.Pool | None) -> AsyncIterator[PoolConnectionProxy]:
    """A pooled connection for the body; DatabaseUnavailable when the database cannot be reached, does not
    answer, or the connection dies under the body (other errors pass through unchanged)."""
    if pool is None:  # the gateway is starting or stopping
        raise DatabaseUnavailable("the database pool is not open")
    try:
        conn = await pool.acquire(timeout=ACQUIRE_SECONDS)
    except (asyncpg.InterfaceError, asyncpg.PostgresError, OSError, TimeoutError) as exc:
        # Whatever kept the pool from handing out a connection (refused, silent, a rejected password or a
        # database that does not exist while connecting, the pool closing), there is none: retry later.
        raise DatabaseUnavailable(describe_error(exc)) from exc
    try:
        yield conn
    except Exception as exc:
        dead = _closed(conn) and isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError)
        if not (dead or is_unavailable(exc)):
            raise
        if not _closed(conn):
            conn.terminate()  # don't wait for a cancellation the server may never acknowledge; the pool reconnects
        if isinstance(exc, TimeoutError):
            # A silent path is silent for the pool's idle connections too (a closed one asyncpg notices by
            # itself): have them all replaced at their next use, rather than each costing a request its timeout.
            await pool.expire_connections()
        raise DatabaseUnavailable(describe_error(exc)) from exc
    finally:
        await pool.release(conn)  # nothing to do once closed


def _closed(conn: PoolConnectionProxy) -> bool:
    """Whether the borrowed connection is closed. One that closed under its borrower (the server or the network
    ended it) has already gone back to the pool, and its proxy then raises InterfaceError on every call."""
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True


def describe_error(exc: BaseException) -> str:
    """The error's type and first line: asyncpg and OSError messages name the host and port, never a password."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class OneLineOutages(logging.Filter):
    """asyncpg's pool logs its failed attempts to reconnect in the background with a traceback, every few
    seconds while the database is away; the cause is the database, not code, so one line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_unavailable(exc):
            record.exc_info = None
            record.exc_text = None
            record.error = describe_error(exc)
        return True


def outage_retry_after() -> str:
    """Seconds a client should wait before retrying, spread so that dashboards do not all come back at once."""
    return str(random.randint(2, 5))
