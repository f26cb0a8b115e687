"""Webhooks end to end: provider payloads (tests/fixtures/providers and variants) through real HTTP into
real PostgreSQL, checked in the tables the dashboards read."""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from cdc_dashboard.db import with_database
from cdc_dashboard.db.locks import LockKey
from cdc_dashboard.ingest.paystack import sign

from ..pg import clone_database, drop_database
from .webhook_server import (
    MPESA_TOKEN,
    PAYSTACK_SECRET,
    WebhookServer,
    assert_consistent,
    charge,
    fixture,
    refund,
    serve_webhooks,
    table_counts,
)

C2B_ACCEPTED = {"ResultCode": "0", "ResultDesc": "Accepted"}


@pytest.fixture
def server(db_url: str) -> Iterator[WebhookServer]:
    with serve_webhooks(db_url) as running:
        yield running


@pytest.fixture(scope="module")
def refusals(admin_url: str, template_db: str) -> Iterator[WebhookServer]:
    """One server and database for the tests of refused requests: each checks that its request changed no
    table, which holds on a shared database too, and saves a database per case."""
    name = clone_database(admin_url, template_db)
    try:
        with serve_webhooks(with_database(admin_url, name)) as running:
            # Something every refused payload would otherwise be recorded against.
            business = running.business(shortcode="600966")
            running.pending_stk(business, "ws_CO_191220191020363925", 100)
            yield running
    finally:
        drop_database(admin_url, name)


def payments(server: WebhookServer) -> list[tuple[Any, ...]]:
    return server.query(
        "select business_id, client_id, booking_id, amount_minor, currency, method, status, provider,"
        " provider_reference, mpesa_receipt, paid_at from payments order by created_at"
    )


# -- Paystack ------------------------------------------------------------------------------------------------


def test_paystack_charge_records_payment_transaction_ledger_and_client(server: WebhookServer) -> None:
    business = server.business()
    body = json.dumps(charge(business)).encode()
    response = server.paystack(body)
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "recorded"
    [(biz, client, booking, amount, currency, method, status, provider, ref, receipt, paid_at)] = payments(server)
    assert (biz, booking, amount, currency, method, status) == (business, None, 10000, "KES", "paystack", "completed")
    assert (provider, ref, receipt) == ("paystack", "T173424527684156", None)
    assert paid_at == datetime(2025, 2, 11, 10, 42, 20, tzinfo=UTC)
    assert server.one("select email from clients where id = %s", client) == "h0e5lcb0f0tnqrmixoqa@paystackdemoke-vt.com"
    raw, pt_status, pt_amount = server.one(
        "select raw, status, amount_minor from payment_transactions where business_id = %s", business
    )
    assert raw == json.loads(body) and (pt_status, pt_amount) == ("completed", 10000)
    assert server.query("select type, amount_minor, client_id from client_business_transactions") == [
        ("payment", 10000, client)
    ]


def test_paystack_subaccount_attributes_the_business(server: WebhookServer) -> None:
    business = server.business(subaccount="ACCT_6rjxs8ehbkl1e3")
    response = server.paystack(charge(subaccount={"subaccount_code": "ACCT_6rjxs8ehbkl1e3"}))
    assert response.status_code == 200
    assert [p[0] for p in payments(server)] == [business]


def test_paystack_unknown_business_is_kept_unattributed(server: WebhookServer) -> None:
    business = server.business()
    # The verbatim sample names no business; an unknown business id in metadata is no better.
    for body in (charge(), charge(uuid.uuid4(), reference="T-unknown-2")):
        response = server.paystack(body)
        assert response.status_code == 200, response.text
        assert response.json()["outcome"] == "unattributed"
    assert payments(server) == []
    rows = server.query("select business_id, payment_id, raw->'data'->>'reference' from payment_transactions")
    assert sorted(rows, key=str) == [(None, None, "T-unknown-2"), (None, None, "T173424527684156")]
    assert server.query("select count(*) from client_business_transactions") == [(0,)]
    assert server.query("select count(*) from payments where business_id = %s", business) == [(0,)]


@pytest.mark.parametrize(
    "signature",
    [None, "", "0" * 128, "not-hex", sign(PAYSTACK_SECRET, b"{}"), sign("sk_test_other", b"x")],
)
def test_paystack_bad_signature_is_401_and_records_nothing(refusals: WebhookServer, signature: str | None) -> None:
    refusals.business()
    before = table_counts(refusals)
    response = refusals.paystack(charge(), signature=signature)
    assert response.status_code == 401
    assert "signature" in response.json()["error"]
    assert table_counts(refusals) == before


