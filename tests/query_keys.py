"""The query keys DESIGN names, as the tests expect invalidation events to carry them.

Events are built in SQL: the listener's batch (sql/schema/40_listener_batch.sql), where the default mapping lives
in `dashboard.query_keys_v1`, and a manual refresh through the same SQL. A change to payments,
payment_transactions or client_business_transactions invalidates every figure and list of its business; a
change to bookings invalidates the stats, the business data and the bookings list.
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
