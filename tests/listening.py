"""Helpers for tests that run the listener: start it in-process, wait for events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg

from cdc_dashboard.config import Settings
from cdc_dashboard.listener import EnhancedRealtimeManager

__all__ = ["event_rows", "running_listener", "wait_for"]


@asynccontextmanager
async def running_listener(db_url: str, **overrides: Any) -> AsyncIterator[EnhancedRealtimeManager]:
    manager = EnhancedRealtimeManager(Settings(database_url=db_url))
    for name, value in overrides.items():
        setattr(manager, name, value)
    task = asyncio.create_task(manager.run())
    try:
        await asyncio.wait_for(manager.ready.wait(), 20)
        yield manager
    finally:
        manager.stop()
        await asyncio.wait_for(task, 10)


def event_rows(db_url: str, after: int = 0) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "select id, business_id, kind, payload from dashboard.events where id > %s order by id", (after,)
        ).fetchall()
    return [{"id": r[0], "business_id": r[1], "kind": r[2], "payload": r[3]} for r in rows]


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll `predicate()` (sync, run in a thread) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(predicate)
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def payment_ids_in_events(db_url: str) -> list[str]:
    """Every payments change id named by an event, in event order."""
    out = []
    for event in event_rows(db_url):
        payload = event["payload"] if isinstance(event["payload"], dict) else json.loads(event["payload"])
        out += [c["id"] for c in payload.get("changes", []) if c["table"] == "payments"]
    return out
