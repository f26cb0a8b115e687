"""Pushed figures in `/static/realtime.js`: a live event that carries `figures` sets those queries' data instead of
invalidating them, never replacing newer cached data, and invalidates the rest as before.

These tests drive the module with events the test scripts (an EventSource stand-in passed through
`connectDashboard`'s `EventSource` option), because the rules are about orderings a real stream produces only by
chance: a cached body newer than the push, an invalidation still waiting in the coalescing window. The module,
the page and the browser are real; only the event source is scripted. A real gateway's pushed events are
exercised in test_realtime_js.py and test_dashboard.py (the gateway side: tests/unit/test_pushed_figures.py,
tests/integration/test_gateway_pushed_figures.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Route

from cdc_dashboard.gateway.page import STATIC_DIR

from ..query_keys import ALL_PAYMENT_KEYS

pytestmark = pytest.mark.browser

ORIGIN = "http://app.test"
BUSINESS = "6f1c2a34-0d5e-4b8a-9c71-2e3f4a5b6c7d"

# An app in miniature with a queryClient that keeps data like TanStack's (getQueryData / setQueryData) and
# records every call realtime.js makes; `?client=invalidate-only` leaves out setQueryData and cancelQueries.
APP = """<!doctype html><meta charset="utf-8"><title>app</title>
<script type="module">
import { connectDashboard } from "/static/realtime.js";
const params = new URLSearchParams(location.search);
window.calls = [];
window.store = new Map();
class ScriptedEventSource {
  constructor(url) {
    this.url = url;
    this.listeners = {};
    window.source = this;
    setTimeout(() => this.onopen?.(), 0);
  }
  addEventListener(type, listener) {
    (this.listeners[type] ??= []).push(listener);
  }
  close() {}
  emit(type, id, data) {
    const event = new MessageEvent(type, { data: JSON.stringify(data), lastEventId: String(id) });
    for (const listener of this.listeners[type] ?? []) listener(event);
  }
}
const queryClient = {
  invalidateQueries(filters) {
    window.calls.push(["invalidate", filters.queryKey ?? "everything-of-the-business"]);
    return Promise.resolve();
  },
  getQueryData(queryKey) {
    return window.store.get(JSON.stringify(queryKey));
  },
};
if (params.get("client") !== "invalidate-only") {
  queryClient.setQueryData = (queryKey, data) => {
    window.calls.push(["set", queryKey, data.as_of_event_id]);
    window.store.set(JSON.stringify(queryKey), data);
    return data;
  };
  queryClient.cancelQueries = (filters) => {
    window.calls.push(["cancel", filters.queryKey, filters.exact]);
    return Promise.resolve();
  };
}
window.store.set(JSON.stringify(["dashboard-stats", params.get("business")]), { as_of_event_id: 10 });
window.live = connectDashboard({
  businessId: params.get("business"),
  token: "unused",
  queryClient,
  lastEventId: 10,
  EventSource: ScriptedEventSource,
});
</script>"""


def stats_body(as_of: int, today_minor: int, business_id: str = BUSINESS) -> dict[str, Any]:
    """A `GET /stats` body, as the gateway pushes it."""
    return {
        "business_id": business_id,
        "as_of_event_id": as_of,
        "revenue": {"KES": {"total_minor": today_minor, "today_minor": today_minor, "month_minor": today_minor}},
        "payments_count": 1,
        "clients_total": 1,
        "clients_new_today": 1,
        "bookings": {"by_status": {}, "by_payment_status": {}},
    }


def payment_event(event_id: int, figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """A payment's `invalidate` event data (all seven payment keys), with `figures` when given."""
    data: dict[str, Any] = {
        "business_id": BUSINESS,
        "query_keys": [[key, BUSINESS] for key in ALL_PAYMENT_KEYS],
        "changes": [{"table": "payments", "op": "INSERT", "id": str(event_id)}],
        "payments": [],
        "committed_at": "2026-12-08T01:00:00Z",
    }
    if figures is not None:
        data["figures"] = figures
    return data


def serve(route: Route) -> None:
    path = route.request.url.removeprefix(ORIGIN).split("?")[0]
    if path == "/static/realtime.js":
        route.fulfill(status=200, content_type="text/javascript", body=(STATIC_DIR / "realtime.js").read_text())
    else:
        route.fulfill(status=200, content_type="text/html", body=APP)


@pytest.fixture
def app(chromium: Browser) -> Iterator[Page]:
    page = chromium.new_page()
    page.route(f"{ORIGIN}/**", serve)
    page.goto(f"{ORIGIN}/app?business={BUSINESS}")
    page.wait_for_function("() => window.live && window.live.status === 'live'")
    yield page
    page.close()