def test_paystack_signature_is_over_the_raw_bytes(server: WebhookServer) -> None:
    business = server.business()
    body = charge(business)
    compact = json.dumps(body, separators=(",", ":")).encode()
    spaced = json.dumps(body, indent=4).encode()
    # Signed over the compact form, sent spaced: the same JSON, other bytes.
    assert server.paystack(spaced, signature=sign(PAYSTACK_SECRET, compact)).status_code == 401
    assert server.paystack(spaced, signature=sign(PAYSTACK_SECRET, spaced)).status_code == 200
    assert len(payments(server)) == 1


@pytest.mark.parametrize(
    ("metadata", "amount"),
    [
        (0, 10000),
        ("", "10000"),
        (None, " 10000 "),
        ("METADATA_AS_JSON_STRING", 10000),
    ],
)
def test_paystack_parser_tolerance(server: WebhookServer, metadata: Any, amount: Any) -> None:
    business = server.business(subaccount="ACCT_tolerant")
    body = charge(amount=amount, subaccount={"subaccount_code": "ACCT_tolerant"})
    if metadata == "METADATA_AS_JSON_STRING":
        body["data"]["metadata"] = json.dumps({"business_id": str(business)})
        body["data"]["subaccount"] = {}
    else:
        body["data"]["metadata"] = metadata
    response = server.paystack(body)
    assert response.status_code == 200, response.text
    assert [(p[0], p[3]) for p in payments(server)] == [(business, 10000)]


def test_paystack_paid_at_falls_back_to_paidAt(server: WebhookServer) -> None:
    business = server.business()
    body = charge(business)
    del body["data"]["paid_at"]
    body["data"]["paidAt"] = "2025-02-11T13:42:20+03:00"
    assert server.paystack(body).status_code == 200
    assert payments(server)[0][10] == datetime(2025, 2, 11, 10, 42, 20, tzinfo=UTC)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"reference": None}, "data.reference"),
        ({"reference": ""}, "data.reference"),
        ({"amount": "100.5"}, "fraction"),
        ({"amount": -1}, "more than zero"),
        ({"amount": "ten"}, "number"),
        ({"amount": True}, "number"),
        ({"amount": 2**63}, "too large"),
        ({"currency": "shillings"}, "data.currency"),
        ({"paid_at": "yesterday"}, "data.paid_at"),
    ],
)
def test_paystack_missing_or_malformed_fields_are_400(
    refusals: WebhookServer, change: dict[str, Any], reason: str
) -> None:
    business = refusals.business()
    before = table_counts(refusals)
    response = refusals.paystack(charge(business, **change))
    assert response.status_code == 400, response.text
    assert reason in response.json()["error"]
    assert table_counts(refusals) == before


# Amounts are bounded like the payments table (0 < amount <= 10^12 minor units): a zero, negative or absurd
# amount is refused with the field's name, before anything is written. Before the bounds, a C2B TransAmount of
# "50000000000000000" was recorded, and the sum of two such payments overflowed the figures (issue 14).
PAYSTACK_OUT_OF_RANGE = [
    (0, "more than zero"),
    ("0", "more than zero"),
    (-100, "more than zero"),
    ("-1", "more than zero"),
    (10**12 + 1, "too large"),
    ("50000000000000000", "too large"),
]
MPESA_OUT_OF_RANGE = [
    ("0", "more than zero"),
    ("0.00", "more than zero"),
    ("-5", "more than zero"),
    ("10000000000.01", "too large"),  # 10^12 minor units and one cent
    ("50000000000000000", "too large"),
]


@pytest.mark.parametrize(("amount", "reason"), PAYSTACK_OUT_OF_RANGE)
@pytest.mark.parametrize("event", ["charge.success", "refund.processed"])
def test_paystack_amount_out_of_range_is_400(refusals: WebhookServer, event: str, amount: Any, reason: str) -> None:
    business = refusals.one("select id from businesses where mpesa_shortcode = '600966'")
    if event == "charge.success":
        body = charge(business, amount=amount)
    else:
        body = fixture("paystack/refund_processed")
        body["data"]["amount"] = amount
    before = table_counts(refusals)
    response = refusals.paystack(body)
    assert response.status_code == 400, response.text
    assert "data.amount" in response.json()["error"] and reason in response.json()["error"]
    assert table_counts(refusals) == before


