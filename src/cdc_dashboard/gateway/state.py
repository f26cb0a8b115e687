"""What the routes of one gateway share: its settings, metrics, hub, database pool and in-process listener.

`create_app` makes one `GatewayState` and keeps it on the app; code fetches it with `gateway_state(...)`, typed,
rather than reading loose attributes off `app.state`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from ..config import Settings
from .database import borrow
from .hub import Hub
from .limits import Limits
from .metrics import GatewayMetrics

if TYPE_CHECKING:
    from ..listener import EnhancedRealtimeManager

__all__ = ["GatewayState", "gateway_state"]


@dataclass(eq=False)
class GatewayState:
    settings: Settings
    metrics: GatewayMetrics
    hub: Hub
    # Rate limits, per-token stream cap, refresh cooldown: in this process's memory (gateway/limits.py).
    limits: Limits
    # Open while the app's lifespan runs; None before it starts and after it ends.
    pool: asyncpg.Pool | None = None
    # `serve --with-listener` (and `run`): the listener running in this process.
    listener: EnhancedRealtimeManager | None = None
    # Why the in-process listener ended unexpectedly (the process then exits non-zero), and how `serve` stops.
    fatal: str | None = None
    on_fatal: Callable[[], None] | None = None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[PoolConnectionProxy]:
        """A pooled connection, or DatabaseUnavailable (a 503) within a few seconds (gateway/database.py)."""
        async with borrow(self.pool) as conn:
            yield conn


def gateway_state(where: Starlette | HTTPConnection) -> GatewayState:
    """The state of the app, or of the app that serves this request."""
    app = where if isinstance(where, Starlette) else where.app
    state = app.state.gateway
    assert isinstance(state, GatewayState), "an app made by create_app"
    return state
