"""The HTTP side of an event stream: its body runs in the request's own task, and it can be cut mid-send.

Why not sse-starlette's `EventSourceResponse` (we still use its `ServerSentEvent` for every frame we send):
it runs a task group of four tasks per response (sender, pinger, shutdown watcher, disconnect listener) and an
anyio cancel scope around every send. A gateway holds one response per open dashboard, thousands of them:
those tasks would be most of what a connection costs in memory, and the cancel scopes a large share of the CPU
of every delivery. What we used of it is here, and nothing else:

- The body is an async generator of ready SSE frames (streams.py: heartbeats, token expiry and the SIGTERM
  drain come from its own wait, so they need no task either). It runs in the task uvicorn gave the request.
- While the body waits for live events with nothing buffered, the hub writes each event to the connection
  itself, through the same `send` (hub.Subscriber.write_now): a broadcast then wakes no task per stream.
- One small task waits in `receive()` for the client to go away: uvicorn tells a response about a closed
  connection only there. The subscriber is then closed, so a closed connection frees its place at once
  (the connection limit counts subscribers), not at the next heartbeat.
- A cut (the client stopped reading: its buffer filled, or a send stayed blocked, both decided by the hub)
  cancels the request's task wherever it waits. A send blocked on a client that reads nothing may never
  return otherwise.
- HEAD gets the headers and an empty body: a body that never ends would wedge a keep-alive connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .hub import Subscriber

__all__ = ["EventStreamResponse"]


class EventStreamResponse(Response):
    """`text/event-stream` from `body`, the stream of subscriber `sub`; `on_end` runs however it ends."""

    media_type = "text/event-stream"

    def __init__(
        self, body: AsyncGenerator[bytes, None], sub: Subscriber, on_end: Callable[[], None], headers: dict[str, str]
    ) -> None:
        # Response.__init__ would want a body to render; a stream has none.
        self.status_code = 200
        self.background = None
        self.init_headers(headers)
        self._body = body
        self._sub = sub
        self._on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnect = asyncio.create_task(self._watch_disconnect(receive))
        try:
            if scope["method"] == "HEAD":
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            # A timeout with no deadline until the hub cuts the stream: then it fires at once and cancels this
            # task wherever it waits; asyncio.timeout tells that cancellation apart from any other.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None) as cut:
                    self._sub.on_cut = lambda: cut.reschedule(-1.0)
                    await self._stream(send)
        finally:
            self._sub.on_cut = None
            self._sub.detach()
            disconnect.cancel()
            await self._body.aclose()
            self._on_end()

    async def _stream(self, send: Send) -> None:
        sub = self._sub
        time = asyncio.get_running_loop().time
        # Headers go in a list of their own: middleware (CORS) may add to the list it is given.
        sub.sending_since = time()
        await send({"type": "http.response.start", "status": self.status_code, "headers": list(self.raw_headers)})
        sub.sending_since = None

        def write(chunk: bytes) -> Awaitable[None]:
            return send({"type": "http.response.body", "body": chunk, "more_body": True})

        # From now on the hub may write live events itself while the body waits (Subscriber.write_now).
        sub.write = write
        async for chunk in self._body:
            # The hub cuts a stream whose send stays blocked (a client that stopped reading while no events
            # came, so its buffer never fills). One clock read per send, rather than a timer per send.
            sub.sending_since = time()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            sub.sending_since = None
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _watch_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._sub.close("disconnected")