@pytest.mark.parametrize(("amount", "reason"), MPESA_OUT_OF_RANGE)
@pytest.mark.parametrize("kind", ["stk", "c2b/validation", "c2b/confirmation"])
def test_mpesa_amount_out_of_range_is_400(refusals: WebhookServer, kind: str, amount: str, reason: str) -> None:
    # The refusals database has the shortcode 600966 and a pending STK push for the fixture's CheckoutRequestID:
    # without the bounds each of these bodies would be recorded (or accepted, for validation).
    if kind == "stk":
        raw = json.dumps(fixture("mpesa/stk_success")).replace('"Value": 1.0', f'"Value": {amount}')
        field = "Amount"
    else:
        raw = json.dumps(fixture("mpesa/c2b_confirmation_v2")).replace('"5.00"', f'"{amount}"')
        field = "TransAmount"
    assert amount in raw
    before = table_counts(refusals)
    response = refusals.mpesa(kind, raw.encode())
    assert response.status_code == 400, response.text
    assert field in response.json()["error"] and reason in response.json()["error"]
    assert table_counts(refusals) == before


def test_largest_amount_is_accepted(server: WebhookServer) -> None:
    """The bound itself, 10^12 minor units, is a payment the table accepts: recorded, not refused."""
    business = server.business(shortcode="600966")
    assert server.paystack(charge(business, amount=10**12)).status_code == 200
    c2b = json.dumps(fixture("mpesa/c2b_confirmation_v2")).replace('"5.00"', '"10000000000.00"')
    assert server.mpesa("c2b/validation", c2b.encode()).json() == C2B_ACCEPTED
    assert server.mpesa("c2b/confirmation", c2b.encode()).json() == C2B_ACCEPTED
    assert sorted(p[3] for p in payments(server)) == [10**12, 10**12]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b'{"event": "charge.success"}',
        b'{"event": "charge.success", "data": 1}',
        b"\xff\xfe",
        b'{"event": "charge.success", "data": {"amount": NaN}}',
        b'{"event": "charge.success", "data": {"reference": "a\\u0000b", "amount": 1, "currency": "KES"}}',
    ],
)
def test_paystack_malformed_body_is_400(refusals: WebhookServer, body: bytes) -> None:
    before = table_counts(refusals)
    response = refusals.paystack(body)
    assert response.status_code == 400, response.text
    assert table_counts(refusals) == before


@pytest.mark.parametrize(
    "number",
    [b"1e999999999", b"-1e999999999", b"1e-999999999", b"9" * 5000],
)
def test_absurd_numbers_are_400_not_500(refusals: WebhookServer, number: bytes) -> None:
    """Regression: int() of a 1e999999999 reference (or Python's 4300-digit guard) raised outside BadPayload
    and became a 500; numbers are now bounded before they are converted."""
    business = refusals.one("select id from businesses where mpesa_shortcode = '600966'")
    before = table_counts(refusals)
    for field in (b"reference", b"amount"):
        body = charge(business)
        body["data"][field.decode()] = "PLACEHOLDER"
        raw = json.dumps(body).encode().replace(b'"PLACEHOLDER"', number)
        assert refusals.paystack(raw).status_code == 400, (field, number)
    stk = json.dumps(fixture("mpesa/stk_success")).encode().replace(b"20191219102115", number)
    assert refusals.mpesa("stk", stk).status_code == 400
    c2b = json.dumps(fixture("mpesa/c2b_confirmation_v2")).encode().replace(b'"600966"', number)
    assert refusals.mpesa("c2b/confirmation", c2b).status_code == 400
    assert table_counts(refusals) == before


def test_paystack_other_events_are_acknowledged_and_not_recorded(server: WebhookServer) -> None:
    before = table_counts(server)
    response = server.paystack({"event": "transfer.success", "data": {"reference": "x"}})
    assert response.status_code == 200
    assert response.json()["outcome"] == "ignored"
    assert table_counts(server) == before


def test_paystack_five_parallel_duplicates_record_one_payment(server: WebhookServer) -> None:
    business = server.business()
    body = json.dumps(charge(business)).encode()
    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(lambda _: server.paystack(body), range(5)))
    assert [r.status_code for r in responses] == [200] * 5
    assert sorted(r.json()["outcome"] for r in responses) == ["duplicate"] * 4 + ["recorded"]
    assert table_counts(server) == {
        "payments": 1,
        "payment_transactions": 1,
        "client_business_transactions": 1,
        "clients": 1,
        "bookings": 0,
    }