def emit(page: Page, event_id: int, data: dict[str, Any]) -> list[Any]:
    """Deliver one `invalidate` event and return the calls it caused, once its coalescing window has passed."""
    page.evaluate("() => { window.calls = []; }")
    page.evaluate("([id, data]) => window.source.emit('invalidate', id, data)", [event_id, data])
    page.wait_for_timeout(250)  # the 75 ms coalescing window, with room to spare
    calls: list[Any] = page.evaluate("() => window.calls")
    return calls


def invalidated(calls: list[Any]) -> set[str]:
    return {call[1][0] for call in calls if call[0] == "invalidate"}


def cached_stats(page: Page) -> dict[str, Any]:
    body: dict[str, Any] = page.evaluate("(id) => window.store.get(JSON.stringify(['dashboard-stats', id]))", BUSINESS)
    return body


def test_a_pushed_key_is_set_not_refetched_and_the_others_are_refetched(app: Page) -> None:
    calls = emit(app, 11, payment_event(11, {"dashboard-stats": stats_body(11, 150000)}))
    assert ["cancel", ["dashboard-stats", BUSINESS], True] in calls
    assert ["set", ["dashboard-stats", BUSINESS], 11] in calls
    assert invalidated(calls) == set(ALL_PAYMENT_KEYS) - {"dashboard-stats"}
    assert cached_stats(app)["revenue"]["KES"]["today_minor"] == 150000


def test_an_event_without_figures_refetches_every_key_it_names(app: Page) -> None:
    calls = emit(app, 11, payment_event(11))
    assert not [call for call in calls if call[0] == "set"]
    assert invalidated(calls) == set(ALL_PAYMENT_KEYS)


def test_a_pushed_body_older_than_the_cached_one_does_not_overwrite_it(app: Page) -> None:
    # The app's own fetch raced ahead of the stream: its stats include event 20.
    newer = stats_body(20, 900000)
    app.evaluate("([id, body]) => window.store.set(JSON.stringify(['dashboard-stats', id]), body)", [BUSINESS, newer])
    calls = emit(app, 12, payment_event(12, {"dashboard-stats": stats_body(12, 150000)}))
    assert cached_stats(app) == newer
    assert not [call for call in calls if call[0] == "set"]
    # Nor refetched: the cached body already includes event 12.
    assert "dashboard-stats" not in invalidated(calls)
    # A later push with a higher as_of does replace it.
    emit(app, 21, payment_event(21, {"dashboard-stats": stats_body(21, 950000)}))
    assert cached_stats(app)["as_of_event_id"] == 21
    assert cached_stats(app)["revenue"]["KES"]["today_minor"] == 950000


def test_a_push_covers_an_invalidation_still_waiting_in_the_coalescing_window(app: Page) -> None:
    app.evaluate("() => { window.calls = []; }")
    app.evaluate(
        "([a, b]) => { window.source.emit('invalidate', 11, a); window.source.emit('invalidate', 12, b); }",
        [payment_event(11), payment_event(12, {"dashboard-stats": stats_body(12, 150000)})],
    )
    app.wait_for_timeout(250)
    calls: list[Any] = app.evaluate("() => window.calls")
    assert ["set", ["dashboard-stats", BUSINESS], 12] in calls
    assert invalidated(calls) == set(ALL_PAYMENT_KEYS) - {"dashboard-stats"}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(stats_body(11, 150000, business_id="00000000-0000-4000-8000-000000000000"), id="another-business"),
        pytest.param({"revenue": {}}, id="no-as_of_event_id"),
        pytest.param("not an object", id="not-an-object"),
    ],
)
def test_a_pushed_body_that_is_not_this_business_figures_is_refetched_instead(app: Page, body: Any) -> None:
    calls = emit(app, 11, payment_event(11, {"dashboard-stats": body}))
    assert not [call for call in calls if call[0] == "set"]
    assert invalidated(calls) == set(ALL_PAYMENT_KEYS)
    assert cached_stats(app) == {"as_of_event_id": 10}


def test_a_client_without_set_query_data_gets_pushed_keys_invalidated(chromium: Browser) -> None:
    page = chromium.new_page()
    page.route(f"{ORIGIN}/**", serve)
    page.goto(f"{ORIGIN}/app?business={BUSINESS}&client=invalidate-only")
    page.wait_for_function("() => window.live && window.live.status === 'live'")
    calls = emit(page, 11, payment_event(11, {"dashboard-stats": stats_body(11, 150000)}))
    assert invalidated(calls) == set(ALL_PAYMENT_KEYS)
    page.close()
