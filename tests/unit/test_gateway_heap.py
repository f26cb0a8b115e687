"""The gateway's HeapKeeper: long-lived objects leave the collector's walks, cyclic garbage is still collected."""

from __future__ import annotations

import asyncio
import gc
import weakref

from cdc_dashboard.gateway.heap import HeapKeeper


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


async def test_freezes_then_collects_cycles_and_unfreezes_on_stop() -> None:
    keeper = HeapKeeper(freeze_every=0.05, collect_every=0.3)
    keeper.start()
    try:
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        await asyncio.sleep(0.12)
        # Alive objects were frozen: collections skip them.
        assert gc.get_freeze_count() > 0
        del a, b
        gc.collect()
        assert gone() is not None  # a frozen cycle waits for the keeper's full pass...
        await asyncio.sleep(0.4)
        assert gone() is None  # ...which unfreezes and collects it
    finally:
        keeper.stop()
    assert gc.get_freeze_count() == 0
