"""One listener batch, `dashboard.consume_changes_v2`, called directly: grouping, keys, toasts, resyncs, dead
letters, the scan floor. (test_listener.py runs the same function through the listener daemon.)"""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest

from ..query_keys import ALL_PAYMENT_KEYS, BOOKING_KEYS

Conn = psycopg.Connection[Any]


@pytest.fixture
def conn(db_url: str) -> Any:
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


def business(conn: Conn) -> str:
    b = str(uuid.uuid4())
    conn.execute("insert into businesses (id, name) values (%s, 'Salon')", (b,))
    return b


def payment(conn: Conn, b: str, status: str = "completed", amount: int = 5000) -> str:
    """A payment row, without its captured change (the tests write the changes themselves)."""
    p = str(uuid.uuid4())
    conn.execute("alter table payments disable trigger cdc_capture_v1")
    try:
        conn.execute(
            "insert into payments (id, business_id, amount_minor, currency, method, status)"
            " values (%s, %s, %s, 'KES', 'mpesa', %s)",
            (p, b, amount, status),
        )
    finally:
        conn.execute("alter table payments enable trigger cdc_capture_v1")
    return p


def change(conn: Conn, table: str, op: str, b: str | None, row: str | None = None, **values: Any) -> int:
    old, new = values.get("old"), values.get("new")
    row_id = conn.execute(
        "insert into cdc.change_log (table_name, op, business_id, row_id, old_values, new_values)"
        " values (%s, %s, %s, %s, %s, %s) returning id",
        (table, op, b, row or str(uuid.uuid4()), json.dumps(old) if old else None, json.dumps(new) if new else None),
    ).fetchone()
    assert row_id is not None
    return int(row_id[0])


def consume(conn: Conn, from_id: int = 0) -> dict[str, Any]:
    cur = conn.execute("select * from dashboard.consume_changes_v2(5000, 'live', %s)", (from_id,))
    row = cur.fetchone()
    assert row is not None and cur.description is not None
    return dict(zip([d.name for d in cur.description], row, strict=True))


def events(conn: Conn, after: int = 0) -> list[tuple[str | None, str, dict[str, Any]]]:
    rows = conn.execute("select business_id, kind, payload from dashboard.events where id > %s order by id", (after,))
    return [(r[0], r[1], r[2]) for r in rows]


def test_one_event_per_business_in_order_of_first_change_with_design_keys(conn: Conn) -> None:
    b1, b2 = business(conn), business(conn)
    change(conn, "public.payments", "INSERT", b2, new={"status": "pending"})
    change(conn, "public.payments", "INSERT", b1, new={"status": "pending"})
    change(conn, "public.bookings", "UPDATE", b1)
    result = consume(conn)
    assert (result["consumed"], result["events_appended"]) == (3, 2)
    (first_b, kind1, p2), (second_b, _, p1) = events(conn)
    assert (first_b, second_b, kind1) == (b2, b1, "invalidate")
    assert [k for k, _ in p2["query_keys"]] == list(ALL_PAYMENT_KEYS)
    assert [k for k, _ in p1["query_keys"]] == [*ALL_PAYMENT_KEYS, "bookings"]
    assert all(b == b1 for _, b in p1["query_keys"])
    assert [c["table"] for c in p1["changes"]] == ["payments", "bookings"]
    assert p1["change_count"] == 2 and p1["business_id"] == b1
    state = conn.execute("select last_change_id, last_event_id, state from dashboard.listener_state").fetchone()
    assert state == (result["last_change_id"], result["last_event_id"], "live")


def test_bookings_alone_and_application_tables_get_their_own_keys(conn: Conn) -> None:
    b1, b2 = business(conn), business(conn)
    change(conn, "public.bookings", "UPDATE", b1)
    change(conn, "shop.orders", "INSERT", b2, row="42")
    consume(conn)
    (_, _, booking), (_, _, orders) = events(conn)
    assert [k for k, _ in booking["query_keys"]] == list(BOOKING_KEYS)
    assert orders["query_keys"] == [["dashboard-stats", b2], ["shop.orders", b2]]
    assert orders["changes"] == [{"table": "shop.orders", "op": "INSERT", "id": "42"}]


def test_toasts_only_for_payments_that_became_completed_once_each(conn: Conn) -> None:
    b = business(conn)
    inserted, updated, already = payment(conn, b, amount=111), payment(conn, b, amount=222), payment(conn, b)
    failed, reverted = payment(conn, b, "failed"), payment(conn, b, "pending")
    change(conn, "public.payments", "INSERT", b, inserted, new={"status": "completed"})
    change(conn, "public.payments", "UPDATE", b, updated, old={"status": "pending"}, new={"status": "completed"})
    change(conn, "public.payments", "UPDATE", b, updated, old={"status": "completed"}, new={"status": "completed"})
    change(conn, "public.payments", "UPDATE", b, already, old={"status": "completed"}, new={"status": "completed"})
    change(conn, "public.payments", "INSERT", b, failed, new={"status": "failed"})
    # completed at capture time, but refunded since: the toast would show a payment that is not completed now
    change(conn, "public.payments", "INSERT", b, reverted, new={"status": "completed"})
    change(conn, "public.payment_transactions", "INSERT", b, new={"status": "completed"})
    consume(conn)
    [(_, _, data)] = events(conn)
    assert [(t["id"], t["amount_minor"]) for t in data["payments"]] == [(inserted, 111), (updated, 222)]
    assert data["payments"][0] == {
        "id": inserted,
        "amount_minor": 111,
        "currency": "KES",
        "method": "mpesa",
        "client_name": None,
        "status": "completed",
    }
    assert data["change_count"] == 7


