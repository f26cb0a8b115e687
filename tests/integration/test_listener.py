"""The listener against a real PostgreSQL: delivery, ordering, no loss across cuts, dead letters."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import psycopg

from ..listening import event_rows, payment_ids_in_events, running_listener, wait_for


def new_business(conn: psycopg.Connection[Any], name: str = "Salon") -> str:
    business = str(uuid.uuid4())
    conn.execute("insert into businesses (id, name) values (%s, %s)", (business, name))
    return business


def pay(conn: psycopg.Connection[Any], business: str, amount: int = 150000, status: str = "completed") -> str:
    payment = str(uuid.uuid4())
    conn.execute(
        "insert into payments (id, business_id, amount_minor, currency, method, status)"
        " values (%s, %s, %s, 'KES', 'mpesa', %s)",
        (payment, business, amount, status),
    )
    return payment


# The listener's sleep announcement, as writers read it (cdc.wake_v1).
SLEEPING = "select coalesce(to_timestamp(pg_sequence_last_value('cdc.sleeping_until_v1')) > now(), false)"


def payload(event: dict[str, Any]) -> dict[str, Any]:
    p = event["payload"]
    return p if isinstance(p, dict) else dict(json.loads(p))


async def test_payment_becomes_event_with_keys_toast_and_fresh_aggregates(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        business = new_business(conn)
        client = conn.execute("insert into clients (name) values ('Achieng') returning id::text").fetchone()
        assert client is not None
        async with running_listener(db_url):
            payment = str(uuid.uuid4())
            conn.execute(
                "insert into payments (id, business_id, client_id, amount_minor, currency, method, status)"
                " values (%s, %s, %s, 150000, 'KES', 'mpesa', 'completed')",
                (payment, business, client[0]),
            )
            events = await wait_for(lambda: [e for e in event_rows(db_url) if e["business_id"] == business])
        data = payload(events[0])
        assert data["changes"] == [{"table": "payments", "op": "INSERT", "id": payment}]
        assert ["dashboard-stats", business] in data["query_keys"]
        assert len(data["query_keys"]) == 7
        assert data["payments"] == [
            {
                "id": payment,
                "amount_minor": 150000,
                "currency": "KES",
                "method": "mpesa",
                "client_name": "Achieng",
                "status": "completed",
            }
        ]
        # The aggregates were rebuilt in the same transaction that appended the event.
        row = conn.execute(
            "select sum(revenue_minor) from dashboard.revenue_daily where business_id = %s", (business,)
        ).fetchone()
        assert row == (150000,)
        state = conn.execute("select state, last_event_id from dashboard.listener_state").fetchone()
        assert state == ("stopped", events[-1]["id"])


async def test_wakes_on_notify_not_on_a_poll(db_url: str) -> None:
    """When quiet the listener sleeps (probe interval 30 s here): only the writers' NOTIFY can wake it."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        business = new_business(conn)
        async with running_listener(db_url, probe_interval=30.0):
            await asyncio.sleep(0.3)  # let it go to sleep
            assert conn.execute(SLEEPING).fetchone() == (True,)
            started = time.monotonic()
            pay(conn, business)
            await wait_for(lambda: event_rows(db_url), timeout=5, interval=0.005)
            assert time.monotonic() - started < 2.0
        # A clean stop withdraws the announcement, so writers stop notifying.
        assert conn.execute(SLEEPING).fetchone() == (False,)


