"""Recording one webhook: one transaction that writes the payment, its provider transaction, the client
ledger row, the client and the booking's payment status, or nothing at all.

Idempotency does not rely on looking before inserting. Every path first takes a transaction-scoped advisory
lock on the payment's provider key (the Paystack reference, the M-Pesa receipt or CheckoutRequestID), so
concurrent deliveries of one payment run one after the other, and the second finds the first's committed
rows. The insert still names the unique key (`on conflict (provider, provider_reference) do nothing`, and
the unique `mpesa_receipt` index) so a writer that does not take our locks (the business's own app) cannot
make a double: that case rolls back and is retried from the top. Locks are always taken in the order
payment key → client key → booking row, so concurrent webhooks cannot deadlock one another; a deadlock
with some other writer is retried too.

A duplicate (the payment is already in the state the webhook reports) writes nothing: its raw body was
stored when the payment was first recorded. A refund is an event of its own, not a state of its payment (one
payment may be refunded several times, in parts): it is a duplicate when its own reference is already in
`payment_transactions`. An event that names no known business or payment is kept in `payment_transactions`
with a null business and payment: it is in no business's figures.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from ..db import AsyncConnection
from ..db.locks import LockKey
from ..sqlfiles import queries
from .mpesa import CURRENCY as MPESA_CURRENCY
from .mpesa import PROVIDER as MPESA
from .mpesa import C2BPayment, StkResult
from .paystack import PROVIDER as PAYSTACK
from .paystack import PaystackCharge, PaystackRefund
from .wire import is_full_phone_number, optional_uuid

__all__ = ["Outcome", "Recorded", "record_c2b", "record_paystack_charge", "record_paystack_refund", "record_stk"]

log = logging.getLogger(__name__)

Outcome = Literal["recorded", "failed", "refunded", "duplicate", "merged", "unattributed"]

# Enough to get past every dead connection an idle pool may hold after a server restart, and a deadlock.
_ATTEMPTS = 6
_RETRYABLE = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.UniqueViolationError,
    # A pooled connection that died (server restart, terminated backend, network cut): retry on a fresh one.
    # Safe even when the commit itself may have happened: recording is idempotent, the retry finds it.
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.InterfaceError,
    # What asyncpg raises when the server's goodbye arrives while it starts the next command.
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
)


@dataclass(frozen=True)
class Recorded:
    """What a webhook did to the tables."""

    outcome: Outcome
    payment_id: uuid.UUID | None = None
    business_id: uuid.UUID | None = None


class _LostRace(Exception):
    """Another writer inserted the same provider key outside our locks; the attempt is retried."""


def _q() -> dict[str, str]:
    return queries("ingest")


async def _in_transaction(
    pool: asyncpg.Pool, work: Callable[[AsyncConnection], Awaitable[Recorded]], *, acquire_timeout: float = 5.0
) -> Recorded:
    for attempt in range(1, _ATTEMPTS + 1):
        async with pool.acquire(timeout=acquire_timeout) as conn:
            try:
                async with conn.transaction():
                    return await work(conn)
            except (*_RETRYABLE, _LostRace) as exc:
                if attempt == _ATTEMPTS:
                    raise
                log.info("ingest: retrying after %s", type(exc).__name__, extra={"attempt": attempt})
            except TimeoutError:
                # A statement timed out: the path to the server is dead or frozen. Returning the connection to
                # the pool would first wait for a cancellation the server may never acknowledge; drop it now.
                with contextlib.suppress(asyncpg.InterfaceError):  # already closed and handed back to the pool
                    conn.terminate()
                raise
    raise AssertionError("unreachable")


async def _lock(conn: AsyncConnection, key: str) -> None:
    await conn.execute(_q()["lock_key"], key, LockKey.INGEST_PAYMENT_KEY)


async def _client(
    conn: AsyncConnection, *, business_id: uuid.UUID, email: str | None, phone: str | None, name: str
) -> uuid.UUID | None:
    """The client paying `business_id`, found or created.

    By email (Paystack, case-insensitive), else by phone when it is a full number: both name one person,
    whichever business they pay. A masked or hashed MSISDN (C2B) is shared by thousands of people: it matches
    only a client who already paid this business with the same number and the same name, and with no name to
    compare it matches nobody (else one business's payer would show on another's dashboard under a stranger's
    name).
    """
    q = _q()
    if email:
        await _lock(conn, f"client:email:{email.lower()}")
        found = await conn.fetchval(q["client_by_email"], email)
    elif phone and is_full_phone_number(phone):
        await _lock(conn, f"client:phone:{phone}")
        found = await conn.fetchval(q["client_by_phone"], phone)
    elif phone and name:
        await _lock(conn, f"client:masked:{business_id}:{phone}:{name}")
        found = await conn.fetchval(q["client_by_masked_phone"], business_id, phone, name)
    elif phone:
        found = None
    else:
        return None
    if found is not None:
        return uuid.UUID(str(found))
    created = await conn.fetchval(q["insert_client"], name, phone, email)
    return uuid.UUID(str(created))


async def _booking(conn: AsyncConnection, booking_id: uuid.UUID | None, business_id: uuid.UUID) -> uuid.UUID | None:
    """The booking, locked, when it exists and belongs to the business (metadata is not trusted further)."""
    if booking_id is None:
        return None
    found = await conn.fetchval(_q()["lock_booking"], booking_id, business_id)
    return None if found is None else uuid.UUID(str(found))


async def _refresh_booking(conn: AsyncConnection, booking_id: Any) -> None:
    if booking_id is not None:
        await conn.execute(_q()["lock_booking_row"], booking_id)
        await conn.execute(_q()["refresh_booking_payment_status"], booking_id)


async def _audit(
    conn: AsyncConnection,
    *,
    business_id: Any,
    payment_id: Any,
    provider: str,
    amount_minor: int,
    currency: str,
    status: str,
    raw: str,
    provider_reference: str | None = None,
) -> bool:
    """The provider row holding the raw body; False when one with this provider_reference is already there."""
    written = await conn.fetchval(
        _q()["insert_payment_transaction"],
        business_id,
        payment_id,
        provider,
        amount_minor,
        currency,
        status,
        raw,
        provider_reference,
    )
    return written is not None


async def _ledger(
    conn: AsyncConnection,
    *,
    business_id: Any,
    client_id: Any,
    payment_id: Any,
    kind: str,
    amount: int,
    currency: str,
) -> None:
    await conn.execute(_q()["insert_ledger"], business_id, client_id, payment_id, kind, amount, currency)


async def _new_payment(
    conn: AsyncConnection,
    *,
    business_id: uuid.UUID,
    client_id: uuid.UUID | None,
    booking_id: uuid.UUID | None,
    amount_minor: int,
    currency: str,
    method: str,
    provider: str,
    reference: str,
    receipt: str | None,
    paid_at: datetime | None,
    raw: str,
) -> uuid.UUID:
    """Insert a completed payment with its provider transaction and ledger row; refresh the booking."""
    payment_id = await conn.fetchval(
        _q()["insert_payment"],
        business_id,
        client_id,
        booking_id,
        amount_minor,
        currency,
        method,
        provider,
        reference,
        receipt,
        paid_at,
    )
    if payment_id is None:
        raise _LostRace
    await _audit(
        conn,
        business_id=business_id,
        payment_id=payment_id,
        provider=provider,
        amount_minor=amount_minor,
        currency=currency,
        status="completed",
        raw=raw,
    )
    await _ledger(
        conn,
        business_id=business_id,
        client_id=client_id,
        payment_id=payment_id,
        kind="payment",
        amount=amount_minor,
        currency=currency,
    )
    await _refresh_booking(conn, booking_id)
    return uuid.UUID(str(payment_id))


async def _complete_pending(
    conn: AsyncConnection,
    row: asyncpg.Record,
    *,
    client_id: uuid.UUID | None,
    booking_id: uuid.UUID | None,
    amount_minor: int,
    currency: str,
    paid_at: datetime | None,
    receipt: str | None,
    provider: str,
    raw: str,
) -> Recorded:
    """A payment the app created as pending (or that failed before) is now paid."""
    await conn.execute(
        _q()["complete_payment"], row["id"], amount_minor, currency, paid_at, client_id, booking_id, receipt
    )
    await _audit(
        conn,
        business_id=row["business_id"],
        payment_id=row["id"],
        provider=provider,
        amount_minor=amount_minor,
        currency=currency,
        status="completed",
        raw=raw,
    )
    await _ledger(
        conn,
        business_id=row["business_id"],
        client_id=client_id,
        payment_id=row["id"],
        kind="payment",
        amount=amount_minor,
        currency=currency,
    )
    await _refresh_booking(conn, booking_id)
    if row["booking_id"] is not None and row["booking_id"] != booking_id:
        await _refresh_booking(conn, row["booking_id"])
    return Recorded("recorded", row["id"], row["business_id"])


async def _unattributed(
    conn: AsyncConnection,
    *,
    provider: str,
    amount_minor: int,
    currency: str,
    status: str,
    raw: str,
    provider_reference: str | None = None,
) -> Recorded:
    written = await _audit(
        conn,
        business_id=None,
        payment_id=None,
        provider=provider,
        amount_minor=amount_minor,
        currency=currency,
        status=status,
        raw=raw,
        provider_reference=provider_reference,
    )
    return Recorded("unattributed" if written else "duplicate")


# -- Paystack ------------------------------------------------------------------------------------------------


async def _paystack_business(conn: AsyncConnection, charge: PaystackCharge) -> uuid.UUID | None:
    """The business a new charge pays, or None (kept unattributed).

    The subaccount is set by the business's Paystack integration; metadata by whoever opens the checkout, which
    with Paystack Inline is the payer's browser. So the subaccount decides, and metadata.business_id counts
    only when the event names no subaccount, or agrees with it. A disagreement (including a subaccount no
    business has) moves the money to nobody rather than to the wrong business, and is logged for whoever
    sorts it out.
    """
    q = _q()
    if charge.subaccount_code:
        found = await conn.fetchval(q["business_by_subaccount"], charge.subaccount_code)
        owner = None if found is None else uuid.UUID(str(found))
        if charge.business_id is not None and charge.business_id != owner:
            log.warning(
                "ingest: Paystack metadata.business_id and subaccount disagree; kept unattributed",
                extra={
                    "reference": charge.reference,
                    "subaccount_code": charge.subaccount_code,
                    "subaccount_business_id": str(owner) if owner else None,
                    "metadata_business_id": str(charge.business_id),
                },
            )
            return None
        return owner
    if charge.business_id is not None and await conn.fetchval(q["business_exists"], charge.business_id):
        return charge.business_id
    return None


async def record_paystack_charge(pool: asyncpg.Pool, charge: PaystackCharge, raw: str) -> Recorded:
    """`charge.success`: the payment with this reference is completed (created, or moved from pending)."""

    async def work(conn: AsyncConnection) -> Recorded:
        q = _q()
        await _lock(conn, f"{PAYSTACK}:{charge.reference}")
        row = await conn.fetchrow(q["payment_by_reference"], PAYSTACK, charge.reference)
        if row is not None and row["status"] in ("completed", "refunded"):
            return Recorded("duplicate", row["id"], row["business_id"])
        if row is not None:
            client_id = row["client_id"] or await _client(
                conn, business_id=row["business_id"], email=charge.email, phone=charge.phone, name=charge.customer_name
            )
            booking_id = row["booking_id"] or await _booking(conn, charge.booking_id, row["business_id"])
            return await _complete_pending(
                conn,
                row,
                client_id=client_id,
                booking_id=booking_id,
                amount_minor=charge.amount_minor,
                currency=charge.currency,
                paid_at=charge.paid_at,
                receipt=None,
                provider=PAYSTACK,
                raw=raw,
            )
        business_id = await _paystack_business(conn, charge)
        if business_id is None:
            return await _unattributed(
                conn,
                provider=PAYSTACK,
                amount_minor=charge.amount_minor,
                currency=charge.currency,
                status="completed",
                raw=raw,
            )
        client_id = await _client(
            conn, business_id=business_id, email=charge.email, phone=charge.phone, name=charge.customer_name
        )
        booking_id = await _booking(conn, charge.booking_id, business_id)
        payment_id = await _new_payment(
            conn,
            business_id=business_id,
            client_id=client_id,
            booking_id=booking_id,
            amount_minor=charge.amount_minor,
            currency=charge.currency,
            method=PAYSTACK,
            provider=PAYSTACK,
            reference=charge.reference,
            receipt=None,
            paid_at=charge.paid_at,
            raw=raw,
        )
        return Recorded("recorded", payment_id, business_id)

    return await _in_transaction(pool, work)


def _refund_key(refund: PaystackRefund) -> str:
    """The refund's `payment_transactions.provider_reference`: its own reference, apart from charge references."""
    return f"refund:{refund.refund_reference}"


