"""Invalidation events: which query keys a change invalidates, and the event payload dashboards receive.

The mapping is DESIGN's default: a change to payments, payment_transactions or client_business_transactions
invalidates every figure and list of its business; a change to bookings invalidates the stats, the business
data and the bookings list. A table tracked by an application itself invalidates a key named after it.
"""

from __future__ import annotations

from typing import Any, TypedDict

__all__ = [
    "ALL_PAYMENT_KEYS",
    "BOOKING_KEYS",
    "ChangeRef",
    "InvalidatePayload",
    "ToastPayment",
    "invalidate_payload",
    "keys_for_table",
    "manual_refresh_payload",
]

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

_TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "payments": ALL_PAYMENT_KEYS,
    "payment_transactions": ALL_PAYMENT_KEYS,
    "client_business_transactions": ALL_PAYMENT_KEYS,
    "bookings": BOOKING_KEYS,
}

# An event names at most this many changes and toasts; a burst larger than that still invalidates the same
# keys, and says how many changes it carried in `change_count`.
MAX_CHANGES_LISTED = 100
MAX_TOASTS = 50


class ChangeRef(TypedDict):
    table: str
    op: str
    id: str | None


class ToastPayment(TypedDict):
    id: str
    amount_minor: int
    currency: str
    method: str
    client_name: str | None
    status: str


class InvalidatePayload(TypedDict):
    business_id: str
    query_keys: list[list[str]]
    changes: list[ChangeRef]
    change_count: int
    payments: list[ToastPayment]
    committed_at: str


def short_table_name(table: str) -> str:
    """`public.payments` -> `payments`; other schemas keep their prefix."""
    schema, _, name = table.partition(".")
    return name if schema == "public" and name else table


def keys_for_table(table: str) -> tuple[str, ...]:
    name = short_table_name(table)
    return _TABLE_KEYS.get(name, ("dashboard-stats", name))


def invalidate_payload(
    business_id: str, changes: list[ChangeRef], payments: list[ToastPayment], committed_at: str
) -> InvalidatePayload:
    """The `data` of an `invalidate` event for one business; keys keep DESIGN's order, without duplicates."""
    keys: dict[str, None] = {}
    for change in changes:
        for key in keys_for_table(change["table"]):
            keys[key] = None
    return {
        "business_id": business_id,
        "query_keys": [[key, business_id] for key in keys],
        "changes": changes[:MAX_CHANGES_LISTED],
        "change_count": len(changes),
        "payments": payments[:MAX_TOASTS],
        "committed_at": committed_at,
    }


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
