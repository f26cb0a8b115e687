"""Paystack `refund.processed` end to end (issue 14, part 2): each refund nets its amount out of the payment
once, keeps its own body, and turns the payment `refunded` only when refunded in full.

Before: the first refund of any amount marked the whole payment `refunded` (a 100.00 charge refunded 1.00
left revenue 100.00 short), and a second, different refund of the same payment was answered `duplicate` with
its body dropped."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from .webhook_server import WebhookServer, assert_consistent, charge, refund, serve_webhooks, table_counts

REFERENCE = "T2154954_412829_3be32076_6lcg3"  # the transaction the refund sample points back to


@pytest.fixture
def server(db_url: str) -> Iterator[WebhookServer]:
    with serve_webhooks(db_url) as running:
        yield running


def _paid(server: WebhookServer, amount: int = 10000) -> tuple[Any, Any]:
    """A business, and its completed Paystack charge REFERENCE of `amount` for a booking of that amount."""
    business = server.business()
    booking = server.booking(business, amount)
    body = charge(business, reference=REFERENCE, amount=amount)
    body["data"]["metadata"]["booking_id"] = str(booking)
    assert server.paystack(body).json()["outcome"] == "recorded"
    return business, booking


def _payment(server: WebhookServer) -> tuple[Any, ...]:
    result: tuple[Any, ...] = server.one("select status, amount_minor, refunded_minor from payments")
    return result


def _refund_rows(server: WebhookServer) -> list[tuple[Any, ...]]:
    """The refunds' provider rows in the order they were written: amount applied, key, body, business, linked."""
    return server.query(
        "select amount_minor, provider_reference, raw, business_id, payment_id is not null from payment_transactions"
        " where status = 'refunded' order by created_at, amount_minor"
    )


def test_two_partial_refunds_each_net_out_once(server: WebhookServer) -> None:
    business, booking = _paid(server)
    first = refund(REFERENCE, "RF-1", "100")  # Paystack sends the amount as a string
    second = refund(REFERENCE, "RF-2", 2500)
    assert [server.paystack(body).json()["outcome"] for body in (first, second)] == ["refunded", "refunded"]
    # Still completed, for what is left: revenue counts 10000 - 2600.
    assert _payment(server) == ("completed", 10000, 2600)
    assert _refund_rows(server) == [
        (100, "refund:RF-1", first, business, True),
        (2500, "refund:RF-2", second, business, True),
    ]
    client = server.one("select client_id from payments")
    assert server.query(
        "select business_id, client_id, type, amount_minor, currency from client_business_transactions"
        " where type = 'refund' order by amount_minor"
    ) == [(business, client, "refund", 100, "KES"), (business, client, "refund", 2500, "KES")]
    assert server.one("select payment_status from bookings where id = %s", booking) == "partially_paid"
    assert_consistent(server)


def test_redelivered_refund_is_a_duplicate_that_writes_nothing(server: WebhookServer) -> None:
    _paid(server)
    body = json.dumps(refund(REFERENCE, "RF-1", 3000)).encode()
    assert server.paystack(body).json()["outcome"] == "refunded"
    before = table_counts(server)
    # Paystack retries: once more later, and a burst at once.
    assert server.paystack(body).json()["outcome"] == "duplicate"
    with ThreadPoolExecutor(5) as pool:
        outcomes = [r.json()["outcome"] for r in pool.map(lambda _: server.paystack(body), range(5))]
    assert outcomes == ["duplicate"] * 5
    assert table_counts(server) == before
    assert _payment(server) == ("completed", 10000, 3000)
    assert_consistent(server)


def test_refunds_adding_up_to_the_amount_make_the_payment_refunded(server: WebhookServer) -> None:
    _, booking = _paid(server)
    assert server.paystack(refund(REFERENCE, "RF-1", 4000)).json()["outcome"] == "refunded"
    assert _payment(server) == ("completed", 10000, 4000)
    assert server.paystack(refund(REFERENCE, "RF-2", 6000)).json()["outcome"] == "refunded"
    assert _payment(server) == ("refunded", 10000, 10000)
    assert server.one("select payment_status from bookings where id = %s", booking) == "refunded"
    assert_consistent(server)


