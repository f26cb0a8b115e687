"""The page and its static files over HTTP (no browser, no database): the token is checked before any HTML is
sent, and the page only loads files the gateway itself serves."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from cdc_dashboard.config import Settings
from cdc_dashboard.gateway.app import create_app
from cdc_dashboard.gateway.page import STATIC_DIR
from cdc_dashboard.tokens import create_token

from .harness import SECRET

BUSINESS = str(uuid.uuid4())


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # The page routes need no database: the app's lifespan (which connects) is never run by ASGITransport.
    app = create_app(Settings(secret=SECRET, database_url="postgresql://unused@127.0.0.1:1/none"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        yield client


async def test_the_page_is_served_for_a_token_that_names_the_business(client: httpx.AsyncClient) -> None:
    token = create_token(SECRET, [BUSINESS.upper()], 60)
    response = await client.get(f"/dashboard/{BUSINESS.upper()}", params={"access_token": token})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert f'<meta name="cdc-business-id" content="{BUSINESS}">' in response.text
    for testid in ("revenue-today", "revenue-month", "revenue-total", "payments-count", "clients-total",
                   "clients-new-today", "bookings-by-payment-status", "transactions", "connection-status",
                   "refresh"):  # fmt: skip
        assert f'data-testid="{testid}"' in response.text
    # No build step, no internet: every script and stylesheet is one of ours, under /static/.
    for src in re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', response.text):
        assert src.startswith("../static/"), src
        assert (await client.get(f"/dashboard/{src}")).status_code == 200


@pytest.mark.parametrize(
    ("token", "status"),
    [
        (None, 401),
        ("not-a-token", 401),
        # Minted at collection, maybe minutes before the test runs: long enough not to expire by then.
        (create_token("another-secret-of-at-least-32-characters", [BUSINESS], 3600), 401),
        (create_token(SECRET, [str(uuid.uuid4())], 3600), 403),
    ],
)
async def test_a_bad_token_gets_an_error_page_not_the_dashboard(
    client: httpx.AsyncClient, token: str | None, status: int
) -> None:
    params = {"access_token": token} if token else {}
    response = await client.get(f"/dashboard/{BUSINESS}", params=params)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert "data-testid" not in response.text
    assert token is None or token not in response.text


async def test_an_address_that_names_no_business_is_a_400_page(client: httpx.AsyncClient) -> None:
    response = await client.get("/dashboard/not-a-uuid", params={"access_token": create_token(SECRET, [BUSINESS], 60)})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")


async def test_static_files_are_served_with_their_types(client: httpx.AsyncClient) -> None:
    realtime = await client.get("/static/realtime.js")
    assert realtime.status_code == 200
    assert "javascript" in realtime.headers["content-type"]
    assert "export function connectDashboard(" in realtime.text
    assert (await client.get("/static/dashboard.css")).headers["content-type"].startswith("text/css")
    assert (await client.get("/static/../gateway/page.py")).status_code == 404
    assert (STATIC_DIR / "dashboard.js").is_file()
