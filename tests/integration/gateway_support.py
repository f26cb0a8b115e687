"""Helpers for the gateway tests: a real uvicorn on a free port, a real SSE client, events appended by SQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import psycopg
import uvicorn
from starlette.applications import Starlette

from cdc_dashboard.config import Settings
from cdc_dashboard.gateway.app import create_app
from cdc_dashboard.gateway.state import GatewayState, gateway_state
from cdc_dashboard.tokens import create_token

from ..processes import stop_process

__all__ = [
    "SECRET",
    "Gateway",
    "SSEEvent",
    "SSEStream",
    "ServeProcess",
    "append_events",
    "free_port",
    "open_stream",
    "run_gateway",
    "serve_subprocess",
    "settings",
    "token_for",
]

SECRET = "gateway-tests-" + "k" * 40
ROOT = Path(__file__).resolve().parents[2]


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"secret": SECRET, "sse_ping_seconds": 5.0, **overrides}
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def token_for(*business_ids: str, ttl: int = 600, admin: bool = False) -> str:
    return create_token(SECRET, list(business_ids), ttl, admin=admin)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def append_events(db_url: str, *events: tuple[str | None, str]) -> list[int]:
    """Append (business_id, kind) events the way the listener does; returns their ids."""
    payloads = [
        json.dumps({"business_id": b, "query_keys": [["dashboard-stats", b]], "n": uuid.uuid4().hex}) for b, _ in events
    ]
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "select dashboard.append_events_v1(%s::text[], %s::text[], %s::jsonb[])",
            ([b for b, _ in events], [k for _, k in events], payloads),
        ).fetchone()
    assert row is not None
    return list(row[0])


@dataclass
class Gateway:
    url: str
    server: uvicorn.Server

    @property
    def app(self) -> Starlette:
        app = self.server.config.app
        assert isinstance(app, Starlette)
        return app

    @property
    def app_state(self) -> GatewayState:
        return gateway_state(self.app)


@contextlib.asynccontextmanager
async def run_gateway(db_url: str, **overrides: Any) -> AsyncIterator[Gateway]:
    """The gateway app under a real uvicorn in this event loop, on a free port."""
    port = free_port()
    app = create_app(settings(database_url=db_url, http_port=port, **overrides))
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 20
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the gateway stopped during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway did not start")
        await asyncio.sleep(0.02)
    try:
        yield Gateway(f"http://127.0.0.1:{port}", server)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=15)


@dataclass
class SSEEvent:
    id: str | None = None
    event: str = "message"
    data: str = ""
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.data)


class SSEStream:
    """Reads a text/event-stream response field by field, as the SSE specification parses it."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []
        self.retries: list[int] = []

    async def next_event(self, timeout: float = 5.0) -> SSEEvent | None:
        """The next dispatched event (one with data), or None when the stream ended."""
        current = SSEEvent()
        data: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    return None
                line = raw.decode().rstrip("\r\n")
                if line == "":
                    if data:
                        current.data = "\n".join(data)
                        return current
                    current = SSEEvent()
                    continue
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data.append(value)
                elif name == "id":
                    current.id = value
                elif name == "event":
                    current.event = value
                elif name == "retry":
                    self.retries.append(int(value))

    async def events(self, count: int, timeout: float = 5.0) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        while len(out) < count:
            event = await self.next_event(timeout)
            if event is None:
                break
            out.append(event)
        return out

    async def until_closed(self, timeout: float = 5.0) -> list[SSEEvent]:
        """Every remaining event until the server ends the stream."""
        out: list[SSEEvent] = []
        while (event := await self.next_event(timeout)) is not None:
            out.append(event)
        return out


@contextlib.asynccontextmanager
async def open_stream(
    base_url: str, business_id: str, token: str | None, *, last_event_id: int | None = None, query: str = ""
) -> AsyncIterator[SSEStream]:
    headers = {"Accept": "text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{base_url}/v1/businesses/{business_id}/events{query}", headers=headers) as response,
    ):
        yield SSEStream(response)


def _ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    log: IO[bytes]

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


@contextlib.contextmanager
def serve_subprocess(db_url: str, port: int, *args: str, **env_overrides: str) -> Iterator[ServeProcess]:
    """`cdc-dashboard serve` in its own process, ready when /readyz answers 200; SIGTERM at the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update(
        CDC_DATABASE_URL=db_url, CDC_SECRET=SECRET, CDC_HTTP_PORT=str(port), CDC_SSE_PING_SECONDS="5", **env_overrides
    )
    cli = Path(sys.executable).parent / "cdc-dashboard"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([str(cli), "serve", *args], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        served = ServeProcess(proc, log)
        try:
            deadline = time.monotonic() + 30
            while not _ready(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"serve did not become ready:\n{served.output()[-2000:]}")
                time.sleep(0.1)
            yield served
        finally:
            stop_process(proc)