def test_parallel_refunds_and_c2b_duplicates_record_once(server: WebhookServer) -> None:
    business = server.business(shortcode="600966")
    assert server.paystack(charge(business, reference="T2154954_412829_3be32076_6lcg3")).status_code == 200
    body = json.dumps(refund("T2154954_412829_3be32076_6lcg3", "132013318360", "5000")).encode()
    c2b = fixture("mpesa/c2b_confirmation_v2")
    with ThreadPoolExecutor(10) as pool:
        refunds = [pool.submit(server.paystack, body) for _ in range(5)]
        confirmations = [pool.submit(server.mpesa, "c2b/confirmation", c2b) for _ in range(5)]
        codes = [f.result().status_code for f in refunds + confirmations]
    assert codes == [200] * 10
    assert sorted(f.result().json()["outcome"] for f in refunds) == ["duplicate"] * 4 + ["refunded"]
    # One refund of half the charge, applied once: the payment is still completed, for what is left.
    assert server.query("select method, status, refunded_minor from payments order by method") == [
        ("mpesa", "completed", 0),
        ("paystack", "completed", 5000),
    ]
    assert server.query("select type, count(*) from client_business_transactions group by type order by type") == [
        ("payment", 2),
        ("refund", 1),
    ]
    assert_consistent(server)


def test_new_client_paying_twice_at_once_is_one_client(server: WebhookServer) -> None:
    business = server.business()
    bodies = [json.dumps(charge(business, reference=f"SAME-CLIENT-{n}")).encode() for n in range(5)]
    with ThreadPoolExecutor(5) as pool:
        codes = [r.status_code for r in pool.map(server.paystack, bodies)]
    assert codes == [200] * 5
    assert server.one("select count(*) from payments") == 5
    assert server.one("select count(*) from clients") == 1


def test_paystack_returning_client_is_found_by_email(server: WebhookServer) -> None:
    business = server.business()
    first = charge(business, reference="R-1")
    second = charge(business, reference="R-2")
    first["data"]["customer"]["email"] = "Wanjiru.Kamau@Example.com"
    second["data"]["customer"]["email"] = "wanjiru.kamau@example.COM"
    assert server.paystack(first).status_code == 200
    assert server.paystack(second).status_code == 200
    assert server.one("select count(distinct client_id) from payments") == 1
    # Kept as the first payment gave it; found again whatever its case.
    assert server.one("select email from clients") == first["data"]["customer"]["email"]


def test_paystack_pending_payment_created_by_the_app_is_completed(server: WebhookServer) -> None:
    business = server.business()
    payment_id = uuid.uuid4()
    server.query(
        "insert into payments (id, business_id, amount_minor, currency, method, status, provider, provider_reference)"
        " values (%s, %s, 10000, 'KES', 'paystack', 'pending', 'paystack', 'T173424527684156')",
        payment_id,
        business,
    )
    response = server.paystack(charge())  # no metadata: the pending payment says whose it is
    assert response.json()["outcome"] == "recorded"
    assert server.one("select status from payments where id = %s", payment_id) == "completed"
    assert server.one("select count(*) from payments") == 1


def test_booking_partially_paid_then_paid_then_refunded(server: WebhookServer) -> None:
    business = server.business()
    booking = server.booking(business, 15000)
    first = charge(business, reference="B-1", amount=10000)
    first["data"]["metadata"]["booking_id"] = str(booking)
    second = charge(business, reference="B-2", amount="5000")
    second["data"]["metadata"]["booking_id"] = str(booking)
    status = "select payment_status from bookings where id = %s"
    assert server.paystack(first).status_code == 200
    assert server.one(status, booking) == "partially_paid"
    assert server.paystack(second).status_code == 200
    assert server.one(status, booking) == "paid"
    # The booking counts what its payments keep (amount - refunded): 1.00 back is no longer paid in full.
    steps = [("B-2", "RF-B2a", 100, "partially_paid"), ("B-2", "RF-B2b", 4900, "partially_paid")]
    steps += [("B-1", "RF-B1", 10000, "refunded")]
    for reference, refund_reference, amount, expected in steps:
        response = server.paystack(refund(reference, refund_reference, amount))
        assert response.json()["outcome"] == "refunded"
        assert server.one(status, booking) == expected, (refund_reference, expected)
    assert_consistent(server)


def test_refund_of_unknown_charge_is_unattributed(server: WebhookServer) -> None:
    body = fixture("paystack/refund_processed")
    outcomes = [server.paystack(body).json()["outcome"] for _ in range(2)]
    # Kept once for audit; the redelivery finds it by its refund_reference.
    assert outcomes == ["unattributed", "duplicate"]
    assert server.query("select business_id, payment_id, status, provider_reference from payment_transactions") == [
        (None, None, "refunded", "refund:132013318360")
    ]


def test_unconfigured_providers_answer_503_and_record_nothing(db_url: str) -> None:
    with serve_webhooks(db_url, paystack_secret_key=None, mpesa_callback_token=None) as bare:
        bare.business(shortcode="600966")
        before = table_counts(bare)
        assert bare.paystack(charge()).status_code == 503
        for kind in ("stk", "c2b/validation", "c2b/confirmation"):
            assert bare.mpesa(kind, fixture("mpesa/c2b_confirmation_v2")).status_code == 503
        assert table_counts(bare) == before


