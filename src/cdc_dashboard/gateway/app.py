"""The gateway application (`create_app`) and how `cdc-dashboard serve` runs it under uvicorn (`serve`).

The app mounts its own routes (event streams, operations) and those of the figures, webhooks and page
modules, and keeps what they share in one `GatewayState` (gateway/state.py). Its lifespan opens the asyncpg pool,
starts the hub (one LISTEN connection for the whole process) and, with `with_listener`, the listener in the same
process.

Errors: an HTTPException becomes `{"error": reason}` with its status; a database that cannot be reached or does
not answer a 503 with `Retry-After` (gateway/database.py); anything else is a 500 with
`{"error": "internal error"}` (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import asyncpg
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..config import Settings
from ..db import connect_sync, describe_url
from ..errors import UserError
from ..sqlfiles import queries
from ..systemd import Notifier
from . import figures, openapi, ops, page, rejections, streams, webhooks
from .database import (
    UNAVAILABLE_MESSAGE,
    DatabaseUnavailable,
    OneLineOutages,
    create_pool,
    describe_error,
    is_unavailable,
    outage_retry_after,
)
from .heap import HeapKeeper
from .hub import Hub
from .limits import Limits
from .metrics import GatewayMetrics
from .state import GatewayState, gateway_state

__all__ = ["create_app", "serve"]

log = logging.getLogger(__name__)

# uvicorn's graceful shutdown window: streams have ended by then (drain), so this only bounds stragglers;
# with the lifespan shutdown after it the process exits well within 10 s of SIGTERM.
GRACEFUL_SHUTDOWN_SECONDS = 5
_CLOSE_TIMEOUT = 2.0
_DATABASE_ERRORS: tuple[type[Exception], ...] = (
    DatabaseUnavailable,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    # Every refusal is counted and logged here, once (the webhooks have their own path to `record`).
    rejections.record(request, exc.status_code, rejections.reason_of(exc), str(exc.detail))
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _database_unavailable(request: Request, exc: Exception) -> Response:
    """DatabaseUnavailable (gateway/database.py), and connection-class errors raised outside `borrow`: a 503
    with Retry-After, counted and logged as one refusal (no traceback: the cause is the database, not code)."""
    if not isinstance(exc, DatabaseUnavailable) and not is_unavailable(exc):
        raise exc  # a bug of the same class: _server_error logs it with its traceback, a 500
    cause = exc.__cause__ if isinstance(exc, DatabaseUnavailable) and exc.__cause__ is not None else exc
    rejections.record(request, 503, "unavailable", UNAVAILABLE_MESSAGE, error=describe_error(cause))
    return JSONResponse({"error": UNAVAILABLE_MESSAGE}, status_code=503, headers={"Retry-After": outage_retry_after()})


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return JSONResponse({"error": "internal error"}, status_code=500)


def _cors(settings: Settings) -> list[Middleware]:
    origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            max_age=600,
        )
    ]


def create_app(settings: Settings, *, with_listener: bool = False) -> Starlette:
    """The gateway as an ASGI app on `settings.database_url`; nothing connects until its lifespan starts."""
    database_url = settings.require_database_url()
    metrics = GatewayMetrics()
    hub = Hub(
        database_url,
        metrics,
        recent_events=settings.sse_replay_memory_events,
        send_timeout=settings.sse_send_timeout_seconds,
    )
    state = GatewayState(settings, metrics, hub, Limits.from_settings(settings))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.listener = None
        state.fatal = None
        state.pool = await create_pool(database_url)
        listener_task: asyncio.Task[None] | None = None
        # Open streams are long-lived objects: keep the garbage collector from walking them on every broadcast.
        heap = HeapKeeper()
        try:
            await hub.start()
            heap.start()
            if with_listener:
                listener_task = _start_listener(state)
            log.info("gateway started", extra={"node": hub.node, "position": hub.position})
            yield
        finally:
            hub.drain()
            if listener_task is not None and state.listener is not None:
                state.listener.stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(listener_task, timeout=_CLOSE_TIMEOUT * 2)
            await hub.stop()
            heap.stop()
            pool, state.pool = state.pool, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.close(), timeout=_CLOSE_TIMEOUT)
            log.info("gateway stopped")

    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietCutFilter) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_QuietCutFilter())
    pool_log = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, OneLineOutages) for f in pool_log.filters):
        pool_log.addFilter(OneLineOutages())
    app = Starlette(
        routes=[*streams.routes, *ops.routes, *figures.routes, *webhooks.routes, *page.routes, *openapi.routes],
        middleware=_cors(settings),
        exception_handlers={
            HTTPException: _http_error,
            # Connection-class errors become a 503 wherever they are raised (_database_unavailable tells them
            # apart from bugs of the same classes, which it sends on to _server_error).
            **dict.fromkeys(_DATABASE_ERRORS, _database_unavailable),
            Exception: _server_error,
        },
        lifespan=lifespan,
    )
    # No trailing-slash redirects: starlette builds their Location from the Host header, so a forged Host would
    # make the gateway redirect (and a cache remember) to any site. `/stats/` is a 404 like any unknown path.
    app.router.redirect_slashes = False
    app.state.gateway = state
    return app


def _start_listener(state: GatewayState) -> asyncio.Task[None]:
    from ..listener import EnhancedRealtimeManager

    # The gateway speaks sd_notify for the whole process (READY once it accepts connections); the listener's
    # own READY would come before the socket is bound.
    listener = EnhancedRealtimeManager(state.settings, notifier=_MutedNotifier())
    state.listener = listener
    task = asyncio.create_task(listener.run(), name="listener")

    def finished(done: asyncio.Task[None]) -> None:
        if state.hub.draining:
            return  # stopping: expected
        reason = "stopped" if done.cancelled() or done.exception() is None else repr(done.exception())
        # A listener that dies takes the process down loudly, so systemd's Restart= brings both back.
        log.critical("the in-process listener ended unexpectedly", extra={"reason": reason})
        state.fatal = reason
        if state.on_fatal is not None:
            state.on_fatal()

    task.add_done_callback(finished)
    return task


class _MutedNotifier(Notifier):
    def notify(self, message: str) -> None:
        return None


class _QuietCutFilter(logging.Filter):
    """A stream the gateway cuts on purpose (slow client) leaves its response unfinished; the gateway logs
    that itself, so uvicorn's generic error line for it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("ASGI callable returned without completing response")


