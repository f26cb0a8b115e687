"""M-Pesa (Safaricom Daraja) callbacks: the STK push result and the C2B validation/confirmation.

M-Pesa signs nothing; the callback URLs carry a secret path token (see `sources` for the IP allow-list).
Amounts are whole shillings or `1.00`-style numbers (x 100 -> minor units, exactly); times are
`YYYYMMDDHHmmss` in Kenyan time. Numbers may arrive as strings and empty strings as null.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .wire import BadPayload, eat_timestamp, minor_units, obj, optional_text, required_text

__all__ = ["C2BPayment", "StkResult", "parse_c2b", "parse_stk", "token_matches"]

PROVIDER = "mpesa"
CURRENCY = "KES"
SCALE = 100  # shillings -> cents


def token_matches(expected: str, given: str) -> bool:
    """The path token compared in constant time."""
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8", "replace"))


@dataclass(frozen=True)
class StkResult:
    checkout_request_id: str
    result_code: int
    result_desc: str
    # Present when result_code == 0:
    receipt: str | None
    amount_minor: int | None
    paid_at: datetime | None
    phone: str | None

    @property
    def succeeded(self) -> bool:
        return self.result_code == 0


@dataclass(frozen=True)
class C2BPayment:
    trans_id: str
    amount_minor: int
    paid_at: datetime | None
    shortcode: str
    msisdn: str | None
    name: str
    bill_ref: str | None


def _result_code(value: Any) -> int:
    text = required_text(value, "Body.stkCallback.ResultCode", max_length=12)
    try:
        return int(text)
    except ValueError:
        raise BadPayload("Body.stkCallback.ResultCode must be an integer") from None


def _items(metadata: Any) -> dict[str, Any]:
    # [{"Name": "Amount", "Value": 1.00}, ..., {"Name": "Balance"}]: a Value may be absent.
    items = obj(metadata, "Body.stkCallback.CallbackMetadata").get("Item")
    if not isinstance(items, list):
        raise BadPayload("Body.stkCallback.CallbackMetadata.Item must be a list")
    values: dict[str, Any] = {}
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("Name"), str):
            values[item["Name"]] = item.get("Value")
    return values


def parse_stk(doc: Any) -> StkResult:
    callback = obj(obj(obj(doc, "body").get("Body"), "Body").get("stkCallback"), "Body.stkCallback")
    checkout = required_text(callback.get("CheckoutRequestID"), "Body.stkCallback.CheckoutRequestID")
    code = _result_code(callback.get("ResultCode"))
    desc = optional_text(callback.get("ResultDesc"), "Body.stkCallback.ResultDesc", max_length=1000) or ""
    if code != 0:
        return StkResult(checkout, code, desc, None, None, None, None)
    values = _items(callback.get("CallbackMetadata"))
    where = "Body.stkCallback.CallbackMetadata"
    return StkResult(
        checkout_request_id=checkout,
        result_code=code,
        result_desc=desc,
        receipt=required_text(values.get("MpesaReceiptNumber"), f"{where} MpesaReceiptNumber", max_length=64),
        amount_minor=minor_units(values.get("Amount"), f"{where} Amount", scale=SCALE),
        paid_at=eat_timestamp(values.get("TransactionDate"), f"{where} TransactionDate"),
        phone=optional_text(values.get("PhoneNumber"), f"{where} PhoneNumber", max_length=100),
    )


def parse_c2b(doc: Any) -> C2BPayment:
    body = obj(doc, "body")
    names = [optional_text(body.get(k), k) for k in ("FirstName", "MiddleName", "LastName")]
    return C2BPayment(
        trans_id=required_text(body.get("TransID"), "TransID", max_length=64),
        amount_minor=minor_units(body.get("TransAmount"), "TransAmount", scale=SCALE),
        paid_at=eat_timestamp(body.get("TransTime"), "TransTime"),
        shortcode=required_text(body.get("BusinessShortCode"), "BusinessShortCode", max_length=20),
        # As given: v2 masks it ("2547 ***** 126"), v1 sends a SHA-256 hash.
        msisdn=optional_text(body.get("MSISDN"), "MSISDN", max_length=100),
        name=" ".join(n for n in names if n)[:200],
        bill_ref=optional_text(body.get("BillRefNumber"), "BillRefNumber", max_length=200),
    )