async def record_paystack_refund(pool: asyncpg.Pool, refund: PaystackRefund, raw: str) -> Recorded:
    """`refund.processed`: nets the refund out of the completed charge it points back to, once per refund.

    Idempotent on the refund's own reference, not on the payment's state: one payment may be refunded several
    times, in parts, and each part's body is kept. The refund's provider row is written first, under the
    unique (provider, provider_reference): a redelivery writes nothing there, so it writes nothing at all.
    """
    key = _refund_key(refund)

    async def _refund_unattributed(conn: AsyncConnection) -> Recorded:
        return await _unattributed(
            conn,
            provider=PAYSTACK,
            amount_minor=refund.amount_minor,
            currency=refund.currency,
            status="refunded",
            raw=raw,
            provider_reference=key,
        )

    async def work(conn: AsyncConnection) -> Recorded:
        # The charge's own key: a refund waits for the charge's delivery, and refunds of one payment for each
        # other, so each sees what the one before left.
        await _lock(conn, f"{PAYSTACK}:{refund.transaction_reference}")
        row = await conn.fetchrow(_q()["payment_by_reference"], PAYSTACK, refund.transaction_reference)
        if row is None or row["status"] not in ("completed", "refunded"):
            # A refund of a charge we never saw complete moves no money we counted: kept for audit only.
            return await _refund_unattributed(conn)
        if row["currency"] != refund.currency:
            # Paystack refunds in the charge's currency: this cannot be netted out of the payment's amount.
            log.warning(
                "ingest: refund currency differs from the payment's; kept unattributed",
                extra={"payment_id": str(row["id"]), "refund_reference": refund.refund_reference},
            )
            return await _refund_unattributed(conn)
        # A payment already `refunded` has nothing left, whatever refunded_minor says (rows refunded in full
        # before the column existed have 0 there).
        left = 0 if row["status"] == "refunded" else row["amount_minor"] - row["refunded_minor"]
        applied = min(refund.amount_minor, left)
        written = await _audit(
            conn,
            business_id=row["business_id"],
            payment_id=row["id"],
            provider=PAYSTACK,
            amount_minor=applied,
            currency=refund.currency,
            status="refunded",
            raw=raw,
            provider_reference=key,
        )
        if not written:
            return Recorded("duplicate", row["id"], row["business_id"])
        if applied < refund.amount_minor:
            # Answered 200 all the same: the refund happened at Paystack, which would retry anything else for 72
            # hours; the figures cannot go below zero for this payment, and the body is kept for whoever checks.
            log.warning(
                "ingest: refund of more than what is left of the payment; refunded only what was left",
                extra={
                    "payment_id": str(row["id"]),
                    "refund_reference": refund.refund_reference,
                    "amount_minor": refund.amount_minor,
                    "applied_minor": applied,
                },
            )
        if applied > 0:
            await conn.execute(_q()["refund_payment"], row["id"], applied)
            await _ledger(
                conn,
                business_id=row["business_id"],
                client_id=row["client_id"],
                payment_id=row["id"],
                kind="refund",
                amount=applied,
                currency=refund.currency,
            )
            await _refresh_booking(conn, row["booking_id"])
        return Recorded("refunded", row["id"], row["business_id"])

    return await _in_transaction(pool, work)