class _GatewayServer(uvicorn.Server):
    """uvicorn, plus: the first SIGTERM/SIGINT drains the streams before uvicorn's own shutdown begins; and
    sd_notify for systemd's Type=notify: READY once listening (the hub's LISTEN is up by then: the lifespan
    waits for it), WATCHDOG from uvicorn's main loop, STOPPING on SIGTERM."""

    def __init__(self, config: uvicorn.Config, app: Starlette, on_ready: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._state = gateway_state(app)
        self._on_ready = on_ready
        self._notifier = Notifier()
        self._announce: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._announce = asyncio.create_task(self._announce_ready(self._on_ready))

    async def _announce_ready(self, on_ready: Callable[[], None] | None) -> None:
        listener = self._state.listener
        if listener is not None:
            await listener.ready.wait()
        self._notifier.ready("serving")
        if on_ready is not None:
            on_ready()

    async def on_tick(self, counter: int) -> bool:
        # Ticks every 0.1 s while the event loop runs; a hung loop stops them and systemd restarts us.
        self._notifier.watchdog()
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._notifier.stopping()
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_soon_threadsafe(self._state.hub.drain)
        super().handle_exit(sig, frame)


def _preflight(database_url: str, *, with_listener: bool) -> None:
    """Fail fast with one line, rather than a lifespan traceback, on the two usual deployment mistakes."""
    with connect_sync(database_url) as conn:
        row = conn.execute(queries("gateway")["schema_present"]).fetchone()
        listener_ready = conn.execute(queries("listener")["schema_ready"]).fetchone() if with_listener else (True,)
    if row is None or not row[0]:
        raise UserError(f"{describe_url(database_url)} has no cdc-dashboard schema: run `cdc-dashboard db apply`")
    if listener_ready is None or not listener_ready[0]:
        raise UserError("the database's schema is older than this listener: run `cdc-dashboard db apply`")


def serve(
    settings: Settings,
    *,
    with_listener: bool = False,
    on_ready: Callable[[], None] | None = None,
    **uvicorn_options: Any,
) -> int:
    """Run the gateway until SIGTERM/SIGINT; the exit code is non-zero when the in-process listener died.

    `on_ready` is called once the gateway accepts connections (and the in-process listener is ready).
    Raises UserError (one line for the operator) when the database is unreachable or has no schema.
    """
    _preflight(settings.require_database_url(), with_listener=with_listener)
    app = create_app(settings, with_listener=with_listener)
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        # X-Forwarded-For is believed only from CDC_TRUSTED_PROXIES (ingest's allow-list does that); uvicorn's
        # own proxy handling would trust it from 127.0.0.1 and rewrite the peer before our check runs.
        proxy_headers=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        **uvicorn_options,
    )
    server = _GatewayServer(config, app, on_ready)

    def fatal() -> None:
        server.handle_exit(signal.SIGTERM, None)

    state = gateway_state(app)
    state.on_fatal = fatal
    server.run()
    if state.fatal is not None:
        return 1
    return 0 if server.started else 1
