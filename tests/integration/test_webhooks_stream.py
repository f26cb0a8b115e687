"""End to end: a webhook → the tables → the capture triggers → the listener → an event on the business's
stream (with the payment's toast) → figures that include it. No event is emitted by the webhook code itself."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp

from cdc_dashboard.tokens import create_token

from .gateway_support import SSEStream, open_stream
from .webhook_server import DASHBOARD_SECRET, WebhookServer, fixture, serve_webhooks


async def _toast(stream: SSEStream, reference_amount: int) -> dict[str, Any]:
    for _ in range(20):
        event = await stream.next_event(timeout=10)
        assert event is not None, "no event arrived"
        if event.event == "invalidate" and event.json().get("payments"):
            toast: dict[str, Any] = event.json()["payments"][0]
            assert toast["amount_minor"] == reference_amount
            return toast
    raise AssertionError("no event carried the payment")


async def _stats(server: WebhookServer, business: uuid.UUID, token: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{server.base_url}/v1/businesses/{business}/stats", headers={"Authorization": f"Bearer {token}"}
        ) as response,
    ):
        assert response.status == 200, await response.text()
        stats: dict[str, Any] = await response.json()
        return stats


async def test_paystack_webhook_reaches_the_business_stream_and_figures(db_url: str) -> None:
    with serve_webhooks(db_url, with_listener=True) as server:
        business = server.business()
        other = server.business()
        token = create_token(DASHBOARD_SECRET, [str(business)], 600)
        body = fixture("paystack/charge_success_kes")
        body["data"]["metadata"]["business_id"] = str(business)
        async with open_stream(server.base_url, str(business), token) as stream:
            response = await asyncio.to_thread(server.paystack, json.dumps(body).encode())
            assert response.status_code == 200
            toast = await _toast(stream, 10000)
            assert (toast["currency"], toast["method"], toast["status"]) == ("KES", "paystack", "completed")
        stats = await _stats(server, business, token)
        assert stats["revenue"]["KES"]["total_minor"] == 10000
        assert stats["payments_count"] == 1 and stats["clients_total"] == 1
        # The unattributed twin (no business) and the other business stay at zero.
        del body["data"]["metadata"]["business_id"]
        body["data"]["reference"] = "T-unattributed"
        assert (await asyncio.to_thread(server.paystack, json.dumps(body).encode())).status_code == 200
        other_stats = await _stats(server, other, create_token(DASHBOARD_SECRET, [str(other)], 600))
        assert other_stats["payments_count"] == 0 and other_stats["revenue"] == {}


async def test_mpesa_c2b_reaches_the_business_stream(db_url: str) -> None:
    with serve_webhooks(db_url, with_listener=True) as server:
        business = server.business(shortcode="600966")
        token = create_token(DASHBOARD_SECRET, [str(business)], 600)
        async with open_stream(server.base_url, str(business), token) as stream:
            body = fixture("mpesa/c2b_confirmation_v2")
            response = await asyncio.to_thread(server.mpesa, "c2b/confirmation", body)
            assert response.status_code == 200
            toast = await _toast(stream, 500)
            assert toast["method"] == "mpesa"
        stats = await _stats(server, business, token)
        assert stats["revenue"]["KES"]["total_minor"] == 500