def test_pooled_connections_cut_by_the_server_are_retried(server: WebhookServer) -> None:
    """The pool's connections die (as on a PostgreSQL restart); the webhook is recorded on a fresh one, once,
    and nothing answers 500."""
    business = server.business()
    for n in range(3):
        # Warm several pooled connections, then have the server terminate every one of them.
        assert server.paystack(charge(business, reference=f"WARM-{n}")).status_code == 200
    server.query(
        "select pg_terminate_backend(pid) from pg_stat_activity"
        " where datname = current_database() and pid <> pg_backend_pid()"
    )
    responses = [server.paystack(charge(business, reference="AFTER-CUT")) for _ in range(2)]
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert server.one("select count(*) from payments where provider_reference = 'AFTER-CUT'") == 1


def test_body_over_one_megabyte_is_413_and_records_nothing(server: WebhookServer) -> None:
    business = server.business(shortcode="600966")
    big = charge(business)
    big["data"]["padding"] = "x" * (1024 * 1024)
    raw = json.dumps(big).encode()
    before = table_counts(server)
    assert server.paystack(raw).status_code == 413
    c2b = fixture("mpesa/c2b_confirmation_v2")
    c2b["padding"] = "x" * (1024 * 1024)
    assert server.mpesa("c2b/confirmation", c2b).status_code == 413

    # Without a Content-Length (chunked), the limit still holds.
    def chunks() -> Iterator[bytes]:
        for start in range(0, len(raw), 65536):
            yield raw[start : start + 65536]

    response = server.http.post(
        "/v1/webhooks/paystack", content=chunks(), headers={"x-paystack-signature": sign(PAYSTACK_SECRET, raw)}
    )
    assert response.status_code == 413
    assert table_counts(server) == before


# -- M-Pesa --------------------------------------------------------------------------------------------------

STK_CHECKOUT = "ws_CO_191220191020363925"


def test_stk_success_completes_the_pending_payment(server: WebhookServer) -> None:
    business = server.business()
    booking = server.booking(business, 100)
    payment_id = server.pending_stk(business, STK_CHECKOUT, 100, booking)
    response = server.mpesa("stk", fixture("mpesa/stk_success"))
    assert response.status_code == 200
    assert response.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}
    status, amount, receipt, paid_at, client = server.one(
        "select status, amount_minor, mpesa_receipt, paid_at, client_id from payments where id = %s", payment_id
    )
    # TransactionDate 20191219102115 is Kenyan time (UTC+3).
    assert (status, amount, receipt) == ("completed", 100, "NLJ7RT61SV")
    assert paid_at == datetime(2019, 12, 19, 7, 21, 15, tzinfo=UTC)
    assert server.one("select phone from clients where id = %s", client) == "254708374149"
    assert server.one("select payment_status from bookings where id = %s", booking) == "paid"
    assert server.one("select count(*) from client_business_transactions where payment_id = %s", payment_id) == 1
    assert server.one("select raw->'Body'->'stkCallback'->>'CheckoutRequestID' from payment_transactions") == (
        STK_CHECKOUT
    )


def test_stk_cancelled_fails_the_pending_payment(server: WebhookServer) -> None:
    business = server.business()
    payment_id = server.pending_stk(business, "ws_CO_21072024125243250722943992", 2500)
    for _ in range(2):
        assert server.mpesa("stk", fixture("mpesa/stk_cancelled")).status_code == 200
    assert server.one("select status from payments where id = %s", payment_id) == "failed"
    assert server.query("select status, amount_minor, payment_id from payment_transactions") == [
        ("failed", 2500, payment_id)
    ]
    assert server.one("select count(*) from client_business_transactions") == 0


def test_stk_for_unknown_checkout_is_unattributed(server: WebhookServer) -> None:
    response = server.mpesa("stk", fixture("mpesa/stk_success"))
    assert response.status_code == 200
    assert server.query("select business_id, payment_id, amount_minor from payment_transactions") == [(None, None, 100)]
    assert server.one("select count(*) from payments") == 0


def test_stk_parser_tolerance(server: WebhookServer) -> None:
    business = server.business()
    payment_id = server.pending_stk(business, STK_CHECKOUT, 100)
    body = fixture("mpesa/stk_success")
    callback = body["Body"]["stkCallback"]
    callback["ResultCode"] = "0"
    callback["CallbackMetadata"]["Item"] = [
        {"Name": "Amount", "Value": 1},
        {"Name": "MpesaReceiptNumber", "Value": "NLJ7RT61SV"},
        {"Name": "Balance"},
        {"Name": "TransactionDate", "Value": "20191219102115"},
        {"Name": "PhoneNumber", "Value": "254708374149"},
    ]
    assert server.mpesa("stk", body).status_code == 200
    assert server.one("select status, amount_minor from payments where id = %s", payment_id) == ("completed", 100)


