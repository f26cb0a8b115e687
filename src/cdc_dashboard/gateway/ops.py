"""Operations endpoints: `/healthz` (alive), `/readyz` (serving), `/metrics` (Prometheus), `/v1/status` (admin)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..db import AsyncConnection
from ..sqlfiles import queries
from .auth import authorize_admin
from .state import gateway_state

__all__ = ["routes"]

_PROBE_TIMEOUT = 2.0
STATUS_DEAD_LETTERS = 20  # the newest dead letters /v1/status lists (`cdc-dashboard dead-letters list`: all)


async def healthz(request: Request) -> Response:
    """The process answers: nothing else is checked (a restart would not fix a database outage)."""
    return JSONResponse({"status": "ok"})


async def _database_ok(request: Request) -> bool:
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT), gateway_state(request).database().acquire() as conn:
            await conn.fetchval(queries("gateway")["ping"])
    except Exception:
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
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    state = gateway_state(request)
    gateway_metrics = state.metrics
    gateway_metrics.open_streams.set(state.hub.subscriber_count)
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT), state.database().acquire() as conn:
            row = await conn.fetchrow(queries("gateway")["listener_lag"])
    except Exception:
        row = None  # the database is unreachable: /readyz says so; the gauges keep their last values
    if row is not None:
        gateway_metrics.listener_backlog.set(row["backlog"])
        gateway_metrics.listener_lag.set(row["lag_seconds"])
        if row["heartbeat_age_seconds"] is not None:
            gateway_metrics.listener_heartbeat_age.set(row["heartbeat_age_seconds"])
        gateway_metrics.dead_letters.set(row["dead_letters"])
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
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT), state.database().acquire() as conn:
            row = await conn.fetchrow(queries("gateway")["listener_state"])
            body["listener_state"] = {key: _jsonable(value) for key, value in dict(row).items()} if row else None
            try:
                body["dead_letters"] = await _dead_letters(conn)
            except asyncpg.PostgresError as exc:  # e.g. a schema older than this gateway: the rest still helps
                body["dead_letters"] = {"error": f"{type(exc).__name__}: {exc}"}
        body["database"] = "ok"
    except Exception as exc:
        body["database"] = f"unreachable: {type(exc).__name__}"
    if state.listener is not None:
        body["embedded_listener"] = {key: _jsonable(value) for key, value in state.listener.status().items()}
    return JSONResponse(body)


routes: list[BaseRoute] = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/v1/status", status, methods=["GET"]),
]
