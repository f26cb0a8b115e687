"""A PostgreSQL restart in the middle of a stream of payments loses nothing.

The test owns its server (a private embedded PostgreSQL) so it can restart it without disturbing anything
else the machine runs.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from cdc_dashboard.db.embedded import start_embedded
from cdc_dashboard.migrations import apply

from ..listening import event_rows, running_listener, wait_for
from ..pg import restart_embedded


@pytest.fixture
def private_server() -> Iterator[Any]:
    state = tempfile.mkdtemp(prefix="cdc-restart-")
    server: Any = start_embedded(state, cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(state, ignore_errors=True)


def write_payments(url: str, business: str, count: int, written: list[int], stop: threading.Event) -> None:
    """Keep writing through the restart: a write that fails because the server is down is retried."""
    amount = 0
    while amount < count and not stop.is_set():
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                while amount < count:
                    conn.execute(
                        "insert into payments (business_id, amount_minor, currency, method, status)"
                        " values (%s, %s, 'KES', 'cash', 'completed')",
                        (business, amount + 1),
                    )
                    amount += 1
                    written.append(amount)
                    time.sleep(0.005)
        except psycopg.OperationalError:
            time.sleep(0.1)  # the insert either committed before the cut or not at all; retried either way
            with_check = _committed(url, business, amount + 1)
            if with_check:
                amount += 1
                written.append(amount)


def _committed(url: str, business: str, amount: int) -> bool:
    for _ in range(100):
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                row = conn.execute(
                    "select exists (select 1 from payments where business_id = %s and amount_minor = %s)",
                    (business, amount),
                ).fetchone()
                return bool(row and row[0])
        except psycopg.OperationalError:
            time.sleep(0.1)
    raise AssertionError("server did not come back")


@pytest.mark.slow
async def test_postgres_restart_mid_stream_loses_nothing(private_server: Any) -> None:
    url = private_server.get_uri()
    apply(url)
    business = str(uuid.uuid4())
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("insert into businesses (id, name) values (%s, 'Restart Spa')", (business,))
    written: list[int] = []
    stop = threading.Event()
    async with running_listener(url) as manager:
        writer = threading.Thread(target=write_payments, args=(url, business, 300, written, stop))
        writer.start()
        await wait_for(lambda: len(written) > 50)
        await asyncio.to_thread(restart_embedded, private_server)
        await asyncio.to_thread(writer.join, 60)
        stop.set()

        def delivered() -> int:
            return sum(e["payload"]["change_count"] for e in event_rows(url) if e["business_id"] == business)

        await wait_for(lambda: delivered() >= 300, timeout=30)
        assert manager.status()["reconnects"] >= 1
    assert delivered() == 300 == len(written)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("select sum(revenue_minor) from dashboard.revenue_daily where business_id = %s", (business,))
        assert row.fetchone() == (sum(range(1, 301)),)
