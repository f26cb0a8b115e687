"""`cdc-dashboard simulate`: realistic payment traffic for demos and load tests.

Signed Paystack webhooks and M-Pesa callbacks against a running gateway, or (`--direct`) the same payloads
handed straight to `cdc_dashboard.ingest`, which is what the gateway would do with them. Around them, the
simulator plays the businesses' own app: it opens bookings and starts STK pushes (a pending payment keyed by
CheckoutRequestID) in the database, as a real app does before the provider calls back.

The mix: new and returning clients, bookings paid in full or by deposit, Paystack and M-Pesa (STK and paybill
C2B), failed and cancelled pushes, the occasional duplicate delivery and the same M-Pesa receipt arriving by
STK and by C2B, and now and then a refund.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import string
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

import aiohttp
import asyncpg

from ..config import Settings
from ..errors import UserError
from ..ingest import mpesa, paystack
from ..ingest.recording import Recorded, record_c2b, record_paystack_charge, record_paystack_refund, record_stk
from ..ingest.wire import EAT, BadPayload, load_json
from ..ops.probe import PROBE_BUSINESS_ID
from ..sqlfiles import queries

__all__ = ["SimulateOptions", "SimulationThread", "Tally", "run_simulation", "simulate"]

_FIRST = ["Achieng", "Wanjiku", "Kamau", "Otieno", "Njeri", "Mwangi", "Akinyi", "Kiprop", "Chebet", "Mutua"]
_FIRST += ["Adaeze", "Chinedu", "Ngozi", "Tunde", "Funmi", "Emeka", "Bisi", "Ifeoma", "Segun", "Zainab"]
_LAST = ["Odhiambo", "Kariuki", "Wambui", "Mutiso", "Okafor", "Adeyemi", "Balogun", "Eze", "Nwosu", "Kiplagat"]
_PRICES_MAJOR = {"KES": [500, 800, 1500, 2500, 3500, 5000], "NGN": [5000, 12000, 25000, 40000]}
_STK_FAILURES = [(1032, "Request cancelled by user"), (1, "The balance is insufficient for the transaction."),
                 (2001, "The initiator information is invalid.")]  # fmt: skip


@dataclass(frozen=True)
class SimulateOptions:
    rate: float = 2.0  # activities per second
    duration: float = 0.0  # seconds; 0 runs until stopped
    businesses: int = 3
    direct: bool = False
    url: str | None = None  # gateway base URL; default http://CDC_HTTP_HOST:CDC_HTTP_PORT
    seed: int | None = None
    progress: bool = True


@dataclass
class Tally:
    """What happened so far; `outcomes` counts the recording outcomes the gateway (or ingest) reported."""

    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    rejected: int = 0  # 4xx answers: a bug in the simulator or a misconfigured gateway
    errors: int = 0  # 5xx, timeouts, refused connections
    latencies: list[float] = field(default_factory=list)
    last_error: str | None = None

    def line(self, elapsed: float) -> str:
        ordered = sorted(self.latencies[-2000:])
        p95 = f"{ordered[int(len(ordered) * 0.95) - 1 if len(ordered) > 1 else 0] * 1000:.0f} ms" if ordered else "-"
        o = self.outcomes
        return (
            f"simulate {elapsed:6.1f}s  sent {self.sent} ({self.sent / max(elapsed, 1e-9):.1f}/s)  "
            f"recorded {o['recorded']}  duplicate {o['duplicate'] + o['merged']}  failed {o['failed']}  "
            f"refunded {o['refunded']}  unattributed {o['unattributed']}  rejected {self.rejected}  "
            f"errors {self.errors}  p95 {p95}" + (f"  last error: {self.last_error}" if self.last_error else "")
        )


@dataclass
class _Business:
    id: uuid.UUID
    shortcode: str | None
    currency: str
    clients: list[tuple[str | None, str | None, str]]  # (email, phone, name) of returning clients


class _Sender(Protocol):
    """Delivers one provider payload; returns the outcome (or None when it was refused)."""

    async def paystack(self, body: bytes) -> str | None: ...

    async def mpesa(self, kind: str, body: bytes) -> str | None: ...


class _WebhookSender:
    def __init__(self, session: aiohttp.ClientSession, url: str, secret: str, token: str, tally: Tally) -> None:
        self.session, self.url, self.secret, self.token, self.tally = session, url.rstrip("/"), secret, token, tally

    async def _post(self, path: str, body: bytes, headers: dict[str, str]) -> dict[str, Any] | None:
        started = time.perf_counter()
        try:
            async with self.session.post(self.url + path, data=body, headers=headers) as response:
                answer = await response.json(content_type=None)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.tally.errors += 1
            self.tally.last_error = f"{path.split('/')[3]}: {type(exc).__name__}: {exc}"[:200]
            return None
        self.tally.latencies.append(time.perf_counter() - started)
        if status >= 400:
            reason = answer.get("error") if isinstance(answer, dict) else None
            self.tally.last_error = f"{path.split('/')[3]}: HTTP {status} {reason or ''}".strip()[:200]
            if status >= 500:
                self.tally.errors += 1
            else:
                self.tally.rejected += 1
            return None
        return answer if isinstance(answer, dict) else {}

    async def paystack(self, body: bytes) -> str | None:
        headers = {"content-type": "application/json", "x-paystack-signature": paystack.sign(self.secret, body)}
        answer = await self._post("/v1/webhooks/paystack", body, headers)
        return None if answer is None else str(answer.get("outcome", "recorded"))

    async def mpesa(self, kind: str, body: bytes) -> str | None:
        answer = await self._post(f"/v1/webhooks/mpesa/{self.token}/{kind}", body, {"content-type": "application/json"})
        # M-Pesa answers carry no outcome; the simulator knows what it sent.
        return None if answer is None else "accepted"


class _DirectSender:
    """The gateway's work without HTTP: parse, then record through cdc_dashboard.ingest."""

    def __init__(self, pool: asyncpg.Pool, tally: Tally) -> None:
        self.pool, self.tally = pool, tally

    async def _run(self, body: bytes, record: Any) -> str | None:
        started = time.perf_counter()
        try:
            doc, raw = load_json(body)
            recorded: Recorded | None = await record(doc, raw)
        except BadPayload:
            self.tally.rejected += 1
            return None
        except (asyncpg.PostgresError, OSError, TimeoutError):
            self.tally.errors += 1
            return None
        self.tally.latencies.append(time.perf_counter() - started)
        return recorded.outcome if recorded else "ignored"

    async def paystack(self, body: bytes) -> str | None:
        async def record(doc: Any, raw: str) -> Recorded | None:
            event = paystack.parse_event(doc)
            if isinstance(event, paystack.PaystackCharge):
                return await record_paystack_charge(self.pool, event, raw)
            if isinstance(event, paystack.PaystackRefund):
                return await record_paystack_refund(self.pool, event, raw)
            return None

        return await self._run(body, record)

    async def mpesa(self, kind: str, body: bytes) -> str | None:
        async def record(doc: Any, raw: str) -> Recorded | None:
            if kind == "stk":
                return await record_stk(self.pool, mpesa.parse_stk(doc), raw)
            return await record_c2b(self.pool, mpesa.parse_c2b(doc), raw)

        return await self._run(body, record)


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


