"""Paystack webhooks: the signature, and the two events we record (`charge.success`, `refund.processed`).

Paystack signs the raw body: `x-paystack-signature` is the lowercase hex HMAC-SHA512 of the exact bytes
received, keyed with the secret key. The body has no event id; charges are deduplicated on `data.reference`;
refunds point back to their charge with `data.transaction_reference` and are deduplicated on their own
`data.refund_reference`. Amounts are already in subunits.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .wire import (
    currency_code,
    iso_timestamp,
    minor_units,
    obj,
    optional_text,
    optional_uuid,
    required_text,
)

__all__ = ["PaystackCharge", "PaystackEvent", "PaystackOther", "PaystackRefund", "parse_event", "sign", "verify"]

PROVIDER = "paystack"


def sign(secret: str, body: bytes) -> str:
    """The signature Paystack would send for `body` (used by `simulate` and the tests)."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha512).hexdigest()


def verify(secret: str, body: bytes, signature: str | None) -> bool:
    """Whether `signature` is the body's HMAC-SHA512 under `secret`, compared in constant time."""
    if not signature:
        return False
    expected = sign(secret, body).encode("ascii")
    return hmac.compare_digest(expected, signature.strip().encode("utf-8", "replace"))


@dataclass(frozen=True)
class PaystackCharge:
    reference: str
    amount_minor: int
    currency: str
    paid_at: datetime | None
    email: str | None
    customer_name: str
    phone: str | None
    business_id: uuid.UUID | None  # data.metadata.business_id, when it spells a UUID
    booking_id: uuid.UUID | None  # data.metadata.booking_id, idem
    subaccount_code: str | None


@dataclass(frozen=True)
class PaystackRefund:
    transaction_reference: str  # the charge's data.reference
    refund_reference: str  # this refund's own key: one payment may be refunded several times, in parts
    amount_minor: int
    currency: str


@dataclass(frozen=True)
class PaystackOther:
    """An event we acknowledge without recording (transfer.*, subscription.*, ...)."""

    event: str


PaystackEvent = PaystackCharge | PaystackRefund | PaystackOther


def _metadata(value: Any) -> dict[str, Any]:
    # Paystack sends an object, 0, "" or null, and some integrations send the object JSON-encoded as a string.
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            return {}
        return decoded if isinstance(decoded, dict) else {}
    return {}


def _customer_name(customer: dict[str, Any]) -> str:
    parts = [optional_text(customer.get(k), f"data.customer.{k}") for k in ("first_name", "last_name")]
    return " ".join(p for p in parts if p)[:200]


def _charge(data: dict[str, Any]) -> PaystackCharge:
    customer = data.get("customer")
    customer = customer if isinstance(customer, dict) else {}
    subaccount = data.get("subaccount")
    subaccount = subaccount if isinstance(subaccount, dict) else {}
    metadata = _metadata(data.get("metadata"))
    email = optional_text(customer.get("email"), "data.customer.email", max_length=320)
    paid_at_field = "data.paid_at" if data.get("paid_at") is not None else "data.paidAt"
    return PaystackCharge(
        reference=required_text(data.get("reference"), "data.reference"),
        amount_minor=minor_units(data.get("amount"), "data.amount", scale=1),
        currency=currency_code(data.get("currency"), "data.currency"),
        paid_at=iso_timestamp(data.get(paid_at_field.removeprefix("data.")), paid_at_field),
        email=email,  # as given; clients are matched case-insensitively
        customer_name=_customer_name(customer),
        phone=optional_text(customer.get("phone"), "data.customer.phone", max_length=40),
        business_id=optional_uuid(metadata.get("business_id")),
        booking_id=optional_uuid(metadata.get("booking_id")),
        subaccount_code=optional_text(subaccount.get("subaccount_code"), "data.subaccount.subaccount_code"),
    )


def _refund(data: dict[str, Any]) -> PaystackRefund:
    return PaystackRefund(
        transaction_reference=required_text(data.get("transaction_reference"), "data.transaction_reference"),
        # Required: without it a second refund of the payment cannot be told from a redelivery of the first.
        refund_reference=required_text(data.get("refund_reference"), "data.refund_reference"),
        amount_minor=minor_units(data.get("amount"), "data.amount", scale=1),
        currency=currency_code(data.get("currency"), "data.currency"),
    )


def parse_event(doc: Any) -> PaystackEvent:
    """The event a verified body describes; BadPayload when a recorded event lacks what we need."""
    body = obj(doc, "body")
    event = required_text(body.get("event"), "event")
    if event == "charge.success":
        return _charge(obj(body.get("data"), "data"))
    if event == "refund.processed":
        return _refund(obj(body.get("data"), "data"))
    return PaystackOther(event)
