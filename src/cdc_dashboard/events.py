"""Invalidation events: the query keys of DESIGN, and the payload of a manual refresh.

Events for captured changes are built by the listener's batch statement in SQL
(`dashboard.consume_changes_v2`, sql/schema/0007_listener_batch.sql and 0010), where the default mapping lives in
`dashboard.query_keys_v1`: a change to payments, payment_transactions or client_business_transactions
invalidates every figure and list of its business; a change to bookings invalidates the stats, the business
data and the bookings list; a table tracked by an application itself invalidates the stats and a key named
after it. The constants here are the same lists, for the manual refresh and for tests.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ALL_PAYMENT_KEYS", "BOOKING_KEYS", "manual_refresh_payload"]

ALL_PAYMENT_KEYS = (
    "dashboard-stats",
    "business-revenue",
    "business-data",
    "transactions",
    "client-business-transactions",
    "payment-transactions",
    "payments",
)
BOOKING_KEYS = ("dashboard-stats", "business-data", "bookings")


def manual_refresh_payload(business_id: str, committed_at: str) -> dict[str, Any]:
    """The event a manual refresh emits: everything of the business is stale."""
    keys = dict.fromkeys(ALL_PAYMENT_KEYS + BOOKING_KEYS)
    return {
        "business_id": business_id,
        "query_keys": [[key, business_id] for key in keys],
        "changes": [],
        "change_count": 0,
        "payments": [],
        "committed_at": committed_at,
        "reason": "manual_refresh",
    }
