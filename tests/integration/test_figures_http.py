"""The figures endpoints through a real uvicorn: bodies, as_of_event_id, ETag/304, pagination, 400/401/403/404,
manual refresh, and (with the listener) figures that already include the event a dashboard just received."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import psycopg
import pytest
from multidict import CIMultiDict

from .gateway_support import append_events, free_port, open_stream, run_gateway, serve_subprocess, token_for

NAIROBI = ZoneInfo("Africa/Nairobi")
STATS_KEYS = [
    "business_id",
    "as_of_event_id",
    "revenue",
    "payments_count",
    "clients_total",
    "clients_new_today",
    "bookings",
]


def sync(db_url: str) -> None:
    """Consume the change log as the listener does, with its batch (without the listener running)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "select consumed, dead_letters from dashboard.consume_changes_v2(1000, 'live', 0)"
            ).fetchone()
            assert row is not None and row[1] == [], row
            if row[0] == 0:
                return


def pay(
    conn: psycopg.Connection[Any],
    business: str,
    client: str | None,
    amount: int,
    *,
    currency: str = "KES",
    status: str = "completed",
    at: datetime | None = None,
    method: str = "mpesa",
) -> str:
    pid = str(uuid.uuid4())
    conn.execute(
        "insert into payments (id, business_id, client_id, amount_minor, currency, method, status, paid_at)"
        " values (%s, %s, %s, %s, %s, %s, %s, %s)",
        (pid, business, client, amount, currency, method, status, at or datetime.now(UTC)),
    )
    return pid


@pytest.fixture
def shop(db_url: str) -> dict[str, str]:
    """A business with two clients, four payments (one a month ago, one failed, one in USD) and bookings."""
    b, other, c1, c2 = (str(uuid.uuid4()) for _ in range(4))
    now = datetime.now(NAIROBI)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("insert into businesses (id, name) values (%s, 'Salon'), (%s, 'Other')", (b, other))
        conn.execute("insert into clients (id, name) values (%s, 'Wanjiku'), (%s, 'Otieno')", (c1, c2))
        pay(conn, b, c1, 150000, at=now - timedelta(minutes=5))
        pay(conn, b, c2, 50000, at=now - timedelta(days=40), method="cash")
        pay(conn, b, c2, 99999, status="failed", at=now - timedelta(minutes=10))
        pay(conn, b, None, 2500, currency="USD", at=now - timedelta(minutes=1), method="card")
        pay(conn, other, c1, 777, at=now)
        for status, payment_status in [("confirmed", "paid"), ("pending", "unpaid"), ("confirmed", "unpaid")]:
            conn.execute(
                "insert into bookings (business_id, client_id, status, payment_status) values (%s, %s, %s, %s)",
                (b, c1, status, payment_status),
            )
        conn.execute(
            "insert into payment_transactions (business_id, provider, amount_minor, currency, status)"
            " values (%s, 'mpesa', 150000, 'KES', 'completed')",
            (b,),
        )
        conn.execute(
            "insert into client_business_transactions (business_id, client_id, type, amount_minor, currency)"
            " values (%s, %s, 'payment', 150000, 'KES')",
            (b, c1),
        )
    sync(db_url)
    return {"business": b, "other": other, "c1": c1, "c2": c2}


@pytest.fixture
async def api(db_url: str) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    # (no refresh cooldown: these tests refresh one business several times; test_gateway_limits tests it)
    async with run_gateway(db_url, refresh_cooldown_seconds=0) as gw, aiohttp.ClientSession() as session:
        yield gw.url, session


async def get(
    api: tuple[str, aiohttp.ClientSession], path: str, token: str | None, **headers: str
) -> tuple[int, CIMultiDict[str], Any]:
    base, session = api
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with session.get(base + path, headers=headers) as r:
        text = await r.text()
        return r.status, CIMultiDict(r.headers), json.loads(text) if text else None


def month_expected(now: datetime, amount_then: int, then: datetime) -> int:
    return amount_then if (then.year, then.month) == (now.year, now.month) else 0