def test_truncate_becomes_one_resync_first(conn: Conn) -> None:
    b = business(conn)
    change(conn, "public.payments", "INSERT", b, new={"status": "pending"})
    change(conn, "public.payments", "TRUNCATE", None, row=None)
    change(conn, "public.bookings", "TRUNCATE", None, row=None)
    consume(conn)
    (resync_b, kind, data), (b_after, kind_after, _) = events(conn)
    assert (resync_b, kind, b_after, kind_after) == (None, "resync", b, "invalidate")
    assert data == {"reason": "truncate", "tables": ["public.bookings", "public.payments"]}


def test_unusable_changes_become_dead_letters_and_the_rest_goes_on(conn: Conn) -> None:
    b = business(conn)
    no_business = change(conn, "public.payments", "INSERT", None)
    too_long = change(conn, "public.payments", "INSERT", "x" * 500)
    control = change(conn, "public.payments", "INSERT", "bad\x07key")
    change(conn, "public.payments", "INSERT", b, new={"status": "pending"})
    result = consume(conn)
    assert result["consumed"] == 4 and result["events_appended"] == 1
    rejected = result["dead_letters"]
    rejected = json.loads(rejected) if isinstance(rejected, str) else rejected
    assert [r["change_id"] for r in rejected] == [no_business, too_long, control]
    assert "no business key" in rejected[0]["reason"]
    stored = conn.execute("select change ->> 'id', reason from dashboard.dead_letters order by id").fetchall()
    assert [int(i) for i, _ in stored] == [no_business, too_long, control]
    assert [e[0] for e in events(conn)] == [b]
    assert conn.execute("select count(*) from cdc.change_log").fetchone() == (0,)


def test_large_burst_lists_bounded_changes_but_counts_all(conn: Conn) -> None:
    b = business(conn)
    conn.execute(
        "insert into cdc.change_log (table_name, op, business_id, row_id, new_values)"
        " select 'public.payments', 'INSERT', %s, gen_random_uuid()::text, '{\"status\": \"pending\"}'"
        "   from generate_series(1, 1000)",
        (b,),
    )
    consume(conn)
    [(_, _, data)] = events(conn)
    assert data["change_count"] == 1000
    assert len(data["changes"]) == 100
    assert len(json.dumps(data, separators=(",", ":"))) < 10_000  # bounded, whatever the burst


def test_from_id_only_narrows_the_look_nothing_is_dropped(conn: Conn) -> None:
    b = business(conn)
    old = change(conn, "public.payments", "INSERT", b, new={"status": "pending"})
    new = change(conn, "public.payments", "INSERT", b, new={"status": "pending"})
    assert consume(conn, from_id=new)["consumed"] == 1
    left = conn.execute("select id from cdc.change_log").fetchall()
    assert left == [(old,)]
    assert consume(conn, from_id=0)["consumed"] == 1


def test_an_empty_log_appends_nothing(conn: Conn) -> None:
    before = conn.execute("select last_event_id from dashboard.listener_state").fetchone()
    result = consume(conn)
    assert (result["consumed"], result["events_appended"], result["last_event_id"]) == (0, 0, None)
    assert conn.execute("select last_event_id from dashboard.listener_state").fetchone() == before


def test_a_hand_written_change_with_a_bad_row_id_does_not_block_the_queue(conn: Conn) -> None:
    """Row ids of payments are trusted to be UUIDs (the trigger writes them from the uuid key); one written by
    hand that is not makes the batch go again with every id checked."""
    b = business(conn)
    p = payment(conn, b, amount=700)
    change(conn, "public.payments", "INSERT", b, "not-a-uuid", new={"status": "completed"})
    change(conn, "public.payments", "INSERT", b, p, new={"status": "completed"})
    assert consume(conn)["consumed"] == 2
    [(_, _, data)] = events(conn)
    assert [c["id"] for c in data["changes"]] == ["not-a-uuid", p]
    assert [t["id"] for t in data["payments"]] == [p]
    daily = conn.execute(
        "select revenue_minor, payments_count from dashboard.revenue_daily where business_id = %s", (b,)
    )
    assert daily.fetchall() == [(700, 1)]
    assert conn.execute("select count(*) from cdc.change_log").fetchone() == (0,)


def test_payload_text_escapes_every_string_and_keeps_design_key_order(conn: Conn) -> None:
    """Payloads are put together as text: every string a writer controls must come out escaped, on one line
    (an SSE `data:` line), and parse back to the same values."""
    b = business(conn)
    client = 'Wanjiku "Shiro"\nO\'Neil \\ ☕'
    client_id = conn.execute("insert into clients (name) values (%s) returning id", (client,)).fetchone()
    assert client_id is not None
    p = payment(conn, b, amount=4200)
    conn.execute("update payments set client_id = %s where id = %s", (client_id[0], p))
    conn.execute("delete from cdc.change_log")  # the update's own change: this test writes its changes itself
    change(conn, "public.payments", "INSERT", b, p, new={"status": "completed"})
    shop = 'shop "north" \\ east </script>'
    change(conn, "shop.orders", "UPDATE", shop, row='line1\nline2 "q" \\')
    consume(conn)
    texts = conn.execute("select payload::text from dashboard.events order by id").fetchall()
    assert len(texts) == 2 and not any("\n" in t for (t,) in texts)
    paid, orders = (json.loads(t) for (t,) in texts)
    assert list(paid) == ["business_id", "query_keys", "changes", "change_count", "payments", "committed_at"]
    assert paid["payments"][0]["client_name"] == client
    assert orders["business_id"] == shop and orders["query_keys"] == [["dashboard-stats", shop], ["shop.orders", shop]]
    assert orders["changes"] == [{"table": "shop.orders", "op": "UPDATE", "id": 'line1\nline2 "q" \\'}]
