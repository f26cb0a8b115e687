"""The webhook routes served by a real uvicorn in a background thread, and what the tables then hold.

The server has its own event loop (so synchronous tests, hypothesis and threads can call it like a provider
would) and its own asyncpg pool on the test's database. Its settings are whatever the test passes.
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import uvicorn

from cdc_dashboard.config import Settings
from cdc_dashboard.gateway.app import create_app
from cdc_dashboard.ingest.paystack import sign

__all__ = [
    "DASHBOARD_SECRET",
    "MPESA_TOKEN",
    "PAYSTACK_SECRET",
    "WebhookServer",
    "assert_consistent",
    "charge",
    "fixture",
    "refund",
    "serve_webhooks",
    "table_counts",
]

PAYSTACK_SECRET = "sk_test_" + "b" * 40
MPESA_TOKEN = "cb-" + "t" * 40
DASHBOARD_SECRET = "webhook-tests-" + "d" * 40
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"
TABLES = ("payments", "payment_transactions", "client_business_transactions", "clients", "bookings")


def fixture(name: str) -> dict[str, Any]:
    """A fresh deep copy of a provider payload, e.g. fixture("paystack/charge_success_kes")."""
    loaded: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return copy.deepcopy(loaded)


def charge(business_id: uuid.UUID | None = None, **data: Any) -> dict[str, Any]:
    """Paystack's charge.success sample, with metadata.business_id set when given and `data` fields replaced."""
    body = fixture("paystack/charge_success_kes")
    if business_id is not None:
        body["data"]["metadata"]["business_id"] = str(business_id)
    body["data"].update(data)
    return body