# -- M-Pesa --------------------------------------------------------------------------------------------------


async def _stk_success(conn: AsyncConnection, row: asyncpg.Record, result: StkResult, raw: str) -> Recorded:
    assert result.receipt is not None and result.amount_minor is not None
    q = _q()
    await _lock(conn, f"{MPESA}:receipt:{result.receipt}")
    other = await conn.fetchrow(q["payment_by_receipt"], result.receipt)
    if other is not None and other["business_id"] != row["business_id"]:
        # One receipt cannot pay two businesses: a shortcode or CheckoutRequestID is misconfigured somewhere.
        # Change neither business's figures; keep the body for whoever sorts it out.
        log.warning(
            "ingest: STK receipt already recorded for another business; kept unattributed",
            extra={"receipt": result.receipt, "payment_id": str(other["id"]), "pending_payment_id": str(row["id"])},
        )
        return await _unattributed(
            conn, provider=MPESA, amount_minor=result.amount_minor, currency=MPESA_CURRENCY, status="completed", raw=raw
        )
    if other is not None and other["id"] != row["id"]:
        # The C2B confirmation of this very payment came first. The app's payment (the pending row it created
        # to start the push) is the one that stays: the app knows its id. It takes over the C2B payment's
        # provider and ledger rows (the money was counted once, by the C2B), the C2B row goes, and the pending
        # row is completed, all in this transaction: the figures never count the payment twice or drop it.
        client_id = row["client_id"] or other["client_id"]
        booking_id = row["booking_id"] or other["booking_id"]
        await conn.execute(q["move_payment_transactions"], row["id"], other["id"])
        await conn.execute(q["move_ledger"], row["id"], other["id"], client_id)
        await conn.execute(q["delete_payment"], other["id"])
        await conn.execute(
            q["complete_payment"],
            row["id"],
            result.amount_minor,
            MPESA_CURRENCY,
            result.paid_at or other["paid_at"],
            client_id,
            booking_id,
            result.receipt,
        )
        await _refresh_booking(conn, booking_id)
        if other["booking_id"] is not None and other["booking_id"] != booking_id:
            await _refresh_booking(conn, other["booking_id"])
        log.info(
            "ingest: C2B payment merged into the STK payment with the same receipt",
            extra={"receipt": result.receipt, "payment_id": str(row["id"]), "removed_payment_id": str(other["id"])},
        )
        return Recorded("merged", row["id"], row["business_id"])
    client_id = row["client_id"] or await _client(
        conn, business_id=row["business_id"], email=None, phone=result.phone, name=""
    )
    return await _complete_pending(
        conn,
        row,
        client_id=client_id,
        booking_id=row["booking_id"],
        amount_minor=result.amount_minor,
        currency=MPESA_CURRENCY,
        paid_at=result.paid_at,
        receipt=result.receipt,
        provider=MPESA,
        raw=raw,
    )


