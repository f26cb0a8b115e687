"""Parsing provider payloads: exact amounts, Kenyan times, tolerated variations, signatures, caller IPs."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_dashboard.config import ConfigError, Settings, load_settings
from cdc_dashboard.ingest import mpesa, paystack
from cdc_dashboard.ingest.sources import caller_ip, is_allowed, networks
from cdc_dashboard.ingest.wire import (
    BadPayload,
    eat_timestamp,
    is_full_phone_number,
    iso_timestamp,
    load_json,
    minor_units,
    optional_text,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"


def load(name: str) -> Any:
    doc, _raw = load_json((FIXTURES / f"{name}.json").read_bytes())
    return doc


@pytest.mark.parametrize(
    ("value", "scale", "minor"),
    [
        (10000, 1, 10000),
        ("10000", 1, 10000),
        (" 5000 ", 1, 5000),
        (Decimal("1.00"), 100, 100),
        (Decimal("1"), 100, 100),
        ("5.00", 100, 500),
        ("0.01", 100, 1),
        (Decimal("12345.67"), 100, 1234567),
        ("1e2", 1, 100),
        (10**12, 1, 10**12),
        ("10000000000.00", 100, 10**12),
    ],
)
def test_minor_units_exact(value: Any, scale: int, minor: int) -> None:
    assert minor_units(value, "amount", scale=scale) == minor


@pytest.mark.parametrize(
    "value",
    [None, True, "", "abc", "1,000", "--1", Decimal("0.005"), "100.5", 1.5, "NaN", "Infinity", [], {}],
)
def test_minor_units_refuses(value: Any) -> None:
    scale = 100 if isinstance(value, Decimal) else 1
    with pytest.raises(BadPayload):
        minor_units(value, "amount", scale=scale)


@pytest.mark.parametrize(
    ("value", "scale", "reason"),
    [
        (0, 1, "more than zero"),
        ("0.00", 100, "more than zero"),
        ("-0", 1, "more than zero"),
        (-5, 1, "more than zero"),
        ("-1", 100, "more than zero"),
        (10**12 + 1, 1, "too large"),
        ("10000000000.01", 100, "too large"),
        ("50000000000000000", 100, "too large"),
        (2**63, 1, "too large"),
        (Decimal("1E+999999999"), 100, "too large"),
    ],
)
def test_minor_units_bounds(value: Any, scale: int, reason: str) -> None:
    """A payment is more than zero and at most 10^12 minor units, the payments table's bound."""
    with pytest.raises(BadPayload, match=reason):
        minor_units(value, "amount", scale=scale)


@given(st.decimals(min_value=Decimal("0.01"), max_value=10**10, places=2, allow_nan=False, allow_infinity=False))
@settings(max_examples=50, database=None)
def test_minor_units_shillings_round_trip(shillings: Decimal) -> None:
    as_json = json.loads(
        json.dumps({"a": str(shillings)}).replace(f'"{shillings}"', str(shillings)), parse_float=Decimal
    )
    assert minor_units(as_json["a"], "Amount", scale=100) == int(shillings * 100)
    assert minor_units(str(shillings), "Amount", scale=100) == int(shillings * 100)


@pytest.mark.parametrize("body", [b'{"a": 1e999999999}', b'{"a": -1e999999999}', b'{"a": 1e-999999999}'])
def test_absurd_exponents_are_bad_payloads(body: bytes) -> None:
    doc, _raw = load_json(body)
    for parse in (
        lambda v: optional_text(v, "a"),
        lambda v: minor_units(v, "a", scale=100),
        lambda v: minor_units(str(v), "a", scale=1),
        lambda v: eat_timestamp(v, "a"),
    ):
        with pytest.raises(BadPayload):
            parse(doc["a"])


def test_byte_order_mark_is_tolerated() -> None:
    doc, raw = load_json(b'\xef\xbb\xbf{"a": 1.50}')
    assert doc == {"a": Decimal("1.50")} and raw == '{"a": 1.50}'