async def test_stats_body_is_designs(shop: dict[str, str], api: tuple[str, aiohttp.ClientSession]) -> None:
    b = shop["business"]
    status, headers, body = await get(api, f"/v1/businesses/{b}/stats", token_for(b))
    assert status == 200
    assert list(body) == STATS_KEYS
    now = datetime.now(NAIROBI)
    month_ago = now - timedelta(days=40)
    assert body["business_id"] == b
    assert isinstance(body["as_of_event_id"], int)
    assert headers["X-As-Of-Event-Id"] == str(body["as_of_event_id"])
    today_kes = 150000 if (now - timedelta(minutes=5)).date() == now.date() else 0
    assert body["revenue"] == {
        "KES": {
            "total_minor": 200000,
            "today_minor": today_kes,
            "month_minor": (150000 if (now - timedelta(minutes=5)).month == now.month else 0)
            + month_expected(now, 50000, month_ago),
        },
        "USD": {
            "total_minor": 2500,
            "today_minor": 2500 if (now - timedelta(minutes=1)).date() == now.date() else 0,
            "month_minor": 2500 if (now - timedelta(minutes=1)).month == now.month else 0,
        },
    }
    assert body["payments_count"] == 3
    assert body["clients_total"] == 2
    assert body["clients_new_today"] == (1 if today_kes else 0)
    assert body["bookings"] == {
        "by_status": {"confirmed": 2, "pending": 1},
        "by_payment_status": {"paid": 1, "unpaid": 2},
    }


async def test_etag_304_until_the_figures_change(
    db_url: str, shop: dict[str, str], api: tuple[str, aiohttp.ClientSession]
) -> None:
    b = shop["business"]
    token = token_for(b)
    path = f"/v1/businesses/{b}/stats"
    status, headers, body = await get(api, path, token)
    etag = headers["ETag"]
    status, again, empty = await get(api, path, token, **{"If-None-Match": etag})
    assert (status, empty) == (304, None)
    assert again["ETag"] == etag
    # Another business's event moves the global id on; this business's figures, and so its tag, stay.
    append_events(db_url, (shop["other"], "invalidate"))
    status, again, _ = await get(api, path, token, **{"If-None-Match": etag})
    assert status == 304
    assert int(again["X-As-Of-Event-Id"]) > body["as_of_event_id"]
    with psycopg.connect(db_url, autocommit=True) as conn:
        pay(conn, b, shop["c1"], 1000)
    sync(db_url)
    (event_id,) = append_events(db_url, (b, "invalidate"))
    status, changed, new = await get(api, path, token, **{"If-None-Match": etag})
    assert status == 200
    assert changed["ETag"] != etag
    assert new["payments_count"] == body["payments_count"] + 1
    assert new["as_of_event_id"] == event_id


async def test_business_data(shop: dict[str, str], api: tuple[str, aiohttp.ClientSession]) -> None:
    b = shop["business"]
    status, headers, body = await get(api, f"/v1/businesses/{b}", token_for(b))
    assert status == 200
    assert headers["ETag"].startswith('W/"')
    assert body["business"]["name"] == "Salon"
    assert body["business"]["timezone"] == "Africa/Nairobi"
    assert body["figures"]["payments_count"] == 3
    assert isinstance(body["as_of_event_id"], int)


async def test_revenue_series(shop: dict[str, str], api: tuple[str, aiohttp.ClientSession]) -> None:
    b = shop["business"]
    token = token_for(b)
    status, _, day = await get(api, f"/v1/businesses/{b}/revenue?granularity=day", token)
    assert status == 200
    assert day["granularity"] == "day"
    assert len(day["series"]["KES"]) == 30
    assert day["series"]["KES"][-1]["bucket"] == datetime.now(NAIROBI).date().isoformat()
    assert sum(p["revenue_minor"] for p in day["series"]["KES"]) == 150000  # the payment 40 days ago is out
    status, _, month = await get(api, f"/v1/businesses/{b}/revenue?granularity=month", token)
    assert sum(p["revenue_minor"] for p in month["series"]["KES"]) == 200000
    assert sum(p["payments_count"] for p in month["series"]["USD"]) == 1
    status, _, hour = await get(api, f"/v1/businesses/{b}/revenue?granularity=hour", token)
    assert len(hour["series"]["KES"]) in (24, 25)
    assert sum(p["revenue_minor"] for p in hour["series"]["KES"]) == 150000
    today = datetime.now(NAIROBI).date()
    status, _, fixed = await get(
        api,
        f"/v1/businesses/{b}/revenue?granularity=day&from={today - timedelta(days=1)}&to={today + timedelta(days=1)}",
        token,
    )
    assert [p["bucket"] for p in fixed["series"]["KES"]] == [
        (today - timedelta(days=1)).isoformat(),
        today.isoformat(),
    ]


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("granularity=week", "granularity"),
        ("from=yesterday", "from"),
        ("to=2026-13-01", "to"),
        ("from=2026-02-01&to=2026-01-01", "earlier"),
        ("granularity=hour&from=2020-01-01&to=2026-01-01", "buckets"),
    ],
)
async def test_revenue_bad_parameters_are_400(
    shop: dict[str, str], api: tuple[str, aiohttp.ClientSession], query: str, reason: str
) -> None:
    b = shop["business"]
    status, _, body = await get(api, f"/v1/businesses/{b}/revenue?{query}", token_for(b))
    assert status == 400
    assert reason in body["error"]


