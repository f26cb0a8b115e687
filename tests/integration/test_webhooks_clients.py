"""Which client a payment is from (issue 14, part 4).

C2B v2 masks the MSISDN (`2547 ***** 126`) and v1 sends its SHA-256: thousands of people share a mask, and a
hash says nothing about which business's customer it is. Before, clients were matched by that string alone,
so Bob paying business B showed on B's dashboard as John, business A's customer. A full number (digits, an
optional leading +) is still one person everywhere; anything else matches only the same business's own client
with the same number and the same name."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from .webhook_server import WebhookServer, assert_consistent, fixture, serve_webhooks

MASKED = "2547 ***** 126"  # the v2 sample's MSISDN
HASHED = hashlib.sha256(b"254708374126").hexdigest()  # what C2B v1 sends instead


@pytest.fixture
def server(db_url: str) -> Iterator[WebhookServer]:
    with serve_webhooks(db_url) as running:
        yield running


def _c2b(trans_id: str, shortcode: str, msisdn: Any, first_name: str, last_name: str = "") -> dict[str, Any]:
    body = fixture("mpesa/c2b_confirmation_v2")
    body.update(TransID=trans_id, BusinessShortCode=shortcode, MSISDN=msisdn, FirstName=first_name)
    body.update(LastName=last_name)
    return body


def _pay(server: WebhookServer, body: dict[str, Any]) -> uuid.UUID:
    """Deliver a C2B confirmation; the client its payment got."""
    response = server.mpesa("c2b/confirmation", body)
    assert response.status_code == 200, response.text
    client: uuid.UUID = server.one("select client_id from payments where mpesa_receipt = %s", body["TransID"])
    return client


def _name(server: WebhookServer, client: uuid.UUID) -> str:
    name: str = server.one("select name from clients where id = %s", client)
    return name


@pytest.mark.parametrize("msisdn", [MASKED, HASHED], ids=["masked", "hashed"])
def test_masked_or_hashed_msisdn_never_matches_another_business_client(server: WebhookServer, msisdn: str) -> None:
    server.business(shortcode="600966")
    b = server.business(shortcode="600967")
    john = _pay(server, _c2b("RKL0000001", "600966", msisdn, "JOHN"))
    bob = _pay(server, _c2b("RKL0000002", "600967", msisdn, "BOB"))
    assert bob != john and _name(server, bob) == "BOB"
    # Even the same name is not the same person across businesses: only a full number is.
    other_john = _pay(server, _c2b("RKL0000003", "600967", msisdn, "JOHN"))
    assert other_john not in (john, bob) and _name(server, other_john) == "JOHN"
    # A's customer is not among B's clients.
    assert server.query("select distinct client_id from payments where business_id = %s order by 1", b) == sorted(
        [(bob,), (other_john,)]
    )
    assert_consistent(server)


@pytest.mark.parametrize("msisdn", [MASKED, HASHED], ids=["masked", "hashed"])
def test_same_masked_number_and_name_in_one_business_is_the_returning_client(
    server: WebhookServer, msisdn: str
) -> None:
    server.business(shortcode="600966")
    first = _pay(server, _c2b("RKL0000001", "600966", msisdn, "NICHOLAS", "KAMAU"))
    again = _pay(server, _c2b("RKL0000002", "600966", msisdn, "NICHOLAS", "KAMAU"))
    # Same mask, another name: another person.
    other = _pay(server, _c2b("RKL0000003", "600966", msisdn, "WANJIRU"))
    assert again == first and other != first
    assert server.one("select count(*) from clients") == 2


def test_masked_number_without_a_name_is_a_new_client_each_time(server: WebhookServer) -> None:
    """With no name the mask is the only evidence, and thousands share it: claiming two payments are from one
    person would be a guess, so each is its own client."""
    server.business(shortcode="600966")
    first = _pay(server, _c2b("RKL0000001", "600966", MASKED, ""))
    second = _pay(server, _c2b("RKL0000002", "600966", MASKED, ""))
    assert first != second


@pytest.mark.parametrize("msisdn", ["254708374149", "+254708374149"])
def test_full_number_is_the_same_client_in_every_business(server: WebhookServer, msisdn: str) -> None:
    server.business(shortcode="600966")
    server.business(shortcode="600967")
    in_a = _pay(server, _c2b("RKL0000001", "600966", msisdn, "JOHN"))
    in_b = _pay(server, _c2b("RKL0000002", "600967", msisdn, "J"))
    assert in_a == in_b
    assert server.one("select count(*) from clients") == 1


def test_full_number_by_stk_then_c2b_is_one_client(server: WebhookServer) -> None:
    business = server.business(shortcode="600966")
    server.pending_stk(business, "ws_CO_191220191020363925", 100)
    assert server.mpesa("stk", fixture("mpesa/stk_success")).status_code == 200  # PhoneNumber 254708374149
    by_c2b = _pay(server, _c2b("RKL0000001", "600966", "254708374149", "JOHN"))
    assert server.one("select count(distinct client_id) from payments") == 1
    assert server.one("select phone from clients where id = %s", by_c2b) == "254708374149"


def test_returning_masked_client_paying_twice_at_once_is_one_client(server: WebhookServer) -> None:
    server.business(shortcode="600966")
    bodies = [_c2b(f"RKLPAR{n:04d}", "600966", MASKED, "NICHOLAS") for n in range(5)]
    with ThreadPoolExecutor(5) as pool:
        codes = [r.status_code for r in pool.map(lambda body: server.mpesa("c2b/confirmation", body), bodies)]
    assert codes == [200] * 5
    assert server.one("select count(*) from payments") == 5
    assert server.one("select count(*) from clients") == 1
