"""Browser-test harness: a real gateway process, where Chromium is, appending events to the durable log, and a
business whose payments are recorded as the payment app records them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from cdc_dashboard.tokens import create_token

from ..processes import stop_process
from ..query_keys import manual_refresh_payload

__all__ = [
    "CHROMIUM",
    "CHROMIUM_ARGS",
    "SECRET",
    "Gateway",
    "Shop",
    "append_invalidations",
    "complete_payment",
    "record_payment",
    "seed_shop",
]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SECRET = "browser-tests-secret-0123456789abcdef"  # 32+ characters, as the gateway requires


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Gateway:
    """`cdc-dashboard serve --with-listener` in a subprocess that a test can stop and start again."""

    def __init__(self, database_url: str, log_path: Path) -> None:
        self.database_url = database_url
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def token(self, *business_ids: str, ttl: int = 3600) -> str:
        return create_token(SECRET, list(business_ids), ttl)

    def start(self, timeout: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        env |= {
            "CDC_DATABASE_URL": self.database_url,
            "CDC_SECRET": SECRET,
            "CDC_HTTP_HOST": "127.0.0.1",
            "CDC_HTTP_PORT": str(self.port),
            "CDC_LOG_LEVEL": "WARNING",
        }
        command = [str(Path(sys.executable).with_name("cdc-dashboard")), "serve", "--with-listener"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"gateway not ready within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM, as systemd or a deploy would: the gateway drains its streams and exits."""
        if self.process is None:
            return
        stop_process(self.process)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def append_invalidations(db_url: str, business_id: str, count: int) -> None:
    """`count` events for the business, each in its own transaction, through the gateway's durable event log."""
    payload = json.dumps(manual_refresh_payload(business_id, datetime.now(UTC).isoformat()))
    with psycopg.connect(db_url, autocommit=True) as conn:
        for _ in range(count):
            conn.execute(
                "select dashboard.append_events_v1(%s, %s, %s::jsonb[])",
                ([business_id], ["invalidate"], [payload]),
            )


@dataclass(frozen=True)
class Shop:
    business_id: str
    unpaid_booking_id: str


def seed_shop(db_url: str) -> Shop:
    """A business with one regular client who paid KES 2,500 today, and an unpaid booking for a newcomer."""
    business_id, regular, booking = (str(uuid.uuid4()) for _ in range(3))
    with psycopg.connect(db_url) as conn:
        conn.execute("insert into businesses (id, name) values (%s, 'Wanjiru Beauty Studio')", (business_id,))
        conn.execute("insert into clients (id, name, phone) values (%s, 'Otieno', '+254700000001')", (regular,))
        conn.execute(
            "insert into payments (business_id, client_id, amount_minor, currency, method, status, paid_at)"
            " values (%s, %s, 250000, 'KES', 'cash', 'completed', now())",
            (business_id, regular),
        )
        conn.execute(
            "insert into bookings (id, business_id, amount_due_minor, currency) values (%s, %s, 150000, 'KES')",
            (booking, business_id),
        )
    return Shop(business_id, booking)


def complete_payment(db_url: str, shop: Shop, client_name: str, amount_minor: int, *, booking: bool) -> str:
    """What the payment app does when a new client pays by M-Pesa: one transaction over all payment tables."""
    with psycopg.connect(db_url) as conn:
        return record_payment(conn, shop, client_name, amount_minor, booking=booking)


def record_payment(conn: psycopg.Connection, shop: Shop, client_name: str, amount_minor: int, *, booking: bool) -> str:
    client_id, payment_id = str(uuid.uuid4()), str(uuid.uuid4())
    booking_id = shop.unpaid_booking_id if booking else None
    with conn.transaction():
        conn.execute("insert into clients (id, name, phone) values (%s, %s, '+254711000000')", (client_id, client_name))
        conn.execute(
            "insert into payments (id, business_id, client_id, booking_id, amount_minor, currency, method, status,"
            " paid_at) values (%s, %s, %s, %s, %s, 'KES', 'mpesa', 'completed', now())",
            (payment_id, shop.business_id, client_id, booking_id, amount_minor),
        )
        conn.execute(
            "insert into payment_transactions (business_id, payment_id, provider, amount_minor, currency, status)"
            " values (%s, %s, 'mpesa', %s, 'KES', 'completed')",
            (shop.business_id, payment_id, amount_minor),
        )
        conn.execute(
            "insert into client_business_transactions (business_id, client_id, payment_id, type, amount_minor,"
            " currency) values (%s, %s, %s, 'payment', %s, 'KES')",
            (shop.business_id, client_id, payment_id, amount_minor),
        )
        if booking_id:
            conn.execute(
                "update bookings set payment_status = 'paid', client_id = %s where id = %s", (client_id, booking_id)
            )
    return payment_id