async def test_transactions_newest_first_with_keyset_pages(
    shop: dict[str, str], api: tuple[str, aiohttp.ClientSession]
) -> None:
    b = shop["business"]
    token = token_for(b)
    status, _, whole = await get(api, f"/v1/businesses/{b}/transactions", token)
    assert status == 200
    items = whole["items"]
    assert len(items) == 4
    assert [i["at"] for i in items] == sorted((i["at"] for i in items), reverse=True)
    assert items[0]["method"] == "card" and items[0]["client_name"] is None
    assert {i["client_name"] for i in items} == {None, "Wanjiku", "Otieno"}
    assert whole["next_before"] is None
    seen: list[str] = []
    path = f"/v1/businesses/{b}/transactions?limit=3"
    while True:
        status, _, page = await get(api, path, token)
        assert status == 200 and len(page["items"]) <= 3
        seen += [i["id"] for i in page["items"]]
        if page["next_before"] is None:
            break
        path = f"/v1/businesses/{b}/transactions?limit=3&before={page['next_before']}"
    assert seen == [i["id"] for i in items]


@pytest.mark.parametrize(
    ("path", "count"),
    [("payments", 4), ("payment-transactions", 1), ("client-business-transactions", 1), ("bookings", 3)],
)
async def test_lists(shop: dict[str, str], api: tuple[str, aiohttp.ClientSession], path: str, count: int) -> None:
    b = shop["business"]
    status, headers, body = await get(api, f"/v1/businesses/{b}/{path}", token_for(b))
    assert status == 200
    assert len(body["items"]) == count
    assert isinstance(body["as_of_event_id"], int)
    status, _, _ = await get(api, f"/v1/businesses/{b}/{path}", token_for(b), **{"If-None-Match": headers["ETag"]})
    assert status == 304


@pytest.mark.parametrize("query", ["limit=0", "limit=201", "limit=ten", "before=not-a-cursor"])
async def test_list_bad_parameters_are_400(
    shop: dict[str, str], api: tuple[str, aiohttp.ClientSession], query: str
) -> None:
    b = shop["business"]
    status, _, body = await get(api, f"/v1/businesses/{b}/transactions?{query}", token_for(b))
    assert status == 400
    assert "limit" in body["error"] or "before" in body["error"]


@pytest.mark.parametrize(
    "suffix",
    [
        "/stats",
        "/revenue",
        "",
        "/transactions",
        "/payments",
        "/payment-transactions",
        "/client-business-transactions",
        "/bookings",
    ],
)
async def test_auth_and_unknown_ids(shop: dict[str, str], api: tuple[str, aiohttp.ClientSession], suffix: str) -> None:
    b, other = shop["business"], shop["other"]
    assert (await get(api, f"/v1/businesses/{b}{suffix}", None))[0] == 401
    assert (await get(api, f"/v1/businesses/{b}{suffix}", "forged.token.value"))[0] == 401
    assert (await get(api, f"/v1/businesses/{other}{suffix}", token_for(b)))[0] == 403
    assert (await get(api, f"/v1/businesses/not-a-uuid{suffix}", token_for(b)))[0] == 400
    unknown = str(uuid.uuid4())
    assert (await get(api, f"/v1/businesses/{unknown}{suffix}", token_for(unknown)))[0] == 404


