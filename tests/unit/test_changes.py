"""Planning a batch of captured changes into events: grouping, toasts, resyncs, dead letters."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from cdc_dashboard.changes import Change, plan_batch
from cdc_dashboard.events import ALL_PAYMENT_KEYS, BOOKING_KEYS

T0 = datetime(2026, 1, 1, tzinfo=UTC)
B1, B2 = "11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222"


def change(i: int, table: str, op: str, business: str | None, row: str | None = None, **values: object) -> Change:
    old = values.pop("old", None)
    new = values.pop("new", None)
    return Change(i, table, op, business, row or f"r{i}", old, new, T0 + timedelta(seconds=i))  # type: ignore[arg-type]


def test_groups_by_business_in_order_with_design_keys() -> None:
    plan = plan_batch(
        [
            change(3, "public.bookings", "UPDATE", B1),
            change(1, "public.payments", "INSERT", B2, new={"status": "pending"}),
            change(2, "public.payments", "INSERT", B1, new={"status": "pending"}),
        ]
    )
    ids, kinds, payloads = plan.events({})
    assert ids == [B2, B1]
    assert kinds == ["invalidate", "invalidate"]
    p2 = json.loads(payloads[1])
    assert [k for k, _ in p2["query_keys"]] == [*ALL_PAYMENT_KEYS, "bookings"]
    assert all(b == B1 for _, b in p2["query_keys"])
    assert [c["table"] for c in p2["changes"]] == ["payments", "bookings"]
    assert plan.last_change_id == 3


def test_bookings_alone_invalidate_booking_keys() -> None:
    _, _, payloads = plan_batch([change(1, "public.bookings", "UPDATE", B1)]).events({})
    assert [k for k, _ in json.loads(payloads[0])["query_keys"]] == list(BOOKING_KEYS)


def test_toasts_only_for_payments_that_became_completed() -> None:
    plan = plan_batch(
        [
            change(1, "public.payments", "INSERT", B1, "p1", new={"status": "completed"}),
            change(2, "public.payments", "UPDATE", B1, "p2", old={"status": "pending"}, new={"status": "completed"}),
            change(3, "public.payments", "UPDATE", B1, "p3", old={"status": "completed"}, new={"status": "completed"}),
            change(4, "public.payments", "INSERT", B1, "p4", new={"status": "failed"}),
            change(5, "public.payment_transactions", "INSERT", B1, "t5", new={"status": "completed"}),
        ]
    )
    assert plan.toast_ids() == ["p1", "p2"]


def test_truncate_becomes_one_resync_first() -> None:
    plan = plan_batch([change(1, "public.payments", "INSERT", B1), change(2, "public.payments", "TRUNCATE", None)])
    ids, kinds, _ = plan.events({})
    assert kinds == ["resync", "invalidate"]
    assert ids[0] is None


def test_unusable_changes_become_dead_letters() -> None:
    plan = plan_batch(
        [
            change(1, "public.payments", "INSERT", None),
            change(2, "public.payments", "MERGE", B1),
            change(3, "public.payments", "INSERT", "x" * 500),
            change(4, "public.payments", "INSERT", B1),
        ]
    )
    assert [c.id for c, _ in plan.dead_letters] == [1, 2, 3]
    assert "no business key" in plan.dead_letters[0][1]
    assert list(plan.businesses) == [B1]


def test_large_burst_lists_bounded_changes_but_counts_all() -> None:
    plan = plan_batch([change(i, "public.payments", "INSERT", B1) for i in range(1, 1001)])
    payload = json.loads(plan.events({})[2][0])
    assert payload["change_count"] == 1000
    assert len(payload["changes"]) == 100
    assert len(json.dumps(payload)) < 8000