def test_kenyan_time_to_utc() -> None:
    expected = datetime(2019, 12, 19, 7, 21, 15, tzinfo=UTC)
    assert eat_timestamp(20191219102115, "t") == expected
    assert eat_timestamp("20191219102115", "t") == expected
    assert eat_timestamp(Decimal("20191219102115"), "t") == expected
    # Across midnight and a month end.
    assert eat_timestamp("20240301020000", "t") == datetime(2024, 2, 29, 23, 0, tzinfo=UTC)
    assert eat_timestamp(None, "t") is None and eat_timestamp("", "t") is None


@pytest.mark.parametrize("value", ["2019-12-19", "20191319102115", "2019121910211", "00000000000000", 1.5])
def test_kenyan_time_refuses(value: Any) -> None:
    with pytest.raises(BadPayload):
        eat_timestamp(value, "t")


def test_iso_time() -> None:
    assert iso_timestamp("2025-02-11T10:42:20.000Z", "t") == datetime(2025, 2, 11, 10, 42, 20, tzinfo=UTC)
    assert iso_timestamp("2025-02-11T10:42:20", "t") == datetime(2025, 2, 11, 10, 42, 20, tzinfo=UTC)
    with pytest.raises(BadPayload):
        iso_timestamp("last tuesday", "t")


@pytest.mark.parametrize(
    "body",
    [b"\xff", b"{", b"NaN", b'{"a": Infinity}', b'{"a": "\\u0000"}', b'{"a": "\\ud800"}', b"[" * 100000, b"9" * 5000],
)
def test_load_json_refuses_what_postgres_cannot_store(body: bytes) -> None:
    with pytest.raises(BadPayload):
        load_json(body)


def test_paystack_charge_fixture() -> None:
    charge = paystack.parse_event(load("paystack/charge_success_kes"))
    assert isinstance(charge, paystack.PaystackCharge)
    assert (charge.reference, charge.amount_minor, charge.currency) == ("T173424527684156", 10000, "KES")
    assert charge.email == "h0e5lcb0f0tnqrmixoqa@paystackdemoke-vt.com"
    assert charge.business_id is None and charge.subaccount_code is None


@pytest.mark.parametrize(
    "metadata", [0, "", None, "not json", '{"business_id": "b4c7a2a0-0b9e-4f0e-9a8e-2f1d2c3b4a50"}']
)
def test_paystack_metadata_variants(metadata: Any) -> None:
    doc = load("paystack/charge_success_kes")
    doc["data"]["metadata"] = metadata
    charge = paystack.parse_event(doc)
    assert isinstance(charge, paystack.PaystackCharge)
    expected = "b4c7a2a0-0b9e-4f0e-9a8e-2f1d2c3b4a50" if isinstance(metadata, str) and "{" in metadata else None
    assert (str(charge.business_id) if charge.business_id else None) == expected


def test_paystack_refund_fixture_amount_as_string() -> None:
    refund = paystack.parse_event(load("paystack/refund_processed"))
    assert refund == paystack.PaystackRefund("T2154954_412829_3be32076_6lcg3", "132013318360", 5000, "NGN")


def test_paystack_signature() -> None:
    body = b'{"event":"charge.success"}'
    signature = paystack.sign("sk_test_x", body)
    assert len(signature) == 128 and signature == signature.lower()
    assert paystack.verify("sk_test_x", body, signature)
    assert not paystack.verify("sk_test_x", body + b" ", signature)
    assert not paystack.verify("sk_test_y", body, signature)
    assert not paystack.verify("sk_test_x", body, None)
    assert not paystack.verify("sk_test_x", body, "é")


