"""Connections: psycopg for the synchronous DBA tooling, asyncpg for the service's hot paths."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psycopg
from asyncpg.pool import PoolConnectionProxy

from ..errors import UserError

__all__ = ["AsyncConnection", "connect_dedicated", "connect_sync", "describe_url", "keepalive_kwargs", "with_database"]

# An asyncpg connection of its own or one borrowed from a pool: the same methods, two types.
AsyncConnection: TypeAlias = asyncpg.Connection | PoolConnectionProxy

# TCP keepalives on every connection that must notice a silently dead peer: probe after 5 s of silence, every
# 2 s, give up after 3 unanswered probes, so about 10 seconds rather than the kernel's two hours.
_KEEPALIVE_IDLE, _KEEPALIVE_INTERVAL, _KEEPALIVE_COUNT = 5, 2, 3


def describe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "local socket"
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}@" if parts.username else ""
    return f"postgresql://{user}{host}{port}{parts.path}"


def keepalive_kwargs() -> dict[str, Any]:
    """libpq TCP keepalives: a silently dead server is noticed in about 10 seconds, not hours."""
    return {
        "keepalives": 1,
        "keepalives_idle": _KEEPALIVE_IDLE,
        "keepalives_interval": _KEEPALIVE_INTERVAL,
        "keepalives_count": _KEEPALIVE_COUNT,
    }


async def connect_dedicated(
    url: str, *, application_name: str, command_timeout: float, timeout: float = 10.0
) -> asyncpg.Connection:
    """A connection of its own, never from a pool, for what lives as long as the connection: a LISTEN, a session
    advisory lock. Server-side keepalives make PostgreSQL drop a dead client within about 10 seconds, and with it
    the client's locks; a statement that runs past `command_timeout` means a dead connection to the caller."""
    return await asyncpg.connect(
        url,
        timeout=timeout,
        command_timeout=command_timeout,
        server_settings={
            "application_name": application_name,
            "tcp_keepalives_idle": str(_KEEPALIVE_IDLE),
            "tcp_keepalives_interval": str(_KEEPALIVE_INTERVAL),
            "tcp_keepalives_count": str(_KEEPALIVE_COUNT),
        },
    )


@contextmanager
def connect_sync(url: str, *, autocommit: bool = True, connect_timeout: int = 10) -> Iterator[psycopg.Connection[Any]]:
    """A psycopg connection, or a UserError that says which database could not be reached and why."""
    try:
        conn = psycopg.connect(url, autocommit=autocommit, connect_timeout=connect_timeout, **keepalive_kwargs())
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"cannot connect to {describe_url(url)}: {reason}") from None
    with conn:
        yield conn


def with_database(url: str, database: str) -> str:
    """The same server URL naming another database (works for socket URLs with ?host= too)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))