async def record_stk(pool: asyncpg.Pool, result: StkResult, raw: str) -> Recorded:
    """STK push result: the pending payment whose provider_reference is the CheckoutRequestID is completed
    (ResultCode 0) or failed (any other code)."""

    async def work(conn: AsyncConnection) -> Recorded:
        await _lock(conn, f"{MPESA}:checkout:{result.checkout_request_id}")
        row = await conn.fetchrow(_q()["payment_by_reference"], MPESA, result.checkout_request_id)
        if row is None and result.receipt is not None:
            # A repeat of a result that was merged into the C2B payment (its pending row is gone): the receipt
            # still says it is recorded.
            await _lock(conn, f"{MPESA}:receipt:{result.receipt}")
            known = await conn.fetchrow(_q()["payment_by_receipt"], result.receipt)
            if known is not None:
                return Recorded("duplicate", known["id"], known["business_id"])
        if row is None:
            return await _unattributed(
                conn,
                provider=MPESA,
                amount_minor=result.amount_minor or 0,
                currency=MPESA_CURRENCY,
                status="completed" if result.succeeded else "failed",
                raw=raw,
            )
        if row["status"] in ("completed", "refunded"):
            return Recorded("duplicate", row["id"], row["business_id"])
        if result.succeeded:
            return await _stk_success(conn, row, result, raw)
        if row["status"] == "failed":
            return Recorded("duplicate", row["id"], row["business_id"])
        await conn.execute(_q()["fail_payment"], row["id"])
        await _audit(
            conn,
            business_id=row["business_id"],
            payment_id=row["id"],
            provider=MPESA,
            amount_minor=row["amount_minor"],
            currency=row["currency"],
            status="failed",
            raw=raw,
        )
        return Recorded("failed", row["id"], row["business_id"])

    return await _in_transaction(pool, work)