class _Traffic:
    """Invents one activity at a time: a client paying a business, by some method, sometimes twice."""

    def __init__(self, rng: random.Random, pool: asyncpg.Pool, sender: _Sender, tally: Tally) -> None:
        self.rng, self.pool, self.sender, self.tally = rng, pool, sender, tally
        self.paystack_paid: list[tuple[str, int, str]] = []  # (reference, amount, currency) refundable
        self.q = queries("simulate")

    # -- people and identifiers --

    def _client(self, business: _Business) -> tuple[str | None, str | None, str]:
        if business.clients and self.rng.random() < 0.6:
            return self.rng.choice(business.clients)
        first, last = self.rng.choice(_FIRST), self.rng.choice(_LAST)
        email = f"{first}.{last}{self.rng.randint(1, 9999)}@example.com".lower()
        phone = f"2547{self.rng.randint(10000000, 99999999)}"
        client = (email, phone, f"{first} {last}")
        business.clients.append(client)
        return client

    def _ref(self, prefix: str, length: int, alphabet: str = string.digits) -> str:
        return prefix + "".join(self.rng.choice(alphabet) for _ in range(length))

    def _price_minor(self, currency: str) -> int:
        return self.rng.choice(_PRICES_MAJOR.get(currency, _PRICES_MAJOR["KES"])) * 100

    async def _booking(self, business: _Business, due_minor: int) -> uuid.UUID:
        return uuid.UUID(
            str(await self.pool.fetchval(self.q["create_booking"], business.id, due_minor, business.currency))
        )

    async def _deliver(self, kind: str, body: bytes, *, counted: str | None = None) -> None:
        self.tally.sent += 1
        outcome = await (self.sender.paystack(body) if kind == "paystack" else self.sender.mpesa(kind, body))
        if outcome is not None:
            self.tally.outcomes[counted if (counted and outcome == "accepted") else outcome] += 1

    async def _maybe_again(self, kind: str, body: bytes) -> None:
        # Providers retry; a few deliveries arrive twice, a moment apart.
        if self.rng.random() < 0.08:
            await asyncio.sleep(self.rng.uniform(0.05, 1.0))
            await self._deliver(kind, body, counted="duplicate")

    # -- activities --

    async def one(self, businesses: list[_Business]) -> None:
        business = self.rng.choice(businesses)
        roll = self.rng.random()
        if roll < 0.03 and self.paystack_paid:
            await self._refund()
        elif business.currency != "KES" or roll < 0.40:
            await self._paystack(business)
        elif roll < 0.75 or not business.shortcode:
            await self._stk(business)
        else:
            await self._c2b(business)

    async def _paystack(self, business: _Business) -> None:
        email, phone, name = self._client(business)
        price = self._price_minor(business.currency)
        metadata: dict[str, Any] = {"business_id": str(business.id)}
        amount = price
        if self.rng.random() < 0.4:
            amount = price if self.rng.random() < 0.8 else price // 2  # a deposit now and then
            metadata["booking_id"] = str(await self._booking(business, price))
        reference = self._ref("T", 15)
        first, _, last = name.partition(" ")
        body = _dumps(
            {
                "event": "charge.success",
                "data": {
                    "id": self.rng.randint(10**9, 10**10),
                    "status": "success",
                    "reference": reference,
                    "amount": str(amount) if self.rng.random() < 0.2 else amount,
                    "currency": business.currency,
                    "paid_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "channel": self.rng.choice(["card", "mobile_money", "bank_transfer"]),
                    "metadata": metadata,
                    "customer": {"first_name": first, "last_name": last, "email": email, "phone": phone},
                    "subaccount": {},
                },
            }
        )
        await self._deliver("paystack", body)
        self.paystack_paid.append((reference, amount, business.currency))
        await self._maybe_again("paystack", body)

    async def _refund(self) -> None:
        reference, amount, currency = self.paystack_paid.pop(self.rng.randrange(len(self.paystack_paid)))
        body = _dumps(
            {
                "event": "refund.processed",
                "data": {
                    "status": "processed",
                    "transaction_reference": reference,
                    "refund_reference": self._ref("", 12),
                    "amount": str(amount),
                    "currency": currency,
                },
            }
        )
        await self._deliver("paystack", body)

    async def _stk(self, business: _Business) -> None:
        _email, phone, _name = self._client(business)
        price = self._price_minor("KES")
        booking = await self._booking(business, price) if self.rng.random() < 0.5 else None
        checkout = f"ws_CO_{datetime.now(EAT):%d%m%Y%H%M%S}{self.rng.randint(100000, 999999)}"
        await self.pool.execute(self.q["start_stk_push"], business.id, booking, price, checkout)
        await asyncio.sleep(self.rng.uniform(0.2, 2.0))  # the client types the PIN
        callback: dict[str, Any] = {"MerchantRequestID": self._ref("", 5) + "-" + self._ref("", 8) + "-1",
                                    "CheckoutRequestID": checkout}  # fmt: skip
        receipt = self._ref("S", 9, string.ascii_uppercase + string.digits)
        if self.rng.random() < 0.15:
            code, desc = self.rng.choice(_STK_FAILURES)
            callback.update(ResultCode=code, ResultDesc=desc)
        else:
            callback.update(ResultCode=0, ResultDesc="The service request is processed successfully.")
            callback["CallbackMetadata"] = {
                "Item": [
                    {"Name": "Amount", "Value": price // 100},
                    {"Name": "MpesaReceiptNumber", "Value": receipt},
                    {"Name": "Balance"},
                    {"Name": "TransactionDate", "Value": int(f"{datetime.now(EAT):%Y%m%d%H%M%S}")},
                    {"Name": "PhoneNumber", "Value": int(phone) if phone and phone.isdigit() else phone},
                ]
            }
        body = _dumps({"Body": {"stkCallback": callback}})
        counted = "recorded" if callback["ResultCode"] == 0 else "failed"
        await self._deliver("stk", body, counted=counted)
        if callback["ResultCode"] == 0 and business.shortcode and self.rng.random() < 0.1:
            # The paybill also confirms it by C2B: the same receipt, recorded once.
            await self._deliver(
                "c2b/confirmation", self._c2b_body(business, price, receipt, phone), counted="duplicate"
            )
        else:
            await self._maybe_again("stk", body)

    def _c2b_body(self, business: _Business, price: int, receipt: str, phone: str | None) -> bytes:
        masked = f"{phone[:4]} ***** {phone[-3:]}" if phone and len(phone) > 7 else phone
        return _dumps(
            {
                "TransactionType": "Pay Bill",
                "TransID": receipt,
                "TransTime": f"{datetime.now(EAT):%Y%m%d%H%M%S}",
                "TransAmount": f"{price // 100}.00",
                "BusinessShortCode": business.shortcode,
                "BillRefNumber": self._ref("INV", 5),
                "InvoiceNumber": None if self.rng.random() < 0.5 else "",
                "OrgAccountBalance": "",
                "ThirdPartyTransID": "",
                "MSISDN": masked,
                "FirstName": self.rng.choice(_FIRST).upper(),
                "MiddleName": None,
                "LastName": "",
            }
        )

    async def _c2b(self, business: _Business) -> None:
        _email, phone, _name = self._client(business)
        receipt = self._ref("S", 9, string.ascii_uppercase + string.digits)
        body = self._c2b_body(business, self._price_minor("KES"), receipt, phone)
        await self._deliver("c2b/confirmation", body, counted="recorded")
        await self._maybe_again("c2b/confirmation", body)


async def _businesses(pool: asyncpg.Pool, count: int, rng: random.Random) -> list[_Business]:
    q = queries("simulate")
    rows = [
        (r["id"], r["mpesa_shortcode"], r["currency"])
        for r in await pool.fetch(q["businesses"], count, PROBE_BUSINESS_ID)
    ]
    for n in range(len(rows), count):
        shortcode = str(rng.randint(100000, 999999))
        created = await pool.fetchval(q["create_business"], f"Simulated Business {n + 1}", shortcode)
        if created is not None:
            rows.append((created, shortcode, "KES"))
    found = []
    for business_id, shortcode, currency in rows:
        clients = [(r["email"], r["phone"], r["name"]) for r in await pool.fetch(q["returning_clients"], business_id)]
        found.append(_Business(uuid.UUID(str(business_id)), shortcode, currency, clients))
    return found


async def simulate(
    settings: Settings,
    options: SimulateOptions,
    *,
    stop: asyncio.Event | None = None,
    out: TextIO = sys.stderr,
) -> Tally:
    """Run the traffic until `options.duration` elapses or `stop` is set; return the tally."""
    if options.rate <= 0:
        raise UserError("--rate must be positive")
    if not options.direct and not (settings.paystack_secret_key and settings.mpesa_callback_token):
        raise UserError(
            "simulating webhooks needs CDC_PAYSTACK_SECRET_KEY and CDC_MPESA_CALLBACK_TOKEN (the gateway's own "
            "values); or use --direct to record without the gateway"
        )
    rng = random.Random(options.seed)
    tally = Tally()
    stop = stop or asyncio.Event()
    try:
        pool = await asyncpg.create_pool(settings.require_database_url(), min_size=1, max_size=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise UserError(f"cannot connect to the database: {exc}") from None
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        try:
            businesses = await _businesses(pool, max(options.businesses, 1), rng)
        except asyncpg.UndefinedTableError:
            raise UserError("the database has no cdc-dashboard schema: run `cdc-dashboard db apply` first") from None
        if options.direct:
            sender: _Sender = _DirectSender(pool, tally)
        else:
            url = options.url or f"http://{settings.http_host}:{settings.http_port}"
            assert settings.paystack_secret_key and settings.mpesa_callback_token
            sender = _WebhookSender(session, url, settings.paystack_secret_key, settings.mpesa_callback_token, tally)
        traffic = _Traffic(rng, pool, sender, tally)
        await _drive(traffic, businesses, options, stop, tally, out)
    finally:
        await session.close()
        await pool.close()
    return tally


async def _drive(
    traffic: _Traffic,
    businesses: list[_Business],
    options: SimulateOptions,
    stop: asyncio.Event,
    tally: Tally,
    out: TextIO,
) -> None:
    started = time.monotonic()
    deadline = started + options.duration if options.duration > 0 else None
    tasks: set[asyncio.Task[None]] = set()
    in_flight = asyncio.Semaphore(200)  # a stalled gateway must not grow memory without bound
    next_progress = started
    tty = out.isatty()

    async def activity() -> None:
        async with in_flight:
            try:
                await traffic.one(businesses)
            except Exception as exc:  # counted and shown: one broken activity must not stop the traffic
                tally.errors += 1
                tally.last_error = f"{type(exc).__name__}: {exc}"[:200]

    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        task = asyncio.create_task(activity())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        now = time.monotonic()
        if options.progress and now >= next_progress:
            print(("\r" if tty else "") + tally.line(now - started), end="" if tty else "\n", file=out, flush=True)
            next_progress = now + (1.0 if tty else 5.0)
        # Poisson arrivals: realistic bursts rather than a metronome.
        delay = traffic.rng.expovariate(options.rate)
        if deadline is not None:
            delay = min(delay, max(deadline - time.monotonic(), 0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
    if tasks:
        await asyncio.wait(tasks, timeout=15)
    if options.progress:
        print(("\r" if tty else "") + tally.line(time.monotonic() - started), file=out, flush=True)


def run_simulation(settings: Settings, options: SimulateOptions) -> int:
    """The `simulate` command: runs until the duration ends or Ctrl-C; exit 1 when deliveries failed."""
    try:
        tally = asyncio.run(simulate(settings, options))
    except KeyboardInterrupt:
        return 130
    return 1 if tally.errors or tally.rejected else 0


class SimulationThread:
    """`simulate` in a background thread with its own event loop, for callers that are not async
    (`cdc-dashboard run` keeps the demo dashboard moving with it). `stop()` ends it and returns the tally."""

    def __init__(self, settings: Settings, options: SimulateOptions) -> None:
        self._args = (settings, options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self.tally: Tally | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="cdc-simulate", daemon=True)

    def start(self) -> SimulationThread:
        self._thread.start()
        self._ready.wait(timeout=10)
        return self

    def _main(self) -> None:
        async def body() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            self.tally = await simulate(*self._args, stop=self._stop)

        try:
            asyncio.run(body())
        except BaseException as exc:  # kept for the caller: a thread has nobody else to tell
            self.error = exc
        finally:
            self._ready.set()

    def stop(self, timeout: float = 20.0) -> Tally | None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            # The loop may close between the check and the call; then there is nothing left to stop.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        return self.tally