def test_stk_fixtures() -> None:
    ok = mpesa.parse_stk(load("mpesa/stk_success"))
    assert ok.succeeded and (ok.receipt, ok.amount_minor, ok.phone) == ("NLJ7RT61SV", 100, "254708374149")
    assert ok.paid_at == datetime(2019, 12, 19, 7, 21, 15, tzinfo=UTC)
    cancelled = mpesa.parse_stk(load("mpesa/stk_cancelled"))
    assert not cancelled.succeeded and cancelled.result_code == 1032 and cancelled.receipt is None


def test_c2b_fixture_and_nulls() -> None:
    doc = load("mpesa/c2b_confirmation_v2")
    c2b = mpesa.parse_c2b(doc)
    assert (c2b.trans_id, c2b.amount_minor, c2b.shortcode, c2b.msisdn) == (
        "RKL51ZDR4F",
        500,
        "600966",
        "2547 ***** 126",
    )
    assert c2b.paid_at == datetime(2023, 11, 21, 9, 13, 25, tzinfo=UTC)
    doc.update(MiddleName=None, LastName=None, BillRefNumber=None, MSISDN=None, BusinessShortCode=600966)
    c2b = mpesa.parse_c2b(doc)
    assert (c2b.name, c2b.msisdn, c2b.bill_ref, c2b.shortcode) == ("NICHOLAS", None, None, "600966")


@pytest.mark.parametrize(
    ("phone", "full"),
    [
        ("254708374149", True),
        ("+254708374149", True),
        ("0712345678", True),
        ("2547 ***** 126", False),  # C2B v2
        ("2547*****126", False),
        ("3" * 64, False),  # a hash that happens to be all digits: longer than any phone number
        ("8b2c1c0fb8f9b2f4e1d6ad1c6a0c3f1b6e7f0b9e3d0c1a2b3c4d5e6f7a8b9c0d", False),  # C2B v1: SHA-256 hex
        ("0712 345 678", False),
        ("12345", False),
        ("", False),
    ],
)
def test_full_phone_number(phone: str, full: bool) -> None:
    assert is_full_phone_number(phone) is full


def test_token_compare() -> None:
    assert mpesa.token_matches("abc", "abc")
    assert not mpesa.token_matches("abc", "abd") and not mpesa.token_matches("abc", "")


def test_caller_ip_trusts_forwarded_for_only_from_trusted_proxies() -> None:
    proxies = networks(["10.0.0.0/8", "127.0.0.1"])
    assert str(caller_ip("203.0.113.5", "196.201.214.200", proxies)) == "203.0.113.5"
    assert str(caller_ip("127.0.0.1", "196.201.214.200", proxies)) == "196.201.214.200"
    assert str(caller_ip("127.0.0.1", "196.201.214.200, 10.1.2.3", proxies)) == "196.201.214.200"
    assert str(caller_ip("127.0.0.1", "196.201.214.200, 6.6.6.6", proxies)) == "6.6.6.6"
    assert caller_ip("127.0.0.1", "garbage", proxies) is None
    assert str(caller_ip("::ffff:127.0.0.1", "196.201.214.200", proxies)) == "196.201.214.200"
    allowed = networks(["196.201.214.0/24"])
    assert is_allowed(caller_ip("127.0.0.1", "196.201.214.200", proxies), allowed)
    assert not is_allowed(None, allowed)
    assert is_allowed(None, [])


def test_settings_address_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_MPESA_ALLOWED_IPS", "196.201.214.0/24, 196.201.213.114")
    monkeypatch.setenv("CDC_TRUSTED_PROXIES", "")
    loaded = load_settings()
    assert loaded.mpesa_allowed_ips == ["196.201.214.0/24", "196.201.213.114"]
    assert loaded.trusted_proxies == []
    monkeypatch.delenv("CDC_MPESA_ALLOWED_IPS")
    assert Settings(_env_file=None).mpesa_allowed_ips == []  # type: ignore[call-arg]
    monkeypatch.setenv("CDC_TRUSTED_PROXIES", "nginx")
    with pytest.raises(ConfigError, match="CDC_TRUSTED_PROXIES"):
        load_settings()