def test_over_refund_refunds_only_what_is_left_and_says_so(
    server: WebhookServer, caplog: pytest.LogCaptureFixture
) -> None:
    business, _ = _paid(server)
    assert server.paystack(refund(REFERENCE, "RF-1", 6000)).status_code == 200
    caplog.set_level("INFO", logger="cdc_dashboard")
    caplog.clear()
    over = refund(REFERENCE, "RF-2", 6000)
    response = server.paystack(over)
    # 200: Paystack would retry anything else for 72 hours, and the refund did happen at Paystack.
    assert response.status_code == 200 and response.json()["outcome"] == "refunded"
    assert _payment(server) == ("refunded", 10000, 10000)
    # Its body is kept, with the amount that was applied.
    assert _refund_rows(server)[-1] == (4000, "refund:RF-2", over, business, True)
    assert server.query(
        "select amount_minor from client_business_transactions where type = 'refund' order by amount_minor"
    ) == [(4000,), (6000,)]
    logged = [r for r in caplog.records if "more than what is left" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert (getattr(logged[0], "refund_reference", None), logged[0].levelno) == ("RF-2", logging.WARNING)
    assert (getattr(logged[0], "amount_minor", None), getattr(logged[0], "applied_minor", None)) == (6000, 4000)

    # Nothing is left: a further refund is kept (applied 0) and changes no figure.
    late = refund(REFERENCE, "RF-3", 500)
    assert server.paystack(late).json()["outcome"] == "refunded"
    assert _payment(server) == ("refunded", 10000, 10000)
    assert _refund_rows(server)[-1] == (0, "refund:RF-3", late, business, True)
    assert server.one("select count(*) from client_business_transactions where type = 'refund'") == 2
    assert_consistent(server)


def test_different_refunds_at_once_all_apply_up_to_the_amount(server: WebhookServer) -> None:
    _paid(server)
    bodies = [json.dumps(refund(REFERENCE, f"RF-P{n}", 1000)).encode() for n in range(12)]
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(server.paystack, bodies))
    assert [r.status_code for r in responses] == [200] * 12
    assert _payment(server) == ("refunded", 10000, 10000)
    # Twelve bodies kept; ten applied 1000 each, two arrived when nothing was left.
    amounts = sorted(row[0] for row in _refund_rows(server))
    assert amounts == [0, 0] + [1000] * 10
    assert server.one("select count(*) from client_business_transactions where type = 'refund'") == 10
    assert_consistent(server)


def test_refund_without_refund_reference_is_400(server: WebhookServer) -> None:
    """Without its own reference a second refund cannot be told from a redelivery of the first; guessing either
    way gets the money wrong, so it is refused like any body missing what we record."""
    _paid(server)
    before = table_counts(server)
    for missing in (None, ""):
        body = refund(REFERENCE, "x", 100)
        body["data"]["refund_reference"] = missing
        response = server.paystack(body)
        assert response.status_code == 400, response.text
        assert "data.refund_reference" in response.json()["error"]
    assert table_counts(server) == before


def test_refund_in_another_currency_is_kept_unattributed(
    server: WebhookServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The payment is KES; a refund in NGN cannot be netted out of it (Paystack refunds in the charge's
    currency, so this is a misrouted or forged event): kept for audit, logged, in no figure."""
    caplog.set_level("INFO", logger="cdc_dashboard")
    _paid(server)
    body = refund(REFERENCE, "132013318360", "5000", currency="NGN")
    assert server.paystack(body).json()["outcome"] == "unattributed"
    assert _payment(server) == ("completed", 10000, 0)
    assert _refund_rows(server) == [(5000, "refund:132013318360", body, None, False)]
    assert server.one("select count(*) from client_business_transactions where type = 'refund'") == 0
    assert any("currency" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert server.paystack(body).json()["outcome"] == "duplicate"
    assert_consistent(server)


def test_refund_of_a_pending_charge_is_kept_unattributed(server: WebhookServer) -> None:
    business = server.business()
    server.query(
        "insert into payments (business_id, amount_minor, currency, method, status, provider, provider_reference)"
        " values (%s, 10000, 'KES', 'paystack', 'pending', 'paystack', %s)",
        business,
        REFERENCE,
    )
    assert server.paystack(refund(REFERENCE, "RF-1", 100)).json()["outcome"] == "unattributed"
    assert server.one("select status, refunded_minor from payments") == ("pending", 0)
    assert server.query("select business_id, payment_id from payment_transactions") == [(None, None)]