async def record_c2b(pool: asyncpg.Pool, payment: C2BPayment, raw: str) -> Recorded:
    """C2B confirmation: a completed payment to the business that owns the shortcode, keyed by TransID."""

    async def work(conn: AsyncConnection) -> Recorded:
        q = _q()
        await _lock(conn, f"{MPESA}:receipt:{payment.trans_id}")
        existing = await conn.fetchrow(q["payment_by_receipt"], payment.trans_id)
        if existing is None:
            existing = await conn.fetchrow(q["payment_by_reference"], MPESA, payment.trans_id)
        if existing is not None:
            return Recorded("duplicate", existing["id"], existing["business_id"])
        found = await conn.fetchval(q["business_by_shortcode"], payment.shortcode)
        if found is None:
            return await _unattributed(
                conn,
                provider=MPESA,
                amount_minor=payment.amount_minor,
                currency=MPESA_CURRENCY,
                status="completed",
                raw=raw,
            )
        business_id = uuid.UUID(str(found))
        client_id = await _client(conn, business_id=business_id, email=None, phone=payment.msisdn, name=payment.name)
        # A paybill account number that spells one of the business's bookings pays that booking.
        booking_id = await _booking(conn, optional_uuid(payment.bill_ref), business_id)
        payment_id = await _new_payment(
            conn,
            business_id=business_id,
            client_id=client_id,
            booking_id=booking_id,
            amount_minor=payment.amount_minor,
            currency=MPESA_CURRENCY,
            method=MPESA,
            provider=MPESA,
            reference=payment.trans_id,
            receipt=payment.trans_id,
            paid_at=payment.paid_at,
            raw=raw,
        )
        return Recorded("recorded", payment_id, business_id)

    return await _in_transaction(pool, work)