@pytest.mark.parametrize(
    ("amount", "minor"),
    [("1.00", 100), ("1", 100), ("1.5", 150), ("1.005", None), ("-1", None), ("12345.67", 1234567)],
)
def test_mpesa_amount_is_exact(server: WebhookServer, amount: str, minor: int | None) -> None:
    server.business(shortcode="600966")
    raw = json.dumps(fixture("mpesa/c2b_confirmation_v2")).replace('"5.00"', amount).encode()
    response = server.mpesa("c2b/confirmation", raw)  # Amount as a bare JSON number
    if minor is None:
        assert response.status_code == 400
        assert server.one("select count(*) from payments") == 0
    else:
        assert response.status_code == 200, response.text
        assert server.one("select amount_minor from payments") == minor


def test_c2b_confirmation_records_payment_for_the_shortcode(server: WebhookServer) -> None:
    business = server.business(shortcode="600966")
    response = server.mpesa("c2b/confirmation", fixture("mpesa/c2b_confirmation_v2"))
    assert response.status_code == 200
    assert response.json() == C2B_ACCEPTED
    [(biz, client, _, amount, currency, method, status, provider, ref, receipt, paid_at)] = payments(server)
    assert (biz, amount, currency, method, status) == (business, 500, "KES", "mpesa", "completed")
    assert (provider, ref, receipt) == ("mpesa", "RKL51ZDR4F", "RKL51ZDR4F")
    assert paid_at == datetime(2023, 11, 21, 9, 13, 25, tzinfo=UTC)  # 12:13:25 in Nairobi
    assert server.one("select (name, phone) from clients where id = %s", client) == ("NICHOLAS", "2547 ***** 126")


def test_c2b_nulls_for_empty_strings_and_returning_client(server: WebhookServer) -> None:
    server.business(shortcode="600966")
    first = fixture("mpesa/c2b_confirmation_v2")
    second = fixture("mpesa/c2b_confirmation_v2")
    second.update(TransID="RKL51ZDR4G", MiddleName=None, LastName=None, InvoiceNumber=None, ThirdPartyTransID=None)
    second.update(BusinessShortCode=600966, TransTime=20231121121325, TransAmount=5)
    assert server.mpesa("c2b/confirmation", first).status_code == 200
    assert server.mpesa("c2b/confirmation", second).status_code == 200
    assert server.one("select count(*) from payments") == 2
    assert server.one("select count(*) from clients") == 1


def test_c2b_unknown_shortcode_is_unattributed(server: WebhookServer) -> None:
    server.business(shortcode="111111")
    response = server.mpesa("c2b/confirmation", fixture("mpesa/c2b_confirmation_v2"))
    assert response.json() == C2B_ACCEPTED
    assert server.one("select count(*) from payments") == 0
    assert server.query("select business_id, payment_id from payment_transactions") == [(None, None)]


def test_c2b_validation_accepts_and_records_nothing(server: WebhookServer) -> None:
    server.business(shortcode="600966")
    before = table_counts(server)
    response = server.mpesa("c2b/validation", fixture("mpesa/c2b_confirmation_v2"))
    assert response.json() == C2B_ACCEPTED
    assert table_counts(server) == before


@pytest.mark.parametrize("kind", ["stk", "c2b/validation", "c2b/confirmation"])
def test_mpesa_bad_token_is_401_and_records_nothing(refusals: WebhookServer, kind: str) -> None:
    before = table_counts(refusals)
    body = fixture("mpesa/c2b_confirmation_v2" if kind != "stk" else "mpesa/stk_success")
    for token in ("wrong", "cb-" + "t" * 39, "cb-" + "t" * 41):
        assert refusals.mpesa(kind, body, token=token).status_code == 401
    assert table_counts(refusals) == before


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1]",
        b'{"Body": {}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "x"}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "x", "ResultCode": 0}}}',
    ],
)
def test_stk_malformed_is_400(refusals: WebhookServer, body: bytes) -> None:
    before = table_counts(refusals)
    assert refusals.mpesa("stk", body).status_code == 400
    assert table_counts(refusals) == before


def _stk_for(receipt: str, checkout: str, amount: Any = 5) -> dict[str, Any]:
    body = fixture("mpesa/stk_success")
    callback = body["Body"]["stkCallback"]
    callback["CheckoutRequestID"] = checkout
    callback["CallbackMetadata"]["Item"][0]["Value"] = amount
    callback["CallbackMetadata"]["Item"][1]["Value"] = receipt
    return body


