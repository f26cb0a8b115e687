"""A connection that dies silently (no FIN, no RST) is noticed within 10 s, and nothing is lost."""

from __future__ import annotations

import asyncio
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from ..listening import event_rows, running_listener, wait_for
from ..proxy import freezable_proxy


def through(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username + '@' if parts.username else ''}127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def test_silently_dead_connection_is_detected_within_10_seconds(db_url: str) -> None:
    parts = urlsplit(db_url)
    if not parts.hostname or parts.hostname.startswith("/") or "host=" in parts.query:
        pytest.skip("needs PostgreSQL over TCP to put a proxy in between")
    with freezable_proxy(parts.hostname, parts.port or 5432) as proxy:
        proxied = through(db_url, proxy.port)
        business = str(uuid.uuid4())
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("insert into businesses (id, name) values (%s, 'Frozen Barber')", (business,))
            async with running_listener(proxied) as manager:
                await asyncio.sleep(0.5)  # quiet: the listener sleeps on its LISTEN
                proxy.freeze_existing()
                frozen_at = time.monotonic()
                # Written directly, not through the proxy: its NOTIFY goes nowhere.
                conn.execute(
                    "insert into payments (business_id, amount_minor, currency, method, status)"
                    " values (%s, 700, 'KES', 'cash', 'completed')",
                    (business,),
                )
                await wait_for(lambda: any(e["business_id"] == business for e in event_rows(db_url)), timeout=15)
                assert time.monotonic() - frozen_at < 10
                assert manager.status()["reconnects"] >= 1
