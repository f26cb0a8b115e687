"""The webhooks as an operator runs them: `cdc-dashboard serve` configured by environment variables only."""

from __future__ import annotations

import json
import uuid

import httpx
import psycopg

from cdc_dashboard.ingest.paystack import sign

from .gateway_support import free_port, serve_subprocess
from .webhook_server import fixture


def test_serve_records_webhooks_configured_by_environment(db_url: str) -> None:
    business = uuid.uuid4()
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "insert into businesses (id, name, mpesa_shortcode) values (%s, 'Env Salon', '600966')", (business,)
        )
    port = free_port()
    env = {"CDC_PAYSTACK_SECRET_KEY": "sk_live_" + "e" * 40, "CDC_MPESA_CALLBACK_TOKEN": "env-token-" + "z" * 30}
    body = fixture("paystack/charge_success_kes")
    body["data"]["metadata"]["business_id"] = str(business)
    raw = json.dumps(body).encode()
    with serve_subprocess(db_url, port, **env), httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        signature = sign(env["CDC_PAYSTACK_SECRET_KEY"], raw)
        paid = http.post("/v1/webhooks/paystack", content=raw, headers={"x-paystack-signature": signature})
        assert paid.status_code == 200, paid.text
        c2b = http.post(f"/v1/webhooks/mpesa/{env['CDC_MPESA_CALLBACK_TOKEN']}/c2b/confirmation",
                        json=fixture("mpesa/c2b_confirmation_v2"))  # fmt: skip
        assert c2b.json() == {"ResultCode": "0", "ResultDesc": "Accepted"}
    with serve_subprocess(db_url, port) as _unconfigured, httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        assert (
            http.post("/v1/webhooks/paystack", content=raw, headers={"x-paystack-signature": signature}).status_code
            == 503
        )
        assert http.post("/v1/webhooks/mpesa/anything/stk", json={}).status_code == 503
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select method, amount_minor from payments where business_id = %s order by method", (business,)
        )
        assert rows.fetchall() == [("mpesa", 500), ("paystack", 10000)]


def test_serve_allow_list_believes_forwarded_for_only_from_trusted_proxies(db_url: str) -> None:
    port = free_port()
    token = "env-token-" + "z" * 30
    env = {"CDC_MPESA_CALLBACK_TOKEN": token, "CDC_MPESA_ALLOWED_IPS": "196.201.214.0/24"}
    body = fixture("mpesa/c2b_confirmation_v2")
    with serve_subprocess(db_url, port, **env), httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        # 127.0.0.1 is not in CDC_TRUSTED_PROXIES: the header it sends proves nothing.
        spoofed = http.post(
            f"/v1/webhooks/mpesa/{token}/c2b/confirmation", json=body, headers={"x-forwarded-for": "196.201.214.9"}
        )
        assert spoofed.status_code == 403, spoofed.text
