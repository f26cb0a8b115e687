"""Wire values: JSON bodies, exact amounts, provider timestamps and the loose typing providers send.

Everything here raises `BadPayload` (answered 400, nothing recorded) for input we cannot record faithfully;
it never guesses a number or a time.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow, Underflow, localcontext
from typing import Any

__all__ = [
    "EAT",
    "MAX_AMOUNT_MINOR",
    "BadPayload",
    "currency_code",
    "eat_timestamp",
    "is_full_phone_number",
    "iso_timestamp",
    "load_json",
    "minor_units",
    "obj",
    "optional_text",
    "optional_uuid",
    "required_text",
]

# The most one payment may be, in minor units: the reference schema's bound on payments.amount_minor
# (DESIGN, "Reference schema"). A webhook past it is a 400 naming the field, before anything is written, rather
# than a check violation from the table (or, without the table's check, figures that overflow).
MAX_AMOUNT_MINOR = 10**12
# Kenya has kept UTC+3 without daylight saving since 1960; M-Pesa times carry no zone marker.
EAT = timezone(timedelta(hours=3), "EAT")

_CURRENCY = re.compile(r"^[A-Z]{3}$")
_EAT_STAMP = re.compile(r"^\d{14}$")
_NUMBER = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?$")
# A phone number that names one line: digits with an optional leading +, E.164's length at most. C2B v2 masks
# the MSISDN ("2547 ***** 126") and v1 sends its SHA-256 (64 hex characters): neither matches. The same pattern
# is in sql/schema/0011_split_masked_clients.sql.
_FULL_PHONE_NUMBER = re.compile(r"^\+?[0-9]{7,15}$")


class BadPayload(ValueError):
    """The body cannot be recorded as it is; the message says why (it is sent back and logged)."""


def _reject_constant(name: str) -> Any:
    raise BadPayload(f"not JSON: {name} is not a number")


def _storable(value: Any) -> None:
    # PostgreSQL's jsonb refuses NUL characters and lone surrogates that Python's json accepts; reject them
    # here so such a body is a 400, not a failed insert.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise BadPayload("not storable: a string contains \\u0000")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BadPayload("not storable: a string contains an unpaired surrogate") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def load_json(body: bytes) -> tuple[Any, str]:
    """The parsed document (floats as Decimal, so amounts stay exact) and the body text stored as `raw`."""
    try:
        # A byte-order mark is not JSON, but some Windows-side senders add one; it carries no meaning.
        text = body.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise BadPayload("body is not UTF-8") from None
    try:
        doc = json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadPayload(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BadPayload("not JSON: nested too deeply") from None
    except ValueError:
        # Python refuses integers of more than 4300 digits (CVE-2020-10735 guard) with a plain ValueError.
        raise BadPayload("not JSON: a number has too many digits") from None
    _storable(doc)
    return doc, text


def obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadPayload(f"{where} must be an object")
    return value


def required_text(value: Any, where: str, *, max_length: int = 200) -> str:
    """A non-empty identifier; numbers are accepted as their decimal text (providers mix the two)."""
    text = optional_text(value, where, max_length=max_length)
    if not text:
        raise BadPayload(f"{where} is missing")
    return text


def optional_text(value: Any, where: str, *, max_length: int = 200) -> str | None:
    """A string, a whole number as text, or None for null/""/absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadPayload(f"{where} must be a string")
    if isinstance(value, Decimal) and not value.is_finite():
        raise BadPayload(f"{where} must be a string")
    # Checked before converting: int() of 1e999999999 would take the process down with it.
    if (isinstance(value, Decimal) and value.adjusted() >= max_length) or (
        isinstance(value, int) and abs(value) >= 10**max_length
    ):
        raise BadPayload(f"{where} is longer than {max_length} characters")
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, Decimal) and value == value.to_integral_value():
        text = str(int(value))
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise BadPayload(f"{where} must be a string")
    if len(text) > max_length:
        raise BadPayload(f"{where} is longer than {max_length} characters")
    return text or None


def optional_uuid(value: Any) -> uuid.UUID | None:
    """A UUID when the value spells one, else None (metadata is free-form: not an error)."""
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        return None


def minor_units(value: Any, where: str, *, scale: int) -> int:
    """An exact payment amount in minor units: `value` (a JSON number or a numeric string) times `scale`.

    Refused rather than rounded or clamped: a fraction of a minor unit, zero or less (no money moved, or a
    sign a provider never sends), and more than MAX_AMOUNT_MINOR.
    """
    if isinstance(value, bool) or value is None:
        raise BadPayload(f"{where} is missing" if value is None else f"{where} must be a number")
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, Decimal):
        amount = value
    elif isinstance(value, str):
        text = value.strip()
        if not _NUMBER.match(text.removeprefix("-")):
            raise BadPayload(f"{where} must be a number (got {value[:40]!r})")
        try:
            amount = Decimal(text)
        except InvalidOperation:
            raise BadPayload(f"{where} must be a number") from None
    else:
        raise BadPayload(f"{where} must be a number")
    if not amount.is_finite():
        raise BadPayload(f"{where} must be a number")
    given = str(value).strip()[:40]
    if amount <= 0:
        raise BadPayload(f"{where} must be more than zero (got {given})")
    # Compared before multiplying (the division is exact for a scale of 1 or 100): an absurd exponent such as
    # 1e999999999 would overflow the product.
    if amount > Decimal(MAX_AMOUNT_MINOR) / scale:
        raise BadPayload(f"{where} is too large: at most {MAX_AMOUNT_MINOR} minor units (got {given})")
    try:
        # Exact or an error: an inexact or underflowing product (1e-999999999) must not round to a number.
        with localcontext(Context(prec=60, traps=[Inexact, Underflow, Overflow, InvalidOperation])):
            minor = amount * scale
            whole = minor == minor.to_integral_value()
    except ArithmeticError:
        raise BadPayload(f"{where} is not a usable number") from None
    if not whole:
        raise BadPayload(f"{where} has a fraction of a minor unit ({str(value)[:40]})")
    return int(minor)


def is_full_phone_number(phone: str) -> bool:
    """Whether `phone` is a whole number (2547XXXXXXXX, +2547XXXXXXXX), not a masked or hashed MSISDN."""
    return _FULL_PHONE_NUMBER.match(phone) is not None


def currency_code(value: Any, where: str) -> str:
    text = required_text(value, where, max_length=3).upper()
    if not _CURRENCY.match(text):
        raise BadPayload(f"{where} must be an ISO 4217 code such as KES")
    return text


def eat_timestamp(value: Any, where: str) -> datetime | None:
    """M-Pesa's `YYYYMMDDHHmmss` (a number or a string) in Kenyan time, as an aware UTC datetime."""
    text = optional_text(value, where, max_length=20)
    if text is None:
        return None
    if not _EAT_STAMP.match(text):
        raise BadPayload(f"{where} must be YYYYMMDDHHmmss (got {text!r})")
    try:
        return datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=EAT).astimezone(UTC)
    except (ValueError, OverflowError):
        raise BadPayload(f"{where} is not a valid time (got {text!r})") from None


def iso_timestamp(value: Any, where: str) -> datetime | None:
    """An ISO 8601 time (Paystack's `2025-02-11T10:42:20.000Z`) as an aware UTC datetime; naive means UTC."""
    text = optional_text(value, where, max_length=40)
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text)
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError):
        raise BadPayload(f"{where} is not an ISO 8601 time (got {text!r})") from None