def test_same_receipt_by_stk_then_c2b_is_one_payment(server: WebhookServer) -> None:
    business = server.business(shortcode="600966")
    booking = server.booking(business, 500)
    payment_id = server.pending_stk(business, "ws_CO_A", 500, booking)
    assert server.mpesa("stk", _stk_for("RKL51ZDR4F", "ws_CO_A")).status_code == 200
    response = server.mpesa("c2b/confirmation", fixture("mpesa/c2b_confirmation_v2"))
    assert response.json() == C2B_ACCEPTED
    assert server.query("select id, status, mpesa_receipt from payments") == [(payment_id, "completed", "RKL51ZDR4F")]
    assert server.one("select count(*) from client_business_transactions") == 1
    assert server.one("select payment_status from bookings") == "paid"


def test_same_receipt_by_c2b_then_stk_is_one_payment(server: WebhookServer) -> None:
    business = server.business(shortcode="600966")
    booking = server.booking(business, 500)
    payment_id = server.pending_stk(business, "ws_CO_B", 500, booking)
    assert server.mpesa("c2b/confirmation", fixture("mpesa/c2b_confirmation_v2")).status_code == 200
    c2b_client = server.one("select client_id from payments where provider_reference = 'RKL51ZDR4F'")
    assert server.mpesa("stk", _stk_for("RKL51ZDR4F", "ws_CO_B")).status_code == 200
    # The app's payment (the id it holds) is the one that stays; the C2B's history moved onto it.
    assert server.query("select id, status, mpesa_receipt, booking_id, client_id from payments") == [
        (payment_id, "completed", "RKL51ZDR4F", booking, c2b_client)
    ]
    assert server.query("select payment_id, type from client_business_transactions") == [(payment_id, "payment")]
    assert server.query("select payment_id from payment_transactions") == [(payment_id,)]
    assert server.one("select payment_status from bookings") == "paid"
    # Repeats of either are duplicates.
    assert server.mpesa("stk", _stk_for("RKL51ZDR4F", "ws_CO_B")).status_code == 200
    assert server.mpesa("c2b/confirmation", fixture("mpesa/c2b_confirmation_v2")).status_code == 200
    assert server.one("select count(*) from payment_transactions") == 1


def test_two_payments_of_one_booking_at_once_make_it_paid(server: WebhookServer) -> None:
    """Regression: each completion recomputed the booking from a snapshot that could not see the other's
    uncommitted payment, so two halves paid at once left the booking partially_paid. To make them overlap for
    sure, the test holds both clients' find-or-create locks until both requests wait on them."""
    business = server.business()
    booking = server.booking(business, 1000)
    bodies, keys = [], []
    for half in range(2):
        checkout = f"ws_CO_HALF_{half}"
        server.pending_stk(business, checkout, 500, booking)
        body = _stk_for(f"RCPTHALF{half}", checkout)
        phone = f"25470000000{half}"
        body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][3]["Value"] = int(phone)
        bodies.append(body)
        keys.append(f"client:phone:{phone}")
    with psycopg.connect(server.db_url) as gate, ThreadPoolExecutor(2) as pool:
        for key in keys:  # the same key derivation as sql/queries/ingest.sql lock_key
            gate.execute("select pg_advisory_xact_lock(hashtextextended(%s, %s))", (key, LockKey.INGEST_PAYMENT_KEY))
        futures = [pool.submit(server.mpesa, "stk", body) for body in bodies]
        time.sleep(0.5)
        gate.commit()
        assert [f.result().status_code for f in futures] == [200, 200]
    assert server.one("select count(*) from payments where status = 'completed'") == 2
    assert server.one("select payment_status from bookings where id = %s", booking) == "paid"


def test_receipt_already_paid_to_another_business_changes_neither(server: WebhookServer) -> None:
    paybill_owner = server.business(shortcode="600966")
    other = server.business()
    pending = server.pending_stk(other, "ws_CO_X", 500)
    assert server.mpesa("c2b/confirmation", fixture("mpesa/c2b_confirmation_v2")).status_code == 200
    assert server.mpesa("stk", _stk_for("RKL51ZDR4F", "ws_CO_X")).status_code == 200
    assert server.one("select status from payments where id = %s", pending) == "pending"
    assert server.one("select business_id from payments where status = 'completed'") == paybill_owner
    assert server.one("select count(*) from payment_transactions where business_id is null") == 1