def refund(transaction_reference: str, refund_reference: str, amount: Any, currency: str = "KES") -> dict[str, Any]:
    """Paystack's refund.processed sample, pointing at that charge, as that refund."""
    body = fixture("paystack/refund_processed")
    body["data"].update(
        transaction_reference=transaction_reference, refund_reference=refund_reference, amount=amount, currency=currency
    )
    return body


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class WebhookServer:
    def __init__(self, base_url: str, db_url: str) -> None:
        self.base_url = base_url
        self.db_url = db_url
        self.http = httpx.Client(base_url=base_url, timeout=10)

    def paystack(self, body: bytes | dict[str, Any], *, signature: str | None = "auto") -> httpx.Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if signature == "auto":
            headers["x-paystack-signature"] = sign(PAYSTACK_SECRET, raw)
        elif signature is not None:
            headers["x-paystack-signature"] = signature
        return self.http.post("/v1/webhooks/paystack", content=raw, headers=headers)

    def mpesa(
        self,
        kind: str,
        body: bytes | dict[str, Any],
        *,
        token: str = MPESA_TOKEN,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """kind: stk, c2b/validation or c2b/confirmation."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.http.post(
            f"/v1/webhooks/mpesa/{token}/{kind}",
            content=raw,
            headers={"content-type": "application/json", **(headers or {})},
        )

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def one(self, sql: str, *params: Any) -> Any:
        rows = self.query(sql, *params)
        assert len(rows) == 1, rows
        return rows[0][0] if len(rows[0]) == 1 else rows[0]

    def business(self, *, shortcode: str | None = None, subaccount: str | None = None) -> uuid.UUID:
        business_id = uuid.uuid4()
        self.query(
            "insert into businesses (id, name, mpesa_shortcode, paystack_subaccount) values (%s, %s, %s, %s)",
            business_id,
            f"Test {business_id.hex[:6]}",
            shortcode,
            subaccount,
        )
        return business_id

    def booking(self, business_id: uuid.UUID, due_minor: int, currency: str = "KES") -> uuid.UUID:
        booking_id = uuid.uuid4()
        self.query(
            "insert into bookings (id, business_id, amount_due_minor, currency) values (%s, %s, %s, %s)",
            booking_id,
            business_id,
            due_minor,
            currency,
        )
        return booking_id

    def pending_stk(
        self, business_id: uuid.UUID, checkout_id: str, amount_minor: int, booking_id: uuid.UUID | None = None
    ) -> uuid.UUID:
        """What the business's app writes when it starts an STK push."""
        payment_id = uuid.uuid4()
        self.query(
            "insert into payments (id, business_id, booking_id, amount_minor, currency, method, status, provider,"
            " provider_reference) values (%s, %s, %s, %s, 'KES', 'mpesa', 'pending', 'mpesa', %s)",
            payment_id,
            business_id,
            booking_id,
            amount_minor,
            checkout_id,
        )
        return payment_id


def assert_consistent(server: WebhookServer) -> None:
    """No half-written record: every recorded payment has its ledger and provider rows, its refunds add up in
    all three places (refunded_minor, refund ledger rows, refunded provider rows), it is `refunded` exactly when
    refunded in full, nothing dangles, and every booking with a settled payment shows the payment_status its
    payments' net amounts give."""
    problems = server.one(
        """
        select
          (select count(*) from payments p where p.status in ('completed', 'refunded') and p.provider is not null
             and (select count(*) from client_business_transactions l
                  where l.payment_id = p.id and l.type = 'payment') <> 1),
          (select count(*) from payments p where p.refunded_minor <>
             (select coalesce(sum(l.amount_minor), 0) from client_business_transactions l
               where l.payment_id = p.id and l.type = 'refund')),
          (select count(*) from payments p where p.refunded_minor <>
             (select coalesce(sum(t.amount_minor), 0) from payment_transactions t
               where t.payment_id = p.id and t.status = 'refunded')),
          (select count(*) from payments p where p.provider is not null
             and (p.status = 'refunded') <> (p.refunded_minor = p.amount_minor and p.refunded_minor > 0)),
          (select count(*) from payments p where p.status <> 'pending'
             and not exists (select 1 from payment_transactions t where t.payment_id = p.id)),
          (select count(*) from payment_transactions t join payments p on p.id = t.payment_id
             where t.business_id is distinct from p.business_id),
          (select count(*) from payment_transactions t where t.payment_id is null and t.business_id is not null),
          (select count(*) from clients c where not exists (select 1 from payments p where p.client_id = c.id)),
          (select count(*) from payment_transactions where raw is null),
          (select count(*) from bookings bk,
             lateral (select coalesce(sum(amount_minor - refunded_minor) filter (where status = 'completed'), 0)
                               as paid,
                             count(*) filter (where status in ('completed', 'refunded')) as settled
                      from payments where booking_id = bk.id and currency = bk.currency) p
             where p.settled > 0 and bk.payment_status <> case
                 when p.paid > 0 and p.paid >= bk.amount_due_minor then 'paid'
                 when p.paid > 0 then 'partially_paid'
                 else 'refunded' end)
        """
    )
    assert problems == (0,) * 10, problems


def table_counts(server: WebhookServer) -> dict[str, int]:
    return {t: int(server.one(f"select count(*) from {t}")) for t in TABLES}


def _settings(db_url: str, overrides: dict[str, Any]) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "paystack_secret_key": PAYSTACK_SECRET,
        "mpesa_callback_token": MPESA_TOKEN,
        "secret": DASHBOARD_SECRET,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@contextmanager
def serve_webhooks(db_url: str, *, with_listener: bool = False, **overrides: Any) -> Iterator[WebhookServer]:
    """The gateway app (create_app, so the routes are tested as mounted) on a free port, until the block ends."""
    app = create_app(_settings(db_url, overrides), with_listener=with_listener)
    port = _free_port()
    # proxy_headers=False: uvicorn would otherwise rewrite the peer from X-Forwarded-For for 127.0.0.1 itself,
    # before the allow-list could apply CDC_TRUSTED_PROXIES (the gateway's `serve` must do the same).
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", proxy_headers=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="webhook-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the webhook test server did not start")
        time.sleep(0.01)
    client = WebhookServer(f"http://127.0.0.1:{port}", db_url)
    try:
        yield client
    finally:
        client.http.close()
        server.should_exit = True
        thread.join(timeout=15)
