"""`GET /v1/businesses/{id}/events`: a business's invalidation events as Server-Sent Events.

The order of things is what makes the stream lossless:
1. authorise, then register a subscriber with the hub, all before the response starts: any event the hub
   dispatches after the client sees the response headers reaches this stream;
2. with `Last-Event-ID: N` (or `?last_event_id=N`), replay the business's events after N from the database,
   or send `resync` first when N is older than retained history;
3. continue with the subscriber's buffer, dropping what the replay already sent (ids only grow).

The stream ends when the token expires, when the client goes away, when it stops reading (its buffer fills,
or a send stays blocked: it resumes by id), and on SIGTERM, with a jittered `retry:` so dashboards do not all
reconnect to the next replica at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator

import asyncpg
from sse_starlette.event import ServerSentEvent
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..sqlfiles import queries
from .addresses import client_address, rate_limit_key
from .auth import TokenClaims, authorize
from .database import DatabaseUnavailable
from .eventstream import EventStreamResponse
from .hub import SEP, HubEvent, Subscriber, encode_event
from .limits import retry_after
from .rejections import Rejected
from .state import gateway_state

__all__ = ["MAX_EVENT_ID", "RETRY_MS", "parse_event_id", "routes"]

log = logging.getLogger(__name__)

# The reconnect delay a stream announces at its start.
RETRY_MS = 2000
# On SIGTERM streams end with a retry drawn from this range (ms), spreading the reconnects.
DRAIN_RETRY_MS = (1000, 5000)
_REPLAY_PAGE = 500
PING = ServerSentEvent(comment="ping", sep=SEP).encode()
SSE_HEADERS = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}


def _retry_after() -> str:
    return str(random.randint(1, 5))


def _retry_in(seconds: float) -> dict[str, str]:
    return {"Retry-After": retry_after(seconds)}


# Event ids are PostgreSQL bigints; a larger number is no id this database gave (and would not bind to a query).
MAX_EVENT_ID = 2**63 - 1


def _last_event_id(request: Request) -> int | None:
    """The header, else `?last_event_id=`; each is checked even when the header wins, so a bad value is a 400."""
    header = parse_event_id(request.headers.get("last-event-id"))
    query = [parse_event_id(value) for value in request.query_params.getlist("last_event_id")]
    if header is not None:
        return header
    return query[-1] if query else None


def parse_event_id(raw: str | None) -> int | None:
    """A Last-Event-ID: None when absent or blank, else an int from 0 to MAX_EVENT_ID, else HTTPException(400)."""
    if raw is None or raw.strip() == "":
        return None
    value = raw.strip()
    # ASCII digits only (int() would also take "+5", "5_0" and other scripts' digits); 19 digits hold any bigint.
    if not (value.isascii() and value.isdigit() and len(value) <= 19 and int(value) <= MAX_EVENT_ID):
        raise HTTPException(400, f"Last-Event-ID must be an integer from 0 to {MAX_EVENT_ID}")
    return int(value)


async def _events(
    request: Request,
    sub: Subscriber,
    claims: TokenClaims,
    last_id: int | None,
    start: int,
    recent: list[HubEvent] | None,
    first_page: list[asyncpg.Record] | None,
) -> AsyncGenerator[bytes, None]:
    state = gateway_state(request)
    metrics = state.metrics
    yield ServerSentEvent(retry=RETRY_MS, sep=SEP).encode()
    # The stream's position (the last id written) lives on the subscriber: the hub advances it too when it
    # writes a live event straight to the connection.
    sub.sent = start if last_id is None else last_id
    if recent is not None:
        # Taken from the hub's memory when the stream subscribed: exactly the events up to `start`.
        sub.sent = start
        for event in recent:
            metrics.events_replayed.inc()
            metrics.events_sent.inc()
            yield event.encoded
    elif last_id is not None and first_page is not None:
        try:
            async for frame, event_id in _replay(request, sub.business_id, last_id, start, first_page):
                sub.sent = event_id
                metrics.events_sent.inc()
                yield frame
        except DatabaseUnavailable as exc:
            # The database went away after the first page (that one was read before the 200): end the stream;
            # the client retries from the last id it received.
            log.warning("replay failed; ending the stream", extra={"error": str(exc.__cause__ or exc)})
            return
    loop = asyncio.get_running_loop()
    # Loop time of the token's expiry: the stream ends then.
    expiry = loop.time() + claims.seconds_left()
    ping_every = state.settings.sse_ping_seconds
    next_ping = loop.time() + ping_every
    while True:
        sub.wake_at(min(expiry, next_ping))
        # Live from here: while this waits with nothing buffered, the hub writes events to the connection
        # itself (Subscriber.write_now) and this generator is not woken for them.
        await sub.wait()
        # Frames are shared by every stream of the business (built once per event by the hub); several events
        # buffered while this stream was busy go out in one write.
        events = [event for event in sub.take() if event.id > sub.sent]  # the others were sent already
        if events:
            sub.sent = events[-1].id
            metrics.events_sent.inc(len(events))
            yield events[0].encoded if len(events) == 1 else b"".join(event.encoded for event in events)
        if sub.closed_reason == "draining":
            retry = random.randint(*DRAIN_RETRY_MS)
            yield ServerSentEvent(comment="server shutting down", retry=retry, sep=SEP).encode()
            return
        if sub.closed_reason is not None:
            return
        now = loop.time()
        if now >= expiry:
            yield ServerSentEvent(comment="token expired", sep=SEP).encode()
            return
        if now >= next_ping:
            next_ping = now + ping_every
            yield PING


async def _replay_page(request: Request, business_id: str, after: int) -> list[asyncpg.Record]:
    """One page of the business's retained events after id `after`; DatabaseUnavailable when it cannot be read."""
    async with gateway_state(request).connection() as conn:
        return await conn.fetch(queries("gateway")["stream_replay"], after, business_id, _REPLAY_PAGE)


