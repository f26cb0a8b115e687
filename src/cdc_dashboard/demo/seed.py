"""Demo data for `cdc-dashboard run`: a few Nairobi and Lagos businesses with ~90 days of history.

Deterministic for a given seed, so two demos (and tests) show the same figures. Loaded once: a database that
already has the demo businesses is left alone.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from ..db import connect_sync
from ..sqlfiles import queries

__all__ = ["DEMO_BUSINESSES", "DemoBusiness", "load_demo"]


@dataclass(frozen=True)
class DemoBusiness:
    name: str
    timezone: str
    currency: str
    phone_prefix: str
    mpesa_shortcode: str | None
    methods: tuple[str, ...]


DEMO_BUSINESSES = (
    DemoBusiness(
        "Wanjiru's Hair Studio",
        "Africa/Nairobi",
        "KES",
        "+2547",
        "174379",
        ("mpesa", "mpesa", "cash", "card"),
    ),
    DemoBusiness("Kilimani Family Clinic", "Africa/Nairobi", "KES", "+2547", "600100", ("mpesa", "card", "paystack")),
    DemoBusiness("Mombasa Road Tutors", "Africa/Nairobi", "KES", "+2541", "600200", ("mpesa", "cash")),
    DemoBusiness(
        "Lekki Glow Spa",
        "Africa/Lagos",
        "NGN",
        "+23480",
        None,
        ("paystack", "paystack", "card", "bank_transfer"),
    ),
    DemoBusiness("Yaba Physio & Wellness", "Africa/Lagos", "NGN", "+23470", None, ("paystack", "cash", "card")),
)

_FIRST = [
    "Achieng",
    "Wanjiku",
    "Kamau",
    "Otieno",
    "Njeri",
    "Mwangi",
    "Akinyi",
    "Kiprop",
    "Chebet",
    "Mutua",
    "Adaeze",
    "Chinedu",
    "Ngozi",
    "Tunde",
    "Funmi",
    "Emeka",
    "Bisi",
    "Ifeoma",
    "Segun",
    "Zainab",
]
_LAST = [
    "Odhiambo",
    "Kariuki",
    "Wambui",
    "Mutiso",
    "Okafor",
    "Adeyemi",
    "Balogun",
    "Eze",
    "Nwosu",
    "Kiplagat",
]
_PRICES = {"KES": [50000, 80000, 150000, 250000, 350000, 500000], "NGN": [500000, 1200000, 2500000, 4000000]}


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def load_demo(url: str, *, seed: int = 254, days: int = 90) -> list[tuple[uuid.UUID, str]]:
    """Insert the demo data if absent; return (id, name) of the demo businesses."""
    rng = random.Random(seed)
    q = queries("demo")
    business_ids = [(_uuid(rng), b) for b in DEMO_BUSINESSES]
    with connect_sync(url, autocommit=False) as conn:
        existing = conn.execute(q["existing"], ([str(i) for i, _ in business_ids],)).fetchone()
        if existing and existing[0]:
            conn.rollback()
            return [(i, b.name) for i, b in business_ids]
        _load(conn, rng, business_ids, days)
        conn.execute(q["rebuild"], ([i for i, _ in business_ids],))
        conn.commit()
    return [(i, b.name) for i, b in business_ids]


def _load(
    conn: psycopg.Connection[Any],
    rng: random.Random,
    businesses: list[tuple[uuid.UUID, DemoBusiness]],
    days: int,
) -> None:
    q = queries("demo")
    now = datetime.now(UTC).replace(microsecond=0)
    payments: list[tuple[Any, ...]] = []
    transactions: list[tuple[Any, ...]] = []
    ledger: list[tuple[Any, ...]] = []
    bookings: list[tuple[Any, ...]] = []
    clients: list[tuple[Any, ...]] = []
    for business_id, b in businesses:
        conn.execute(q["business"], (business_id, b.name, b.timezone, b.mpesa_shortcode))
        regulars = []
        for _ in range(rng.randint(25, 45)):
            client_id = _uuid(rng)
            name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
            phone = b.phone_prefix + "".join(str(rng.randint(0, 9)) for _ in range(13 - len(b.phone_prefix)))
            email = name.lower().replace(" ", ".") + f"{rng.randint(1, 99)}@example.com"
            clients.append((client_id, name, phone, email))
            regulars.append(client_id)
        for day in range(days, -1, -1):
            for _ in range(rng.randint(2, 9)):
                at = now - timedelta(days=day, seconds=rng.randint(0, 12 * 3600))
                if at > now:
                    continue
                client_id = rng.choice(regulars)
                amount = rng.choice(_PRICES[b.currency])
                method = rng.choice(b.methods)
                status = rng.choices(["completed", "failed", "pending", "refunded"], [90, 5, 3, 2])[0]
                booking_id = _uuid(rng)
                booking_status = "completed" if day > 0 else rng.choice(["confirmed", "pending"])
                payment_status = {"completed": "paid", "refunded": "refunded"}.get(status, "unpaid")
                bookings.append(
                    (
                        booking_id,
                        business_id,
                        client_id,
                        amount,
                        b.currency,
                        booking_status,
                        payment_status,
                        at,
                    )
                )
                payment_id = _uuid(rng)
                provider = {"mpesa": "mpesa", "paystack": "paystack"}.get(method)
                reference = f"DEMO{rng.getrandbits(40):010X}" if provider else None
                payments.append(
                    (
                        payment_id,
                        business_id,
                        client_id,
                        booking_id,
                        amount,
                        b.currency,
                        method,
                        status,
                        provider,
                        reference,
                        at if status != "pending" else None,
                        at,
                        amount if status == "refunded" else 0,  # refunded: refunded in full
                    )
                )
                transactions.append((business_id, payment_id, provider or method, amount, b.currency, status, at))
                if status in ("completed", "refunded"):
                    ledger.append((business_id, client_id, payment_id, "payment", amount, b.currency, at))
                if status == "refunded":
                    ledger.append((business_id, client_id, payment_id, "refund", amount, b.currency, at))
    with conn.cursor() as cur:
        cur.executemany(q["client"], clients)
        cur.executemany(q["booking"], bookings)
        cur.executemany(q["payment"], payments)
        cur.executemany(q["payment_transaction"], transactions)
        cur.executemany(q["ledger"], ledger)
