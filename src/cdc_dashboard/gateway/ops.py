"""Operations endpoints: `/healthz` (alive), `/readyz` (serving), `/metrics` (Prometheus), `/v1/status` (admin)."""

from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..db import AsyncConnection
from ..sqlfiles import queries
from . import rejections
from .auth import authorize_admin
from .database import UNAVAILABLE_MESSAGE, DatabaseUnavailable, describe_error, is_unavailable, outage_retry_after
from .state import gateway_state

__all__ = ["routes"]

log = logging.getLogger(__name__)

_PROBE_TIMEOUT = 2.0
STATUS_DEAD_LETTERS = 20  # the newest dead letters /v1/status lists (`cdc-dashboard dead-letters list`: all)


async def healthz(request: Request) -> Response:
    """The process answers: nothing else is checked (a restart would not fix a database outage)."""
    return JSONResponse({"status": "ok"})


async def _database_ok(request: Request) -> bool:
    try:
        async with gateway_state(request).connection() as conn:
            await conn.fetchval(queries("gateway")["ping"], timeout=_PROBE_TIMEOUT)
    except DatabaseUnavailable:
        return False
    return True


async def readyz(request: Request) -> Response:
    """200 when the database answers, the events channel is listened to and (in-process) the listener is
    ready; else 503 with what is missing. A draining gateway is not ready: balancers stop sending to it."""
    state = gateway_state(request)
    hub = state.hub
    checks: dict[str, bool] = {
        "database": await _database_ok(request),
        "listening": hub.listening.is_set(),
        "not_draining": not hub.draining,
    }
    if state.listener is not None:
        checks["listener"] = state.listener.ready.is_set()
    ok = all(checks.values())
    if ok:
        return JSONResponse({"status": "ready", "checks": checks})
    failing = ", ".join(name for name, passed in checks.items() if not passed)
    return JSONResponse(
        {"status": "not ready", "checks": checks, "error": f"not ready: {failing}"},
        status_code=503,
        headers={"Retry-After": outage_retry_after()},
    )


async def metrics(request: Request) -> Response:
    """Always 200: the process's own metrics do not depend on the database. The gauges read from it at scrape
    are NaN (unknown) while it cannot be read, and `cdc_database_up` says whether it could."""
    state = gateway_state(request)
    gateway_metrics = state.metrics
    gateway_metrics.open_streams.set(state.hub.subscriber_count)
    row: asyncpg.Record | None = None
    try:
        async with state.connection() as conn:
            row = await conn.fetchrow(queries("gateway")["listener_lag"], timeout=_PROBE_TIMEOUT)
    except DatabaseUnavailable as exc:
        log.warning("metrics: database gauges unavailable", extra={"error": describe_error(exc.__cause__ or exc)})
    except asyncpg.PostgresError as exc:  # e.g. a schema older than this gateway: the scrape still answers
        log.warning("metrics: database gauges unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
    gateway_metrics.database_up.set(0 if row is None else 1)
    unknown = math.nan
    gateway_metrics.listener_backlog.set(unknown if row is None else row["backlog"])
    gateway_metrics.listener_lag.set(unknown if row is None else row["lag_seconds"])
    heartbeat_age = None if row is None else row["heartbeat_age_seconds"]
    gateway_metrics.listener_heartbeat_age.set(unknown if heartbeat_age is None else heartbeat_age)
    gateway_metrics.dead_letters.set(unknown if row is None else row["dead_letters"])
    return Response(generate_latest(gateway_metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


async def _dead_letters(conn: AsyncConnection) -> dict[str, Any]:
    """The changes the listener set aside: how many, since when, and the newest few (docs/API.md)."""
    q = queries("gateway")
    summary = await conn.fetchrow(q["dead_letters_summary"])
    assert summary is not None  # an aggregate without group by: always one row
    recent = await conn.fetch(q["dead_letters_recent"], STATUS_DEAD_LETTERS)
    return {
        "count": summary["count"],
        "oldest_at": _jsonable(summary["oldest_at"]),
        "recent": [{key: _jsonable(value) for key, value in dict(r).items()} for r in recent],
    }


async def status(request: Request) -> Response:
    """Troubleshooting state for an admin: this gateway, the listener's bookkeeping row, the changes it set
    aside, the embedded listener."""
    authorize_admin(request)
    state = gateway_state(request)
    body: dict[str, Any] = {"gateway": state.hub.status()}
    if state.listener is not None:
        body["embedded_listener"] = {key: _jsonable(value) for key, value in state.listener.status().items()}
    try:
        async with state.connection() as conn:
            row = await conn.fetchrow(queries("gateway")["listener_state"], timeout=_PROBE_TIMEOUT)
            body["listener_state"] = {key: _jsonable(value) for key, value in dict(row).items()} if row else None
            try:
                body["dead_letters"] = await _dead_letters(conn)
            except asyncpg.PostgresError as exc:  # e.g. a schema older than this gateway: the rest still helps
                if is_unavailable(exc):
                    raise
                body["dead_letters"] = {"error": f"{type(exc).__name__}: {exc}"}
    except DatabaseUnavailable as exc:
        # Still the gateway's own state, which is what an admin troubleshooting an outage needs (the hub's
        # last LISTEN error), with the 503 every endpoint that needs the database answers.
        cause = exc.__cause__ or exc
        rejections.record(request, 503, "unavailable", UNAVAILABLE_MESSAGE, error=describe_error(cause))
        body["database"] = f"unreachable: {type(cause).__name__}"
        body["error"] = UNAVAILABLE_MESSAGE
        return JSONResponse(body, status_code=503, headers={"Retry-After": outage_retry_after()})
    body["database"] = "ok"
    return JSONResponse(body)


routes: list[BaseRoute] = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/v1/status", status, methods=["GET"]),
]
