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
from .harness import Gateway, append_invalidations, complete_payment, seed_shop

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


# An app whose queryClient keeps data as TanStack's does (getQueryData / setQueryData / cancelQueries) and
# records what realtime.js sets and invalidates. Its EventSource passes the real stream through, except that
# while `window.holding` is true it holds the events back until the test releases them one by one: the network
# being slow, so that the app's own fetch can race ahead of the stream.
TANSTACK_APP = """<!doctype html><meta charset="utf-8"><title>app</title>
<script type="module">
import { connectDashboard } from "/static/realtime.js";
const params = new URLSearchParams(location.search);
const businessId = params.get("business");
const token = params.get("token");
const statsKey = JSON.stringify(["dashboard-stats", businessId]);
window.calls = [];
window.store = new Map();
window.holding = false;
window.held = [];
class SlowNetworkEventSource {
  constructor(url) {
    this.inner = new EventSource(url);
    this.inner.onopen = (e) => this.onopen?.(e);
    this.inner.onerror = (e) => this.onerror?.(e);
  }
  addEventListener(type, listener) {
    this.inner.addEventListener(type, (event) => {
      if (window.holding) window.held.push({ listener, event });
      else listener(event);
    });
  }
  close() {
    this.inner.close();
  }
}
window.releaseOne = () => {
  const { listener, event } = window.held.shift();
  listener(event);
};
window.fetchStats = async () => {
  const response = await fetch(`/v1/businesses/${businessId}/stats`, { headers: { Authorization: `Bearer ${token}` } });
  window.store.set(statsKey, await response.json());
};
window.cachedStats = () => window.store.get(statsKey);
const queryClient = {
  invalidateQueries(filters) {
    window.calls.push(["invalidate", filters.queryKey ?? "everything-of-the-business"]);
    return Promise.resolve();
  },
  cancelQueries() {
    return Promise.resolve();
  },
  getQueryData(queryKey) {
    return window.store.get(JSON.stringify(queryKey));
  },
  setQueryData(queryKey, data) {
    window.calls.push(["set", queryKey, data.as_of_event_id]);
    window.store.set(JSON.stringify(queryKey), data);
    return data;
  },
};
await window.fetchStats();
window.live = connectDashboard({ businessId, token, queryClient, EventSource: SlowNetworkEventSource });
</script>"""


def test_live_figures_are_set_and_an_older_push_never_replaces_newer_fetched_data(
    chromium: Browser, gateway: Gateway, db_url: str
) -> None:
    shop = seed_shop(db_url)
    page = chromium.new_page()
    page.route(
        re.compile(rf"{re.escape(gateway.url)}/app(\?.*)?$"),
        lambda route: route.fulfill(status=200, content_type="text/html", body=TANSTACK_APP),
    )
    page.goto(f"{gateway.url}/app?business={shop.business_id}&token={gateway.token(shop.business_id)}")
    wait_until(page, "() => window.live && window.live.status === 'live'")
    stats_key = ["dashboard-stats", shop.business_id]

    # A live payment event: the stats are set from it, and only the other keys are invalidated.
    page.evaluate("() => { window.calls = []; }")
    complete_payment(db_url, shop, "Achieng", 150000, booking=True)
    wait_until(page, "() => window.cachedStats().payments_count === 2")
    page.wait_for_timeout(200)  # the coalesced invalidations
    calls: list[Any] = page.evaluate("() => window.calls")
    assert [call[:2] for call in calls if call[0] == "set"] == [["set", stats_key]], calls
    invalidated = [call[1][0] for call in calls if call[0] == "invalidate"]
    assert sorted(invalidated) == sorted(set(ALL_PAYMENT_KEYS + BOOKING_KEYS) - {"dashboard-stats"}), calls
    assert page.evaluate("() => window.cachedStats().revenue.KES.total_minor") == 400000

    # Two payments whose events the network holds back, while the app fetches the stats (both included).
    page.evaluate("() => { window.holding = true; window.calls = []; }")
    complete_payment(db_url, shop, "Wambui", 50000, booking=False)
    wait_until(page, "() => window.held.length >= 1")
    complete_payment(db_url, shop, "Kamau", 20000, booking=False)
    wait_until(page, "() => window.held.length >= 2")
    page.evaluate("() => window.fetchStats()")
    fetched: dict[str, Any] = page.evaluate("() => window.cachedStats()")
    assert fetched["revenue"]["KES"]["total_minor"] == 470000
    first_push = page.evaluate("() => JSON.parse(window.held[0].event.data).figures['dashboard-stats']")
    assert first_push["as_of_event_id"] < fetched["as_of_event_id"]
    assert first_push["revenue"]["KES"]["total_minor"] == 450000

    # The first event arrives: its figures are older than what the app holds, and must not replace them.
    page.evaluate("() => { window.holding = false; window.releaseOne(); }")
    page.wait_for_timeout(200)
    assert page.evaluate("() => window.cachedStats()") == fetched
    calls = page.evaluate("() => window.calls")
    assert not [call for call in calls if call[0] == "set"], calls
    assert "dashboard-stats" not in [call[1][0] for call in calls if call[0] == "invalidate"], calls

    # The second one carries figures at least as new: they are set.
    page.evaluate("() => window.releaseOne()")
    page.wait_for_timeout(200)
    cached = page.evaluate("() => window.cachedStats()")
    assert cached["as_of_event_id"] >= fetched["as_of_event_id"]
    assert cached["revenue"]["KES"]["total_minor"] == 470000
    assert cached["payments_count"] == 4
    page.close()
