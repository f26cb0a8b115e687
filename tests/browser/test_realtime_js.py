"""`/static/realtime.js` as a dashboard app uses it: a plain page on the gateway's origin imports the module and
hands it a queryClient that records what it is asked to invalidate, and a token function (what an app's
backend call would be). No bundled page involved."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import psycopg
import pytest
from playwright.sync_api import Browser, Page, Route

from ..query_keys import ALL_PAYMENT_KEYS, BOOKING_KEYS
from .harness import Gateway, append_invalidations

pytestmark = pytest.mark.browser

# An app in miniature. The queryClient is the interface realtime.js promises to drive (TanStack's
# invalidateQueries shape); it records the filters it receives.
APP = """<!doctype html><meta charset="utf-8"><title>app</title>
<script type="module">
import { connectDashboard } from "/static/realtime.js";
const businessId = new URLSearchParams(location.search).get("business");
window.calls = [];
window.toasts = [];
window.tokensIssued = 0;
const queryClient = {
  invalidateQueries(filters) {
    window.calls.push(filters.queryKey ?? "everything-of-the-business");
    return Promise.resolve();
  },
};
window.live = connectDashboard({
  businessId,
  queryClient,
  token: async () => {
    window.tokensIssued += 1;
    return (await fetch("/app/token")).text();
  },
  onToast: (payment) => window.toasts.push(payment),
});
</script>"""


def wait_until(page: Page, predicate: str, timeout: float = 10_000) -> None:
    page.wait_for_function(predicate, timeout=timeout)


def test_exact_keys_and_a_renewed_token_after_the_first_one_expires(
    chromium: Browser, gateway: Gateway, db_url: str
) -> None:
    business_id = str(uuid.uuid4())
    with psycopg.connect(db_url) as conn:
        conn.execute("insert into businesses (id, name) values (%s, 'Kamau Clinic')", (business_id,))

    # The first token lives 3 s: the gateway ends the stream when it expires, and realtime.js must come back
    # with the next one the app hands out.
    tokens = [gateway.token(business_id, ttl=3)]

    def issue_token(route: Route) -> None:
        token = tokens.pop(0) if tokens else gateway.token(business_id, ttl=3600)
        route.fulfill(status=200, content_type="text/plain", body=token)

    page = chromium.new_page()
    page.route(f"{gateway.url}/app/token", issue_token)
    page.route(
        re.compile(rf"{re.escape(gateway.url)}/app(\?.*)?$"),
        lambda route: route.fulfill(status=200, content_type="text/html", body=APP),
    )
    page.goto(f"{gateway.url}/app?business={business_id}")

    # Started without a resume position: once the stream is open, everything of the business is refetched.
    wait_until(page, "() => window.live && window.live.status === 'live'")
    wait_until(page, "() => window.calls.includes('everything-of-the-business')")

    started = time.monotonic()
    wait_until(page, "() => window.tokensIssued >= 2 && window.live.status === 'live'", timeout=15_000)
    assert time.monotonic() - started < 12

    # An event after the renewal: each key it names is invalidated exactly as named, once.
    page.evaluate("() => { window.calls = []; }")
    append_invalidations(db_url, business_id, 1)
    wait_until(page, "() => window.calls.length >= 8")
    page.wait_for_timeout(200)
    expected = [[key, business_id] for key in dict.fromkeys(ALL_PAYMENT_KEYS + BOOKING_KEYS)]
    calls: list[Any] = page.evaluate("() => window.calls")
    assert sorted(map(json.dumps, calls)) == sorted(map(json.dumps, expected))
    page.close()
