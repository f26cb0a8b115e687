"""A TCP proxy that can silently freeze its connections: the network failure TCP does not report.

A frozen connection stays open but forwards nothing, like a peer behind a dead NAT or a pulled cable. New
connections after `freeze_existing` work normally, so a client that notices and reconnects recovers. For an
outage that lasts: `cut()` (the database went away: every connection closed, new ones closed at once) and
`freeze()` (the path died: every connection, new ones included, silent), until `restore()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["FreezableProxy", "freezable_proxy"]


class FreezableProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._live: list[asyncio.Event] = []
        self._writers: list[asyncio.StreamWriter] = []
        # What a new connection gets: "open" (forwarded), "cut" (closed at once), "frozen" (accepted, silent).
        self._mode = "open"
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()
        # Stopped: close the listening socket and every connection, then let the tasks finish.
        server.close()
        for writer in self._writers:
            writer.close()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._mode == "cut":
            writer.close()
            return
        self._writers.append(writer)
        if self._mode == "frozen":
            with contextlib.suppress(asyncio.CancelledError):  # stopped: the task ends quietly
                await asyncio.Event().wait()  # accepted, never answered
            return
        try:
            up_reader, up_writer = await self._open_upstream()
        except OSError:  # the server is down (restarting): refuse this connection as the server would
            writer.close()
            return
        self._writers.append(up_writer)
        self._pairs.append((writer, up_writer))
        frozen = asyncio.Event()
        self._live.append(frozen)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    if frozen.is_set():
                        await asyncio.Event().wait()  # swallow everything, forever
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        with contextlib.suppress(asyncio.CancelledError):  # stopped: the task ends quietly
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.target
        if host.startswith("/"):
            # A socket directory, as in a libpq URL's host: the embedded PostgreSQL listens on a Unix socket only.
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    def start(self) -> None:
        self._thread.start()
        self._started.wait(5)

    def freeze_existing(self) -> None:
        """Every connection open now stops forwarding, silently; later connections are unaffected."""

        def freeze() -> None:
            for event in self._live:
                event.set()
            self._live.clear()

        self._loop.call_soon_threadsafe(freeze)

    def _apply(self, change: Callable[[], None]) -> None:
        """Run `change` on the proxy's loop and return once it has run."""

        async def run() -> None:
            change()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)

    def cut(self) -> None:
        """Close every connection, and close new ones at once, until `restore()`."""

        def cut() -> None:
            self._mode = "cut"
            for client, upstream in self._pairs:
                client.close()
                upstream.close()
            self._pairs.clear()
            self._live.clear()

        self._apply(cut)

    def freeze(self) -> None:
        """Every connection, open now or opened until `restore()`, stays open and forwards nothing."""

        def freeze() -> None:
            self._mode = "frozen"
            for event in self._live:
                event.set()
            self._live.clear()

        self._apply(freeze)

    def restore(self) -> None:
        """New connections are forwarded again (the ones cut or frozen stay dead)."""

        def restore() -> None:
            self._mode = "open"

        self._apply(restore)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@contextmanager
def freezable_proxy(host: str, port: int) -> Iterator[FreezableProxy]:
    proxy = FreezableProxy(host, port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
