"""Connections: psycopg for the synchronous DBA tooling, asyncpg for the service's hot paths."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from ..errors import UserError

__all__ = ["connect_sync", "describe_url", "keepalive_kwargs", "with_database"]


def describe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or "local socket"
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}@" if parts.username else ""
    return f"postgresql://{user}{host}{port}{parts.path}"


def keepalive_kwargs() -> dict[str, Any]:
    """libpq TCP keepalives: a silently dead peer is noticed in about 10 seconds, not hours."""
    return {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}


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