async def test_refresh_repairs_reports_and_emits(
    db_url: str, shop: dict[str, str], api: tuple[str, aiohttp.ClientSession]
) -> None:
    b = shop["business"]
    base, session = api
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("update dashboard.business_client_totals set clients_total = 40 where business_id = %s", (b,))
    async with session.post(f"{base}/v1/businesses/{b}/refresh") as r:
        assert r.status == 401
    async with session.post(
        f"{base}/v1/businesses/{shop['other']}/refresh", headers={"Authorization": f"Bearer {token_for(b)}"}
    ) as r:
        assert r.status == 403
    async with session.post(
        f"{base}/v1/businesses/{b}/refresh", headers={"Authorization": f"Bearer {token_for(b)}"}
    ) as r:
        assert r.status == 200
        report = await r.json()
    assert report["repaired"] is True
    assert report["rows_repaired"] == {"business_client_totals": 1}
    assert report["differences"] == {"clients_total": {"before": 40, "after": 2}}
    assert report["as_of_event_id"] == report["event_id"]
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "select business_id, kind, payload from dashboard.events where id = %s", (report["event_id"],)
        ).fetchone()
    assert row is not None
    assert (row[0], row[1], row[2]["reason"]) == (b, "invalidate", "manual_refresh")
    assert ["dashboard-stats", b] in row[2]["query_keys"]
    _, _, body = await get(api, f"/v1/businesses/{b}/stats", token_for(b))
    assert body["clients_total"] == 2
    async with session.post(
        f"{base}/v1/businesses/{b}/refresh", headers={"Authorization": f"Bearer {token_for(b)}"}
    ) as r:
        again = await r.json()
    assert (again["repaired"], again["differences"]) == (False, {})


async def test_refresh_event_has_the_listener_events_shape(
    db_url: str, shop: dict[str, str], api: tuple[str, aiohttp.ClientSession]
) -> None:
    """A refresh's payload is put together by the same SQL as the listener's: the same keys in the same order, the
    same query keys, the same formats (compact JSON text), plus its `reason` last."""
    b = shop["business"]
    base, session = api
    with psycopg.connect(db_url, autocommit=True) as conn:
        # (the shop's payments and bookings, consumed by the listener's batch in `shop`)
        row = conn.execute(
            "select payload::text from dashboard.events where business_id = %s and kind = 'invalidate'"
            " order by id desc limit 1",
            (b,),
        ).fetchone()
    assert row is not None
    listener_text: str = row[0]
    listener = json.loads(listener_text)  # (dicts keep the text's key order)
    # The listener's text is compact JSON in its own key order: what json.dumps of the ordered pairs gives.
    assert json.dumps(listener, separators=(",", ":")) == listener_text
    async with session.post(
        f"{base}/v1/businesses/{b}/refresh", headers={"Authorization": f"Bearer {token_for(b)}"}
    ) as r:
        assert r.status == 200
        event_id = (await r.json())["event_id"]
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("select payload::text from dashboard.events where id = %s", (event_id,)).fetchone()
    assert row is not None
    refresh = json.loads(row[0])
    expected = listener | {
        "changes": [],
        "change_count": 0,
        "payments": [],
        "committed_at": refresh["committed_at"],
        "reason": "manual_refresh",
    }
    assert row[0] == json.dumps(expected, separators=(",", ":"))
    assert len(refresh["committed_at"]) == len(listener["committed_at"])  # (the same timestamp format)
    datetime.fromisoformat(refresh["committed_at"])


async def test_figures_fetched_on_each_event_include_its_payment(db_url: str) -> None:
    """Guarantee 2, end to end: the listener's event arrives, the stats fetched then include its payment."""
    b, client = str(uuid.uuid4()), str(uuid.uuid4())
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("insert into businesses (id, name) values (%s, 'Salon')", (b,))
        conn.execute("insert into clients (id, name) values (%s, 'Wanjiku')", (client,))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    token = token_for(b)
    with serve_subprocess(db_url, port, "--with-listener"):
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"{base}/v1/businesses/{b}/stats", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                first = await r.json()
            async with open_stream(base, b, token, last_event_id=first["as_of_event_id"]) as stream:
                for n in range(1, 6):
                    with psycopg.connect(db_url, autocommit=True) as conn:
                        pid = pay(conn, b, client if n % 2 else None, 1000 * n)
                    event = await stream.next_event(timeout=10)
                    assert event is not None and event.event == "invalidate"
                    assert pid in event.data
                    async with session.get(
                        f"{base}/v1/businesses/{b}/stats", headers={"Authorization": f"Bearer {token}"}
                    ) as r:
                        stats = await r.json()
                    assert stats["as_of_event_id"] >= int(event.id or 0)
                    assert stats["payments_count"] == n
                    assert stats["revenue"]["KES"]["total_minor"] == sum(1000 * k for k in range(1, n + 1))