async def test_out_of_order_commits_are_both_delivered_in_commit_order(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as setup:
        b = new_business(setup)
    async with running_listener(db_url):
        with psycopg.connect(db_url) as a, psycopg.connect(db_url, autocommit=True) as c:
            first = pay(a, b, 100)  # A writes first, stays open
            second = pay(c, b, 200)  # B writes and commits
            await wait_for(lambda: second in payment_ids_in_events(db_url))
            assert first not in payment_ids_in_events(db_url)
            a.commit()  # A commits last
            await wait_for(lambda: first in payment_ids_in_events(db_url))
    assert payment_ids_in_events(db_url) == [second, first]


async def test_a_long_transaction_far_behind_the_scan_window_is_still_delivered(db_url: str) -> None:
    """While busy, batches look only at recent change ids (scan_window); a transaction that stayed open while
    more changes than that were consumed must still be found (by the periodic full look), not skipped."""
    with psycopg.connect(db_url, autocommit=True) as setup:
        b = new_business(setup)
    async with running_listener(db_url, scan_window=10, full_scan_every=0.5, idle_polls_before_sleep=10**9):
        with psycopg.connect(db_url) as long_txn, psycopg.connect(db_url, autocommit=True) as c:
            early = pay(long_txn, b, 100)  # the lowest change id, invisible until commit
            later = [pay(c, b, 200) for _ in range(50)]  # five windows' worth, consumed meanwhile
            await wait_for(lambda: later[-1] in payment_ids_in_events(db_url))
            long_txn.commit()
            await wait_for(lambda: early in payment_ids_in_events(db_url), timeout=5)
    assert payment_ids_in_events(db_url) == [*later, early]


async def test_update_moving_a_row_informs_both_businesses(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        b1, b2 = new_business(conn), new_business(conn)
        payment = pay(conn, b1)
        async with running_listener(db_url):
            after = event_rows(db_url)[-1]["id"]
            conn.execute("update payments set business_id = %s where id = %s", (b2, payment))
            events = await wait_for(lambda: len(event_rows(db_url, after)) >= 2 and event_rows(db_url, after))
        assert {e["business_id"] for e in events} == {b1, b2}


async def test_truncate_makes_every_dashboard_resync(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        b = new_business(conn)
        pay(conn, b)
        async with running_listener(db_url):
            conn.execute("truncate payments cascade")
            events = await wait_for(lambda: [e for e in event_rows(db_url) if e["kind"] == "resync"])
            assert events[0]["business_id"] is None
            total = conn.execute("select count(*) from dashboard.revenue_daily where business_id = %s", (b,))
            assert total.fetchone() == (0,)


async def test_bad_change_goes_to_dead_letters_and_the_loop_goes_on(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        b = new_business(conn)
        async with running_listener(db_url):
            conn.execute(
                "insert into cdc.change_log (table_name, op, business_id) values ('public.payments', 'INSERT', null)"
            )
            good = pay(conn, b)
            await wait_for(lambda: good in payment_ids_in_events(db_url))
        letters = conn.execute("select reason, change->>'op' from dashboard.dead_letters").fetchall()
        assert letters == [("INSERT on public.payments carries no business key", "INSERT")]


async def test_terminated_connections_lose_nothing(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        b = new_business(conn)
        amounts: list[int] = []

        def delivered() -> int:
            return sum(payload(e)["change_count"] for e in event_rows(db_url) if e["business_id"] == b)

        async with running_listener(db_url) as manager:
            for round_ in range(4):
                for i in range(50):
                    amounts.append(100 * round_ + i)
                    pay(conn, b, amounts[-1])
                    if i == 25:
                        conn.execute(
                            "select pg_terminate_backend(pid) from pg_stat_activity"
                            " where application_name like 'cdc-dashboard listener%'"
                        )
                await asyncio.sleep(0.05 * round_)
            await wait_for(lambda: delivered() >= len(amounts), timeout=30)
            assert manager.status()["reconnects"] >= 1
        assert delivered() == len(amounts), "each change delivered exactly once"
        revenue = conn.execute("select sum(revenue_minor) from dashboard.revenue_daily where business_id = %s", (b,))
        assert revenue.fetchone() == (sum(amounts),)
        state = conn.execute("select reconnects, last_error is not null from dashboard.listener_state").fetchone()
        assert state is not None and state[0] >= 1 and state[1]


async def test_burst_of_10000_changes_in_order(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        businesses = [new_business(conn, f"B{i}") for i in range(10)]
        async with running_listener(db_url):
            with conn.transaction():
                conn.execute(
                    "insert into payments (business_id, amount_minor, currency, method, status)"
                    " select (%s::uuid[])[1 + g %% 10], g, 'KES', 'cash', 'completed' from generate_series(1, 10000) g",
                    (businesses,),
                )
            await wait_for(lambda: conn.execute("select count(*) = 0 from cdc.change_log").fetchone() == (True,))
        events = event_rows(db_url)
        ids = [e["id"] for e in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert sum(payload(e)["change_count"] for e in events) == 10000
        revenue = conn.execute("select sum(revenue_minor) from dashboard.revenue_daily").fetchone()
        assert revenue == (sum(range(1, 10001)),)


async def test_catches_up_what_was_written_while_stopped(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        b = new_business(conn)
        offline = [pay(conn, b) for _ in range(50)]
        async with running_listener(db_url):
            # ready is set only after catch-up: everything written while stopped is already an event.
            assert set(offline) <= set(payment_ids_in_events(db_url))


def events_of_which_the_first_20_are_old(conn: psycopg.Connection[Any], business: str) -> None:
    """25 events, ids 1..25, of which 1..20 are past the default retention (7 days)."""
    conn.execute(
        "select dashboard.append_events_v1(array_fill(%s::text, array[25]), array_fill('invalidate'::text,"
        " array[25]), array_fill('{}'::jsonb, array[25]))",
        (business,),
    )
    conn.execute("update dashboard.events set created_at = now() - interval '8 days' where id <= 20")


async def test_old_events_are_pruned_in_batches_and_marked(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        b = new_business(conn)
        events_of_which_the_first_20_are_old(conn, b)
        async with running_listener(db_url, prune_every=0.0, prune_batch=7):
            await wait_for(
                lambda: conn.execute("select pruned_through from dashboard.listener_state").fetchone() == (20,)
            )
        remaining = conn.execute("select min(id), count(*) from dashboard.events").fetchone()
        assert remaining == (21, 5)


async def test_a_listener_that_is_never_quiet_still_prunes(db_url: str) -> None:
    """Under a steady stream of payments the listener never reaches its quiet path; old events must still go,
    a small chunk between batches, or the events table would grow for as long as the payments flow."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        b = new_business(conn)
        events_of_which_the_first_20_are_old(conn, b)
        # idle_polls_before_sleep so large that the listener never takes its quiet path (where it also prunes).
        async with running_listener(db_url, prune_every=0.0, prune_batch_busy=7, idle_polls_before_sleep=10**9):

            def pruned() -> tuple[Any, ...] | None:
                return conn.execute("select pruned_through from dashboard.listener_state").fetchone()

            deadline = time.monotonic() + 10
            while pruned() != (20,) and time.monotonic() < deadline:
                await asyncio.to_thread(pay, conn, b)
                await asyncio.sleep(0.05)
            assert pruned() == (20,)
        assert conn.execute("select count(*) from dashboard.events where id <= 20").fetchone() == (0,)


async def test_a_writer_that_read_awake_before_the_sleep_announcement_is_still_seen_at_once(db_url: str) -> None:
    """The lost-wake-up race: a writer checks the announcement while the listener is awake (so it will not
    NOTIFY) and commits after the listener announced sleep. The listener must not sleep through it."""
    with psycopg.connect(db_url, autocommit=True) as setup:
        b = new_business(setup)
        assert setup.execute(SLEEPING).fetchone() == (False,)
    with psycopg.connect(db_url) as writer:
        payment = pay(writer, b)  # reads "awake": this transaction will not notify
        async with running_listener(db_url, probe_interval=30.0):
            await asyncio.sleep(0.3)  # the listener tries to sleep while the writer is still open
            writer.commit()
            committed = time.monotonic()
            await wait_for(lambda: payment in payment_ids_in_events(db_url), timeout=10, interval=0.01)
            assert time.monotonic() - committed < 2.0, "seen without a NOTIFY, long before the 30 s probe"


async def test_a_repeatable_read_writer_whose_snapshot_predates_the_announcement_still_wakes_it(db_url: str) -> None:
    """The announcement is not subject to snapshots: a REPEATABLE READ transaction that began while the listener
    was awake, and writes after it went to sleep, sees that it sleeps and NOTIFYs."""
    with psycopg.connect(db_url, autocommit=True) as setup:
        b = new_business(setup)
        with psycopg.connect(db_url) as writer:
            writer.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            writer.execute("select 1")  # the snapshot: the listener is not even running
            async with running_listener(db_url, probe_interval=30.0):
                await wait_for(lambda: setup.execute(SLEEPING).fetchone() == (True,))
                payment = pay(writer, b)
                writer.commit()
                committed = time.monotonic()
                await wait_for(lambda: payment in payment_ids_in_events(db_url), timeout=10, interval=0.01)
                assert time.monotonic() - committed < 2.0, "woken by its NOTIFY, not by the 30 s probe"
