"""Keep Python's cyclic garbage collector off the broadcast path.

A gateway holds a hundred-odd objects the collector tracks per open stream (uvicorn's protocol, the request,
the response, its tasks...), so millions with many streams open. They live as long as their connection, yet the
collector walks them again and again: each broadcast leaves objects that survive long enough to be promoted, so
full passes come every few broadcasts, and a broadcast that meets one reaches its last dashboards late.

So, every second, `gc.freeze()` moves every object then alive into the collector's permanent generation, which
collections skip: young collections stay young, and full passes walk only what is new. Freezing is a list
splice, not a walk. Frozen objects are still freed by reference counting the moment nothing refers to them;
only garbage caught in a reference cycle waits, until `collect_every` seconds have passed: then everything is
unfrozen and one full pass collects it (one pause per `collect_every`, instead of one every few broadcasts).
"""

from __future__ import annotations

import asyncio
import gc
import time

__all__ = ["HeapKeeper"]


class HeapKeeper:
    def __init__(self, *, freeze_every: float = 1.0, collect_every: float = 600.0) -> None:
        self._freeze_every = freeze_every
        self._collect_every = collect_every
        self._last_collect = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self._freeze_every, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gc.unfreeze()

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_collect >= self._collect_every:
            self._last_collect = now
            gc.unfreeze()
            gc.collect()
        gc.freeze()
        self._timer = asyncio.get_running_loop().call_later(self._freeze_every, self._tick)
