"""Which business a Paystack charge pays (issue 14, part 3).

The subaccount is set by the business's Paystack integration; `data.metadata` is set by whoever starts the
checkout, and with Paystack Inline that is the payer's browser. Before: `metadata.business_id` won over the
subaccount, so a payer could move a payment (revenue, client, toast) to another business's dashboard."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest

from .webhook_server import WebhookServer, assert_consistent, charge, serve_webhooks

A_SUBACCOUNT = "ACCT_business_a"
B_SUBACCOUNT = "ACCT_business_b"


@pytest.fixture
def server(db_url: str) -> Iterator[WebhookServer]:
    with serve_webhooks(db_url) as running:
        yield running


def _businesses(server: WebhookServer) -> tuple[uuid.UUID, uuid.UUID]:
    return server.business(subaccount=A_SUBACCOUNT), server.business(subaccount=B_SUBACCOUNT)


def _unattributed_only(server: WebhookServer, reference: str) -> None:
    assert server.one("select count(*) from payments") == 0
    assert server.one("select count(*) from client_business_transactions") == 0
    assert server.one("select count(*) from clients") == 0
    assert server.query("select business_id, payment_id, raw->'data'->>'reference' from payment_transactions") == [
        (None, None, reference)
    ]


def test_metadata_naming_another_business_than_the_subaccount_is_unattributed(
    server: WebhookServer, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = _businesses(server)
    booking_of_a = server.booking(a, 10000)
    body = charge(a, reference="T-MOVED", subaccount={"subaccount_code": B_SUBACCOUNT})
    body["data"]["metadata"]["booking_id"] = str(booking_of_a)
    caplog.set_level("INFO", logger="cdc_dashboard")
    response = server.paystack(body)
    # 200: Paystack would retry anything else; kept for whoever sorts it out, in neither business's figures.
    assert response.status_code == 200 and response.json()["outcome"] == "unattributed"
    _unattributed_only(server, "T-MOVED")
    assert server.one("select payment_status from bookings") == "unpaid"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "disagree" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert getattr(warned[0], "metadata_business_id", None) == str(a)
    assert getattr(warned[0], "subaccount_business_id", None) == str(b)
    # A redelivery is kept again (no payment to find), still in no figure.
    assert server.paystack(body).json()["outcome"] == "unattributed"
    assert server.one("select count(*) from payments") == 0


def test_metadata_and_subaccount_naming_the_same_business_agree(server: WebhookServer) -> None:
    _, b = _businesses(server)
    booking = server.booking(b, 10000)
    body = charge(b, reference="T-AGREE", subaccount={"subaccount_code": B_SUBACCOUNT})
    body["data"]["metadata"]["booking_id"] = str(booking)
    assert server.paystack(body).json()["outcome"] == "recorded"
    assert server.query("select business_id, booking_id from payments") == [(b, booking)]
    assert server.one("select payment_status from bookings") == "paid"
    assert_consistent(server)


def test_subaccount_wins_when_metadata_names_no_business(server: WebhookServer) -> None:
    _, b = _businesses(server)
    body = charge(reference="T-SUB", subaccount={"subaccount_code": B_SUBACCOUNT})
    body["data"]["metadata"]["business_id"] = "not a uuid"  # free-form metadata: not a business
    assert server.paystack(body).json()["outcome"] == "recorded"
    assert server.one("select business_id from payments") == b


def test_metadata_names_the_business_when_there_is_no_subaccount(server: WebhookServer) -> None:
    a, _ = _businesses(server)
    for subaccount in ({}, None, {"subaccount_code": None}, {"subaccount_code": ""}):
        reference = f"T-NOSUB-{subaccount!r}"
        assert server.paystack(charge(a, reference=reference, subaccount=subaccount)).json()["outcome"] == "recorded"
    assert server.query("select distinct business_id from payments") == [(a,)]
    assert server.one("select count(*) from payments") == 4


def test_unknown_subaccount_does_not_let_metadata_decide(server: WebhookServer) -> None:
    """The event names a subaccount, so metadata may only agree with it; a subaccount no business has agrees
    with nothing."""
    a, _ = _businesses(server)
    response = server.paystack(charge(a, reference="T-UNKNOWN-SUB", subaccount={"subaccount_code": "ACCT_nobody"}))
    assert response.json()["outcome"] == "unattributed"
    _unattributed_only(server, "T-UNKNOWN-SUB")


def test_metadata_naming_a_missing_business_with_a_subaccount_is_unattributed(server: WebhookServer) -> None:
    _businesses(server)
    response = server.paystack(charge(uuid.uuid4(), reference="T-GHOST", subaccount={"subaccount_code": B_SUBACCOUNT}))
    assert response.json()["outcome"] == "unattributed"
    _unattributed_only(server, "T-GHOST")


def test_pending_payment_of_the_app_keeps_its_business(server: WebhookServer) -> None:
    """The app created the payment before the checkout: its own record of whose it is beats anything in the
    event (as before)."""
    a, _ = _businesses(server)
    server.query(
        "insert into payments (business_id, amount_minor, currency, method, status, provider, provider_reference)"
        " values (%s, 10000, 'KES', 'paystack', 'pending', 'paystack', 'T-PENDING')",
        a,
    )
    body = charge(uuid.uuid4(), reference="T-PENDING", subaccount={"subaccount_code": B_SUBACCOUNT})
    assert server.paystack(body).json()["outcome"] == "recorded"
    assert server.query("select business_id, status from payments") == [(a, "completed")]
