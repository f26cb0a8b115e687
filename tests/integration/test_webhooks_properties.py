"""Property-based: random and mutated provider bodies through real HTTP never cause a 500 and never leave a
half-written record. Signed correctly (Paystack) and with the right token (M-Pesa), so the bodies get past
authentication into parsing and recording, where the interesting failures would be."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .webhook_server import (
    WebhookServer,
    assert_consistent,
    charge,
    fixture,
    refund,
    serve_webhooks,
    table_counts,
)

PROPERTY_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,  # no .hypothesis/ example store in the working tree; failures print their reproduction
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.decimals(allow_nan=False, allow_infinity=False, places=3, min_value=-(10**9), max_value=10**12),
    st.text(max_size=30),
    st.sampled_from(["", "0", "1.00", "5000", "-1", "1e3", "20191219102115", "NaN", "KES", "\u0000", "\ud800"]),
    # Numbers whose conversion is the danger, not their parsing (they once hung the server).
    st.sampled_from([Decimal("1E+999999999"), Decimal("-1E-999999999"), Decimal("1E+400"), 10**4000]),
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
)


@pytest.fixture
def server(db_url: str) -> Iterator[WebhookServer]:
    with serve_webhooks(db_url) as running:
        yield running


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found: list[tuple[Any, ...]] = [prefix] if prefix else []
    if isinstance(doc, dict):
        for key, value in doc.items():
            found.extend(_paths(value, (*prefix, key)))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            found.extend(_paths(value, (*prefix, index)))
    return found


def _mutate(data: st.DataObject, doc: Any) -> Any:
    """Up to three edits: a value replaced by a random one, or stringified, or removed."""
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        paths = _paths(doc)
        if not paths:
            return doc
        path = data.draw(st.sampled_from(paths), label="path")
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        action = data.draw(st.sampled_from(["replace", "stringify", "delete"]), label="action")
        last = path[-1]
        if action == "replace":
            parent[last] = data.draw(json_values, label="value")
        elif action == "stringify":
            parent[last] = str(parent[last])
        elif isinstance(parent, dict):
            del parent[last]
        else:
            parent.pop(last)
    return doc


def _dumps(doc: Any) -> bytes:
    """JSON with each Decimal written as its exact number token (1E+999999999 stays that, not inf).
    ensure_ascii keeps \u0000 and lone surrogates as escapes, as a provider's serialiser would send them."""
    tokens: dict[str, str] = {}

    def placeholder(value: Any) -> str:
        key = f"@@number{len(tokens)}@@"
        tokens[f'"{key}"'] = str(value)
        return key

    text = json.dumps(doc, default=placeholder)
    for key, token in tokens.items():
        text = text.replace(key, token)
    return text.encode()


def _setup(server: WebhookServer) -> uuid.UUID:
    business = server.business(shortcode="600966", subaccount="ACCT_prop")
    booking = server.booking(business, 100)
    server.pending_stk(business, "ws_CO_191220191020363925", 100, booking)
    server.pending_stk(business, "ws_CO_21072024125243250722943992", 100)
    return business


def _check(server: WebhookServer, before: dict[str, int], status: int) -> None:
    assert status in (200, 400), status
    if status != 200:
        assert table_counts(server) == before
    assert_consistent(server)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_mutated_paystack_bodies(server: WebhookServer, data: st.DataObject) -> None:
    if not server.query("select 1 from businesses"):
        _setup(server)
    business = server.one("select id from businesses")
    name = data.draw(st.sampled_from(["paystack/charge_success_kes", "paystack/refund_processed"]), label="base")
    doc = fixture(name)
    if name.endswith("kes"):
        doc["data"]["metadata"]["business_id"] = str(business)
    else:
        doc["data"]["transaction_reference"] = "T173424527684156"
    doc = _mutate(data, doc)
    before = table_counts(server)
    _check(server, before, server.paystack(_dumps(doc)).status_code)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_mutated_mpesa_bodies(server: WebhookServer, data: st.DataObject) -> None:
    if not server.query("select 1 from businesses"):
        _setup(server)
    name, kind = data.draw(
        st.sampled_from(
            [
                ("mpesa/stk_success", "stk"),
                ("mpesa/stk_cancelled", "stk"),
                ("mpesa/c2b_confirmation_v2", "c2b/confirmation"),
                ("mpesa/c2b_confirmation_v2", "c2b/validation"),
            ]
        ),
        label="base",
    )
    doc = _mutate(data, fixture(name))
    before = table_counts(server)
    _check(server, before, server.mpesa(kind, _dumps(doc)).status_code)


@PROPERTY_SETTINGS
@given(body=st.binary(max_size=300) | json_values.map(_dumps), target=st.sampled_from(["paystack", "stk", "c2b"]))
def test_random_bodies(server: WebhookServer, body: bytes, target: str) -> None:
    before = table_counts(server)
    if target == "paystack":
        response = server.paystack(body)
    else:
        response = server.mpesa("stk" if target == "stk" else "c2b/confirmation", body)
    _check(server, before, response.status_code)


@PROPERTY_SETTINGS
@given(
    amount=st.integers(min_value=1, max_value=10**12),
    deliveries=st.lists(
        st.tuples(st.integers(min_value=0, max_value=4), st.integers(min_value=1, max_value=10**12)), max_size=8
    ),
)
def test_refund_sequences_net_out_exactly(
    server: WebhookServer, amount: int, deliveries: list[tuple[int, int]]
) -> None:
    """Any charge and any sequence of refunds (partial, redelivered, together more than the charge): each
    distinct refund applies once and at most what is left, so the payment keeps max(0, amount - refunds), is
    `refunded` exactly when nothing is left, and every refund body is kept once."""
    if not server.query("select 1 from businesses"):
        _setup(server)
    business = server.one("select id from businesses")
    reference = f"T-PROP-{uuid.uuid4().hex}"
    assert server.paystack(charge(business, reference=reference, amount=amount)).status_code == 200
    first_amounts: dict[int, int] = {}
    for which, refund_amount in deliveries:
        # A redelivery is the same body: a refund reference keeps the amount it was first sent with.
        refund_amount = first_amounts.setdefault(which, refund_amount)
        response = server.paystack(refund(reference, f"{reference}-RF{which}", refund_amount))
        assert response.status_code == 200, response.text
    refunded = min(amount, sum(first_amounts.values()))
    status, refunded_minor = server.one(
        "select status, refunded_minor from payments where provider_reference = %s", reference
    )
    assert (status, refunded_minor) == ("refunded" if refunded == amount else "completed", refunded)
    kept = server.one(
        "select count(*) from payment_transactions t join payments p on p.id = t.payment_id"
        " where p.provider_reference = %s and t.status = 'refunded'",
        reference,
    )
    assert kept == len(first_amounts)
    assert_consistent(server)
