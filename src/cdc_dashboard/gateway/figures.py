"""Gateway routes for the seven query keys' data, plus `bookings`, and manual refresh.

Every GET answers with `as_of_event_id` in the body and an ETag; `If-None-Match` with a matching tag gets a
304. The tag is weak and covers everything in the body but `as_of_event_id`: it changes when the data does,
not when some other business's event moves the global id on (which would make every busy-system revalidation
a 200). `X-As-Of-Event-Id` carries the current id on the 304 too. The query layer is cdc_dashboard.figures.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..db import AsyncConnection
from ..figures import reads, rebuild
from .auth import authorize
from .database import REFRESH_SECONDS
from .limits import retry_after
from .rejections import Rejected
from .state import gateway_state

__all__ = ["routes"]

_HEADERS = {"Cache-Control": "no-cache"}


def _business(request: Request) -> uuid.UUID:
    """The path's business id once the token may see it (authorize: 401, 403, 400 for a non-UUID)."""
    raw = request.path_params["business_id"]
    authorize(request, raw)
    return uuid.UUID(raw)


def _etag(body: dict[str, Any]) -> str:
    content = {k: v for k, v in body.items() if k != "as_of_event_id"}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f'W/"{digest[:32]}"'


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    opaque = etag.removeprefix("W/")
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == opaque:
            return True
    return False


def _respond(request: Request, body: dict[str, Any] | None, what: str = "business") -> Response:
    if body is None:
        raise HTTPException(404, f"no such {what}")
    etag = _etag(body)
    headers = {**_HEADERS, "ETag": etag, "X-As-Of-Event-Id": str(body["as_of_event_id"])}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return JSONResponse(body, headers=headers)


async def _with_conn(request: Request, work: Callable[[AsyncConnection], Awaitable[dict[str, Any] | None]]) -> Response:
    try:
        async with gateway_state(request).connection() as conn:
            body = await work(conn)
    except reads.BadRequest as exc:
        raise HTTPException(400, str(exc)) from None
    return _respond(request, body)


async def stats(request: Request) -> Response:
    business_id = _business(request)

    async def work(conn: AsyncConnection) -> dict[str, Any] | None:
        found = await reads.stats(conn, business_id)
        return found.stats_body() if found else None

    return await _with_conn(request, work)


async def business_data(request: Request) -> Response:
    business_id = _business(request)
    return await _with_conn(request, lambda conn: reads.business_data(conn, business_id))


async def revenue(request: Request) -> Response:
    business_id = _business(request)
    params = request.query_params

    async def work(conn: AsyncConnection) -> dict[str, Any] | None:
        series = await reads.revenue_series(
            conn, business_id, params.get("granularity"), params.get("from"), params.get("to")
        )
        return series.body if series else None

    return await _with_conn(request, work)


def _list_route(kind: reads.ListKind) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        business_id = _business(request)
        params = request.query_params

        async def work(conn: AsyncConnection) -> dict[str, Any] | None:
            page = await reads.list_page(conn, kind, business_id, params.get("before"), params.get("limit"))
            if page is None:
                return None
            return {
                "business_id": str(business_id),
                "as_of_event_id": page.as_of_event_id,
                "items": page.items,
                "next_before": page.next_before,
            }

        return await _with_conn(request, work)

    endpoint.__name__ = f"list_{kind}"
    return endpoint


async def refresh(request: Request) -> Response:
    business_id = _business(request)
    state = gateway_state(request)
    # A rebuild reads every row of the business: a held-down refresh button must not run it in a loop.
    # Checked after the token, so an anonymous caller learns nothing about other clients' refreshes.
    cooldown = state.limits.refresh
    left = cooldown.claim(str(business_id))
    if left is not None:
        raise Rejected(
            429,
            f"this business was refreshed less than {cooldown.seconds:g} s ago",
            reason="refresh_cooldown",
            headers={"Retry-After": retry_after(left)},
        )
    try:
        async with state.connection() as conn:
            # The rebuild of a large business may take seconds: it alone gets the longer bound; the reads
            # around it keep the pool's, so a dead database still answers 503 within seconds.
            report = await rebuild.refresh(conn, business_id, rebuild_timeout=REFRESH_SECONDS)
    except BaseException:
        cooldown.forget(str(business_id))  # nothing was refreshed: a retry may run at once
        raise
    if report is None:
        cooldown.forget(str(business_id))  # (nor here: a business that does not exist stays a 404)
        raise HTTPException(404, "no such business")
    return JSONResponse(report, headers=_HEADERS)


_B = "/v1/businesses/{business_id}"
routes: list[BaseRoute] = [
    Route(f"{_B}/stats", stats, methods=["GET"]),
    Route(f"{_B}/revenue", revenue, methods=["GET"]),
    Route(f"{_B}/transactions", _list_route("transactions"), methods=["GET"]),
    Route(f"{_B}/payments", _list_route("payments"), methods=["GET"]),
    Route(f"{_B}/payment-transactions", _list_route("payment_transactions"), methods=["GET"]),
    Route(f"{_B}/client-business-transactions", _list_route("client_business_transactions"), methods=["GET"]),
    Route(f"{_B}/bookings", _list_route("bookings"), methods=["GET"]),
    Route(f"{_B}/refresh", refresh, methods=["POST"]),
    Route(_B, business_data, methods=["GET"]),
]