def test_same_receipt_by_stk_and_c2b_in_parallel_is_one_payment(server: WebhookServer) -> None:
    business = server.business(shortcode="600966")
    for round_ in range(5):
        receipt = f"RKL51ZDR{round_:02d}"
        server.pending_stk(business, f"ws_CO_P{round_}", 500)
        c2b = fixture("mpesa/c2b_confirmation_v2")
        c2b["TransID"] = receipt
        calls = [("stk", _stk_for(receipt, f"ws_CO_P{round_}")), ("c2b/confirmation", c2b)] * 3
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda call: server.mpesa(call[0], call[1]), calls))
        assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
        assert server.one("select count(*) from payments where mpesa_receipt = %s", receipt) == 1
    assert server.one("select count(*) from payments") == 5
    assert server.one("select count(*) from client_business_transactions") == 5
    # Repeats of a merged STK result are duplicates, not unattributed events.
    assert server.one("select count(*) from payment_transactions where business_id is null") == 0


def test_source_ip_allow_list(db_url: str) -> None:
    body = fixture("mpesa/c2b_confirmation_v2")
    with serve_webhooks(db_url, mpesa_allowed_ips=["196.201.214.0/24"]) as strict:
        strict.business(shortcode="600966")
        assert strict.mpesa("c2b/confirmation", body).status_code == 403
        # 127.0.0.1 is no trusted proxy here: its X-Forwarded-For proves nothing.
        spoofed = {"x-forwarded-for": "196.201.214.200"}
        assert strict.mpesa("c2b/confirmation", body, headers=spoofed).status_code == 403
        assert strict.one("select count(*) from payments") == 0
    with serve_webhooks(db_url, mpesa_allowed_ips=["196.201.214.0/24"], trusted_proxies=["127.0.0.1"]) as proxied:
        # The caller wrote the left hop; the proxy appended the right one: the right one is believed.
        forged = {"x-forwarded-for": "196.201.214.200, 203.0.113.9"}
        assert proxied.mpesa("c2b/confirmation", body, headers=forged).status_code == 403
        good = {"x-forwarded-for": "203.0.113.9, 196.201.214.200"}
        assert proxied.mpesa("c2b/confirmation", body, headers=good).status_code == 200
        assert proxied.one("select count(*) from payments") == 1


def test_webhooks_answer_within_100_ms(server: WebhookServer) -> None:
    business = server.business(shortcode="600966")
    timings = []
    for n in range(15):
        c2b = fixture("mpesa/c2b_confirmation_v2")
        c2b["TransID"] = f"SPEED{n:05d}"
        started = time.perf_counter()
        response = server.mpesa("c2b/confirmation", c2b)
        timings.append(time.perf_counter() - started)
        assert response.status_code == 200
        started = time.perf_counter()
        assert server.paystack(charge(business, reference=f"SPEED-{n}")).status_code == 200
        timings.append(time.perf_counter() - started)
    assert statistics.median(timings) < 0.1, timings


def test_metrics_count_answers_by_provider_and_result(server: WebhookServer) -> None:
    business = server.business(shortcode="600966")
    assert server.paystack(charge(business)).status_code == 200
    assert server.paystack(charge(business)).status_code == 200
    assert server.paystack(charge(business), signature="bad").status_code == 401
    assert server.mpesa("c2b/confirmation", fixture("mpesa/c2b_confirmation_v2")).status_code == 200
    text = server.http.get("/metrics").text
    assert 'cdc_webhooks_total{provider="paystack",result="recorded"} 1.0' in text
    assert 'cdc_webhooks_total{provider="paystack",result="duplicate"} 1.0' in text
    assert 'cdc_webhooks_total{provider="paystack",result="401"} 1.0' in text
    assert 'cdc_webhooks_total{provider="mpesa",result="recorded"} 1.0' in text
    assert 'cdc_webhook_seconds_count{provider="paystack"} 3.0' in text


def test_refusals_are_logged_with_their_reason_and_never_the_token(
    server: WebhookServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="cdc_dashboard")
    assert server.paystack(charge(), signature="0" * 128).status_code == 401
    assert server.mpesa("stk", b"{", token=MPESA_TOKEN).status_code == 400
    assert server.mpesa("stk", fixture("mpesa/stk_success"), token="guess").status_code == 401
    rejected = [r for r in caplog.records if r.getMessage().startswith("webhook rejected")]
    assert [(getattr(r, "provider", None), getattr(r, "status", None)) for r in rejected] == [
        ("paystack", 401),
        ("mpesa", 400),
        ("mpesa", 401),
    ]
    assert "x-paystack-signature" in rejected[0].getMessage()
    assert "not JSON" in rejected[1].getMessage()
    assert all(MPESA_TOKEN not in (r.getMessage() + str(r.__dict__)) for r in caplog.records)
