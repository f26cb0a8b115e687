"""Migration 0011 splits clients wrongly merged across businesses by a masked or hashed MSISDN (issue 14, part 4).

The database is built at version 0010 by `db apply` itself (with the capture installed, as in production),
filled with what the old matching produced, and then brought up to date by `db apply`, which runs 0011."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from cdc_dashboard import migrations
from cdc_dashboard.migrations import apply

MIGRATION = "0011_split_masked_clients.sql"
MASKED = "2547 ***** 126"
HASHED = hashlib.sha256(b"254708374126").hexdigest()
T0 = datetime(2025, 1, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def at_0010(empty_db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A database whose schema is at 0010: every migration before 0011 applied, 0011 not yet."""
    before = [p for p in migrations.schema_files() if p.name < MIGRATION]
    assert before[-1].name.startswith("0010_"), [p.name for p in before]
    with monkeypatch.context() as patched:
        patched.setattr(migrations, "schema_files", lambda: before)
        apply(empty_db_url, baseline=False)
    yield empty_db_url


class _Data:
    """Writes rows as the old ingestion left them, with chosen times."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def business(self, name: str) -> uuid.UUID:
        business_id = uuid.uuid4()
        self.conn.execute("insert into businesses (id, name) values (%s, %s)", (business_id, name))
        return business_id

    def client(self, name: str, phone: str | None, email: str | None = None) -> uuid.UUID:
        client_id = uuid.uuid4()
        self.conn.execute(
            "insert into clients (id, name, phone, email, created_at) values (%s, %s, %s, %s, %s)",
            (client_id, name, phone, email, T0),
        )
        return client_id

    def payment(self, business: uuid.UUID, client: uuid.UUID | None, minutes: int) -> uuid.UUID:
        """A completed payment with its ledger row, `minutes` after T0."""
        payment_id = uuid.uuid4()
        at = T0 + timedelta(minutes=minutes)
        self.conn.execute(
            "insert into payments (id, business_id, client_id, amount_minor, currency, method, status, paid_at,"
            " created_at) values (%s, %s, %s, 500, 'KES', 'mpesa', 'completed', %s, %s)",
            (payment_id, business, client, at, at),
        )
        self.conn.execute(
            "insert into client_business_transactions (business_id, client_id, payment_id, type, amount_minor,"
            " currency, created_at) values (%s, %s, %s, 'payment', 500, 'KES', %s)",
            (business, client, payment_id, at),
        )
        return payment_id

    def booking(self, business: uuid.UUID, client: uuid.UUID, minutes: int) -> uuid.UUID:
        booking_id = uuid.uuid4()
        self.conn.execute(
            "insert into bookings (id, business_id, client_id, amount_due_minor, currency, created_at)"
            " values (%s, %s, %s, 500, 'KES', %s)",
            (booking_id, business, client, T0 + timedelta(minutes=minutes)),
        )
        return booking_id


def _clients_by_business(conn: psycopg.Connection[Any]) -> dict[tuple[str, uuid.UUID], set[uuid.UUID]]:
    """(table, business) -> the client ids its rows point at."""
    found: dict[tuple[str, uuid.UUID], set[uuid.UUID]] = {}
    for table in ("payments", "client_business_transactions", "bookings"):
        for business, client in conn.execute(f"select business_id, client_id from {table} where client_id is not null"):
            found.setdefault((table, business), set()).add(client)
    return found


def test_masked_clients_merged_across_businesses_are_split(at_0010: str) -> None:
    with psycopg.connect(at_0010, autocommit=True) as conn:
        data = _Data(conn)
        a, b, c = data.business("A"), data.business("B"), data.business("C")
        # John paid A first; Bob (B) and someone at C got John's client through the shared mask.
        john = data.client("JOHN", MASKED)
        data.payment(a, john, 0)
        b_payments = [data.payment(b, john, 10), data.payment(b, john, 20)]
        b_booking = data.booking(b, john, 15)
        c_booking = data.booking(c, john, 30)  # C knows him from a booking only: still another business
        # A v1 hashed MSISDN, first seen at B: B keeps it, A gets the copy.
        hashed = data.client("ALICE", HASHED)
        data.payment(b, hashed, 5)
        a_hashed_payment = data.payment(a, hashed, 40)
        # Left alone: a full number (one person everywhere), a client with an email (a real identity; Paystack
        # matches it across businesses by design), a masked client of one business, a payment with no client.
        full = data.client("FULL", "254708374149")
        data.payment(a, full, 1)
        data.payment(b, full, 2)
        with_email = data.client("EMAIL", "0712 345 678", "someone@example.com")
        data.payment(a, with_email, 3)
        data.payment(b, with_email, 4)
        single = data.client("SINGLE", "2547 ***** 999")
        data.payment(a, single, 6)
        data.payment(a, single, 7)
        data.payment(b, None, 8)
        before = _clients_by_business(conn)
        clients_before = conn.execute("select count(*) from clients").fetchone()

    assert f"applied {MIGRATION}" in apply(at_0010)

    with psycopg.connect(at_0010, autocommit=True) as conn:
        after = _clients_by_business(conn)
        # The hashed client stays with B, where it was first; A's payment of it moved to a copy.
        [(alice_in_a,)] = conn.execute("select client_id from payments where id = %s", (a_hashed_payment,)).fetchall()
        assert alice_in_a != hashed and hashed in after[("payments", b)]
        assert conn.execute("select name, phone from clients where id = %s", (alice_in_a,)).fetchone() == (
            "ALICE",
            HASHED,
        )
        # John stays A's; B's payments, ledger rows and booking all point at one new client; C's booking at another.
        assert after[("payments", a)] == {john, full, with_email, single, alice_in_a}
        [bob] = after[("payments", b)] - {full, with_email, hashed}
        assert after[("client_business_transactions", b)] == after[("payments", b)]
        assert conn.execute("select client_id from bookings where id = %s", (b_booking,)).fetchone() == (bob,)
        [(c_client,)] = conn.execute("select client_id from bookings where id = %s", (c_booking,)).fetchall()
        assert len({john, bob, c_client}) == 3
        assert {
            p for (p,) in conn.execute("select distinct client_id from payments where id = any(%s)", (b_payments,))
        } == {bob}
        # The copy: the same name and phone (all we know), created when it first appeared in that business.
        assert conn.execute("select name, phone, email, created_at from clients where id = %s", (bob,)).fetchone() == (
            "JOHN",
            MASKED,
            None,
            T0 + timedelta(minutes=10),
        )
        # Nothing else moved: the untouched clients' rows are where they were.
        for key, clients in before.items():
            assert (after[key] - clients) <= {bob, c_client, alice_in_a}, key
        assert conn.execute("select count(*) from clients").fetchone() == (clients_before[0] + 3,)  # type: ignore[index]
        # No masked, email-less client is in two businesses any more.
        assert conn.execute(
            """
            select count(*) from (
                select client_id from (
                    select client_id, business_id from payments
                    union select client_id, business_id from client_business_transactions
                    union select client_id, business_id from bookings
                ) u join clients c on c.id = u.client_id
                where c.email is null and c.phone !~ '^\\+?[0-9]{7,15}$'
                group by client_id having count(distinct business_id) > 1
            ) merged
            """
        ).fetchone() == (0,)
        # The split rows went through the capture like any other update, so the listener updates the figures.
        captured = conn.execute(
            "select count(*) from cdc.change_log where table_name = 'public.payments' and op = 'UPDATE'"
        ).fetchone()
        assert captured is not None and captured[0] >= 3

    assert apply(at_0010) == []  # applied once; the migration is history


def test_split_on_an_empty_database_is_a_no_op(at_0010: str) -> None:
    assert f"applied {MIGRATION}" in apply(at_0010)
    with psycopg.connect(at_0010, autocommit=True) as conn:
        assert conn.execute("select count(*) from clients").fetchone() == (0,)
        # The mapping table was temporary and is gone.
        assert conn.execute("select to_regclass('pg_temp.split_masked_clients')").fetchone() == (None,)
