"""The reference schema: DESIGN's minimal inserts work, every enumerated column and key is enforced."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


@pytest.fixture
def ids(conn: psycopg.Connection[Any]) -> dict[str, uuid.UUID]:
    """A business, a client and a booking made with DESIGN's minimal inserts."""
    b, c, k = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    conn.execute("insert into businesses (id, name) values (%s, %s)", (b, "Salon"))
    conn.execute("insert into clients (id, name, phone) values (%s, %s, %s)", (c, "Achieng", "+254712345678"))
    conn.execute(
        "insert into bookings (id, business_id, client_id, amount_due_minor, currency) values (%s, %s, %s, %s, %s)",
        (k, b, c, 150000, "KES"),
    )
    return {"business": b, "client": c, "booking": k}


def test_design_minimal_inserts_and_defaults(conn: psycopg.Connection[Any], ids: dict[str, uuid.UUID]) -> None:
    b, c, k = ids["business"], ids["client"], ids["booking"]
    assert conn.execute("select timezone from businesses where id = %s", (b,)).fetchone() == ("Africa/Nairobi",)
    assert conn.execute("select status, payment_status from bookings where id = %s", (k,)).fetchone() == (
        "pending",
        "unpaid",
    )
    p = uuid.uuid4()
    conn.execute(
        "insert into payments (id, business_id, client_id, booking_id, amount_minor, currency, method, status)"
        " values (%s, %s, %s, %s, 150000, 'KES', 'mpesa', 'completed')",
        (p, b, c, k),
    )
    conn.execute(
        "insert into payment_transactions (business_id, payment_id, provider, amount_minor, currency, status)"
        " values (%s, %s, 'mpesa', 150000, 'KES', 'completed')",
        (b, p),
    )
    conn.execute(
        "insert into client_business_transactions (business_id, client_id, payment_id, type, amount_minor, currency)"
        " values (%s, %s, %s, 'payment', 150000, 'KES')",
        (b, c, p),
    )
    conn.execute("update bookings set payment_status = 'paid' where id = %s", (k,))
    row = conn.execute("select created_at < updated_at from bookings where id = %s", (k,)).fetchone()
    assert row == (True,), "updated_at follows updates"


BAD_VALUES = [
    ("businesses", "timezone", "'Mars/Olympus'"),
    ("bookings", "status", "'maybe'"),
    ("bookings", "payment_status", "'sort_of'"),
    ("bookings", "currency", "'kes'"),
    ("bookings", "amount_due_minor", "-1"),
    ("payments", "method", "'barter'"),
    ("payments", "status", "'done'"),
    ("payments", "currency", "'KSH1'"),
    ("payments", "amount_minor", "-5"),
    ("payment_transactions", "status", "'ok'"),
    ("client_business_transactions", "type", "'gift'"),
]


@pytest.mark.parametrize(("table", "column", "value"), BAD_VALUES)
def test_enumerated_columns_are_checked(
    conn: psycopg.Connection[Any], ids: dict[str, uuid.UUID], table: str, column: str, value: str
) -> None:
    _seed_rows(conn, ids)
    with pytest.raises((psycopg.errors.CheckViolation, psycopg.errors.InvalidParameterValue)):
        conn.execute(f"update {table} set {column} = {value}")


def _seed_rows(conn: psycopg.Connection[Any], ids: dict[str, uuid.UUID]) -> None:
    b, c = ids["business"], ids["client"]
    p = conn.execute(
        "insert into payments (business_id, client_id, amount_minor, currency, method, status)"
        " values (%s, %s, 100, 'KES', 'cash', 'completed') returning id",
        (b, c),
    ).fetchone()
    assert p is not None
    conn.execute(
        "insert into payment_transactions (business_id, payment_id, provider, amount_minor, currency)"
        " values (%s, %s, 'cash', 100, 'KES')",
        (b, p[0]),
    )
    conn.execute(
        "insert into client_business_transactions (business_id, client_id, payment_id, type, amount_minor, currency)"
        " values (%s, %s, %s, 'payment', 100, 'KES')",
        (b, c, p[0]),
    )


def test_foreign_keys(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        conn.execute(
            "insert into payments (business_id, amount_minor, currency, method, status)"
            " values (%s, 1, 'KES', 'cash', 'completed')",
            (uuid.uuid4(),),
        )


def test_provider_reference_is_unique(conn: psycopg.Connection[Any], ids: dict[str, uuid.UUID]) -> None:
    insert = (
        "insert into payments (business_id, amount_minor, currency, method, status, provider, provider_reference)"
        " values (%s, 100, 'KES', 'mpesa', 'completed', 'mpesa', 'QKJ3ABC123')"
    )
    conn.execute(insert, (ids["business"],))
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(insert, (ids["business"],))


def test_payment_requires_business(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.NotNullViolation):
        conn.execute(
            "insert into payments (amount_minor, currency, method, status) values (1, 'KES', 'cash', 'completed')"
        )