async def _replay(
    request: Request, business_id: str, last_id: int, start: int, first_page: list[asyncpg.Record]
) -> AsyncIterator[tuple[bytes, int]]:
    """The retained events of the business after `last_id`, from `first_page` (read before the response
    started) on; a resync first when history was pruned."""
    metrics = gateway_state(request).metrics
    position = last_id
    rows = first_page
    while True:
        pruned_through, newest = rows[0]["pruned_through"], rows[0]["last_event_id"]
        if position < pruned_through or position > max(newest, start):
            # History after `position` is gone, or the id is from another database: the client refetches
            # everything and continues from the present.
            # Its id is the hub's position when the stream registered: everything after it comes live.
            metrics.resyncs_sent.inc()
            payload = json.dumps({"business_id": business_id, "reason": "history_unavailable"})
            yield encode_event(start, "resync", payload), start
            return
        events = [row for row in rows if row["id"] is not None]
        for row in events:
            metrics.events_replayed.inc()
            yield encode_event(row["id"], row["kind"], row["payload"]), row["id"]
            position = row["id"]
        if len(events) < _REPLAY_PAGE:
            return
        rows = await _replay_page(request, business_id, position)


async def stream_events(request: Request) -> Response:
    state = gateway_state(request)
    settings, hub, metrics, limits = state.settings, state.hub, state.metrics, state.limits
    # Before the token is even read: a flood of opens (bad tokens included) from one address stops here.
    wait = limits.stream_opens.take(rate_limit_key(client_address(request)))
    if wait is not None:
        raise Rejected(429, "too many stream opens from this address", reason="rate_limited", headers=_retry_in(wait))
    business_id: str = request.path_params["business_id"]
    # EventSource cannot set headers: the stream takes its token from the URL too. The id is canonical once
    # authorised (any other spelling is a 400), so it matches the events' business ids.
    claims = authorize(request, business_id, allow_query_token=True)
    last_id = _last_event_id(request)
    if hub.draining:
        metrics.streams_rejected.labels("draining").inc()
        raise Rejected(503, "the gateway is shutting down", reason="draining", headers={"Retry-After": _retry_after()})
    if hub.subscriber_count >= settings.max_connections:
        metrics.streams_rejected.labels("limit").inc()
        raise Rejected(503, "too many connections", reason="over_capacity", headers={"Retry-After": _retry_after()})
    # Counted from here until the stream ends, however it ends (on_end below): one token cannot take the
    # whole gateway's connections.
    token_id = claims.token_id
    if not limits.streams_per_token.acquire(token_id):
        raise Rejected(
            429,
            f"this token already holds {limits.streams_per_token.limit} open streams on this gateway",
            reason="stream_cap",
            headers=_retry_in(limits.stream_cap_retry_seconds),
        )

    def ended() -> None:
        hub.unsubscribe(sub)
        limits.streams_per_token.release(token_id)

    sub = hub.subscribe(business_id, settings.sse_queue_size)
    start = hub.position
    # In the same step as the subscription (no await between): memory holds (last_id, start], the subscriber
    # everything after `start`.
    recent = hub.recent_after(business_id, last_id) if last_id is not None else None
    first_page: list[asyncpg.Record] | None = None
    if last_id is not None and recent is None:
        # The replay's first page is read before the response starts, so that a database outage answers 503
        # (with Retry-After) rather than a 200 that ends at once; the subscriber already buffers what comes live.
        try:
            first_page = await _replay_page(request, business_id, last_id)
        except BaseException:
            ended()
            raise
    # Heartbeats, expiry and the SIGTERM drain come from the body's own wait (above), not from tasks per
    # connection: a task per connection costs memory and CPU that every open dashboard multiplies.
    body = _events(request, sub, claims, last_id, start, recent, first_page)
    return EventStreamResponse(body, sub, on_end=ended, headers=SSE_HEADERS)


routes: list[BaseRoute] = [Route("/v1/businesses/{business_id}/events", stream_events, methods=["GET"])]