async def test_figures_equal_the_ledger_through_the_listener(db_url: str) -> None:
    """Guarantee 5 through the real listener: concurrent writers (commits out of order), mixed writes, manual
    refreshes racing the listener; once it has caught up, every business's `stats` equals DESIGN's definitions
    computed over the base tables."""
    from ..oracle import expected_figures

    businesses = [str(uuid.uuid4()) for _ in range(3)]
    clients = [str(uuid.uuid4()) for _ in range(3)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        for b in businesses:
            conn.execute("insert into businesses (id, name) values (%s, 'Salon')", (b,))
        for c in clients:
            conn.execute("insert into clients (id, name) values (%s, 'Client')", (c,))
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        midnight = datetime.now(NAIROBI).replace(hour=0, minute=0, second=0, microsecond=0)
        with psycopg.connect(db_url) as conn:
            mine: list[str] = []
            for _ in range(40):
                with conn.transaction():
                    roll = rng.random()
                    if roll < 0.5 or not mine:
                        at = midnight + timedelta(minutes=rng.randint(-30, 30))
                        mine.append(
                            pay(
                                conn,
                                rng.choice(businesses),
                                rng.choice([None, *clients]),
                                rng.randint(1, 9999),
                                currency=rng.choice(["KES", "USD"]),
                                status=rng.choice(["completed", "pending"]),
                                at=at,
                            )
                        )
                    elif roll < 0.7:
                        conn.execute(
                            "update payments set status = %s where id = %s",
                            (rng.choice(["completed", "refunded", "failed"]), rng.choice(mine)),
                        )
                    elif roll < 0.8:
                        conn.execute(
                            "update payments set amount_minor = %s where id = %s",
                            (rng.randint(0, 9999), rng.choice(mine)),
                        )
                    elif roll < 0.9:
                        conn.execute(
                            "insert into bookings (business_id, status, payment_status) values (%s, %s, %s)",
                            (
                                rng.choice(businesses),
                                rng.choice(["pending", "confirmed"]),
                                rng.choice(["unpaid", "paid"]),
                            ),
                        )
                    else:
                        victim = mine.pop(rng.randrange(len(mine)))
                        conn.execute("delete from payments where id = %s", (victim,))
                    time.sleep(rng.random() / 200)  # transactions overlap and commit out of order

    async def refresher(session: aiohttp.ClientSession, done: asyncio.Event) -> int:
        """Manual refreshes racing the listener: both move the same rollups (the advisory lock keeps them apart)."""
        count = 0
        while not done.is_set():
            b = businesses[count % len(businesses)]
            async with session.post(
                f"{base}/v1/businesses/{b}/refresh", headers={"Authorization": f"Bearer {token_for(b)}"}
            ) as r:
                assert r.status == 200, await r.text()
            count += 1
        return count

    with serve_subprocess(db_url, port, "--with-listener", CDC_REFRESH_COOLDOWN_SECONDS="0"):
        async with aiohttp.ClientSession() as session:
            done = asyncio.Event()
            racing = asyncio.create_task(refresher(session, done))
            await asyncio.gather(*(asyncio.to_thread(writer, seed) for seed in range(4)))
            done.set()
            assert await racing > 0
        deadline = time.monotonic() + 30
        with psycopg.connect(db_url, autocommit=True) as conn:
            while conn.execute("select count(*) from cdc.change_log").fetchone() != (0,):
                assert time.monotonic() < deadline, "the listener did not catch up"
                await asyncio.sleep(0.1)
        oracle = await asyncpg.connect(db_url)
        try:
            async with aiohttp.ClientSession() as session:
                for b in businesses:
                    async with session.get(
                        f"{base}/v1/businesses/{b}/stats", headers={"Authorization": f"Bearer {token_for(b)}"}
                    ) as r:
                        stats = await r.json()
                    expected = await expected_figures(oracle, uuid.UUID(b))
                    assert {k: stats[k] for k in expected} == expected, b
        finally:
            await oracle.close()
