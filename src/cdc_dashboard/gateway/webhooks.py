"""Gateway routes: payment provider webhooks (Paystack, M-Pesa STK and C2B).

Each request is checked in this order, and a rejected one records nothing: its client address is within
CDC_RATE_LIMIT_WEBHOOKS_PER_MINUTE (else 429 with Retry-After), the provider is configured (else 503), the
M-Pesa caller is allowed (403) and knows the path token (401), the body is at most 1 MB (413), the Paystack
signature matches the raw bytes (401), the body parses into what we record (400). Database trouble answers 503
so the provider retries; nothing here answers 500. Every refusal is counted and logged by reason
(gateway/rejections.py). Recording is in `cdc_dashboard.ingest`.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..ingest import mpesa, paystack
from ..ingest.recording import Recorded, record_c2b, record_paystack_charge, record_paystack_refund, record_stk
from ..ingest.sources import is_allowed
from ..ingest.wire import BadPayload, load_json
from . import rejections
from .addresses import client_address, nets, rate_limit_key
from .database import describe_error, outage_retry_after
from .limits import retry_after
from .rejections import Reason
from .state import gateway_state

__all__ = ["MAX_BODY_BYTES", "routes"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
C2B_ACCEPTED = {"ResultCode": "0", "ResultDesc": "Accepted"}
STK_ACCEPTED = {"ResultCode": 0, "ResultDesc": "Accepted"}


class _WebhookMetrics:
    """`cdc_webhooks_total{provider,result}` and `cdc_webhook_seconds{provider}`, on the app's own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.answers = Counter(
            "cdc_webhooks",
            "webhook answers by provider and result (recorded, duplicate, ..., or the HTTP status of a refusal)",
            ["provider", "result"],
            registry=registry,
        )
        self.seconds = Histogram(
            "cdc_webhook_seconds",
            "time to answer a webhook, body read to response",
            ["provider"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
            registry=registry,
        )


_metrics_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _WebhookMetrics] = weakref.WeakKeyDictionary()


def _observe(request: Request, provider: str, result: str, started: float) -> None:
    registry = gateway_state(request).metrics.registry
    metrics = _metrics_by_registry.get(registry)
    if metrics is None:
        metrics = _metrics_by_registry[registry] = _WebhookMetrics(registry)
    metrics.answers.labels(provider, result).inc()
    metrics.seconds.labels(provider).observe(time.perf_counter() - started)


class _Rejected(Exception):
    def __init__(self, status: int, message: str, reason: Reason) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason: Reason = reason


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _Rejected(413, f"body is larger than {MAX_BODY_BYTES} bytes", "too_large")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _Rejected(413, f"body is larger than {MAX_BODY_BYTES} bytes", "too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise _Rejected(400, "client disconnected before the body was complete", "bad_body") from None
    return b"".join(chunks)


def _check_mpesa_caller(request: Request) -> None:
    settings = gateway_state(request).settings
    expected = settings.mpesa_callback_token
    if not expected:
        raise _Rejected(
            503, "M-Pesa callbacks are not configured (CDC_MPESA_CALLBACK_TOKEN is unset)", "not_configured"
        )
    allowed = nets(tuple(settings.mpesa_allowed_ips))
    if allowed:
        address = client_address(request)
        if not is_allowed(address, allowed):
            raise _Rejected(403, f"source address {address} is not in CDC_MPESA_ALLOWED_IPS", "address_not_allowed")
    if not mpesa.token_matches(expected, str(request.path_params.get("token", ""))):
        raise _Rejected(401, "unknown callback token", "bad_token")


def _rejection(
    provider: str,
    request: Request,
    status: int,
    message: str,
    reason: Reason,
    headers: dict[str, str] | None = None,
    error: str | None = None,
) -> Response:
    # Counted and logged like every refusal (the route template, never the path: for M-Pesa it holds the token).
    # `error` (the log's, never the client's) is what went wrong underneath, e.g. the database error of a 503.
    fields: dict[str, object] = {"provider": provider} if error is None else {"provider": provider, "error": error}
    rejections.record(request, status, reason, message, what="webhook", **fields)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _record(
    provider: str, request: Request, work: Callable[[asyncpg.Pool], Awaitable[Recorded]]
) -> Recorded | Response:
    pool = gateway_state(request).pool
    if pool is None:
        retry = {"Retry-After": outage_retry_after()}
        return _rejection(provider, request, 503, "database is not available", "unavailable", retry)
    started = time.perf_counter()
    try:
        recorded = await work(pool)
    except (asyncpg.exceptions.DataError, asyncpg.exceptions.CheckViolationError) as exc:
        return _rejection(provider, request, 400, f"body cannot be stored: {type(exc).__name__}", "bad_body")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        retry = {"Retry-After": outage_retry_after()}
        message = "database is not available; retry later"
        return _rejection(provider, request, 503, message, "unavailable", retry, describe_error(exc))
    except Exception:
        # A bug must not cost a payment: 503 makes the provider deliver again once it is fixed.
        log.exception("webhook not recorded (unexpected error)", extra={"provider": provider})
        return _rejection(provider, request, 503, "could not record the webhook; retry later", "unavailable")
    request.scope["cdc.webhook_outcome"] = recorded.outcome
    log.info(
        "webhook %s",
        recorded.outcome,
        extra={
            "provider": provider,
            "outcome": recorded.outcome,
            "payment_id": str(recorded.payment_id) if recorded.payment_id else None,
            "business_id": str(recorded.business_id) if recorded.business_id else None,
            "ms": round((time.perf_counter() - started) * 1000, 1),
        },
    )
    return recorded


def _never_500(
    provider: str,
) -> Callable[[Callable[[Request], Awaitable[Response]]], Callable[[Request], Awaitable[Response]]]:
    """A bug in parsing must not become a 500 either: log it with its traceback and answer 503, so the
    provider delivers again once it is fixed."""

    def wrap(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(endpoint)
        async def guarded(request: Request) -> Response:
            started = time.perf_counter()
            # First, before the body is read or a signature computed: a flood from one address stops here.
            limiter = gateway_state(request).limits.webhooks
            wait = limiter.take(rate_limit_key(client_address(request)))
            try:
                if wait is not None:
                    headers = {"Retry-After": retry_after(wait)}
                    message = "too many webhook requests from this address"
                    response = _rejection(provider, request, 429, message, "rate_limited", headers)
                else:
                    response = await endpoint(request)
            except Exception:
                log.exception("webhook failed unexpectedly", extra={"provider": provider})
                response = JSONResponse({"error": "could not process the webhook; retry later"}, status_code=503)
            result = request.scope.get("cdc.webhook_outcome") if response.status_code == 200 else None
            _observe(request, provider, str(result or response.status_code), started)
            return response

        return guarded

    return wrap


@_never_500(paystack.PROVIDER)
async def paystack_webhook(request: Request) -> Response:
    provider = paystack.PROVIDER
    try:
        secret = gateway_state(request).settings.paystack_secret_key
        if not secret:
            raise _Rejected(
                503, "Paystack webhooks are not configured (CDC_PAYSTACK_SECRET_KEY is unset)", "not_configured"
            )
        body = await _read_body(request)
        if not paystack.verify(secret, body, request.headers.get("x-paystack-signature")):
            raise _Rejected(401, "x-paystack-signature does not match the body", "bad_signature")
        doc, raw = load_json(body)
        event = paystack.parse_event(doc)
    except _Rejected as exc:
        return _rejection(provider, request, exc.status, exc.message, exc.reason)
    except BadPayload as exc:
        return _rejection(provider, request, 400, str(exc), "bad_body")
    if isinstance(event, paystack.PaystackOther):
        log.info("webhook acknowledged, not recorded", extra={"provider": provider, "event": event.event[:100]})
        request.scope["cdc.webhook_outcome"] = "ignored"
        return JSONResponse({"received": True, "outcome": "ignored"})
    if isinstance(event, paystack.PaystackCharge):
        charge = event
        result = await _record(provider, request, lambda pool: record_paystack_charge(pool, charge, raw))
    else:
        refund = event
        result = await _record(provider, request, lambda pool: record_paystack_refund(pool, refund, raw))
    if isinstance(result, Response):
        return result
    return JSONResponse({"received": True, "outcome": result.outcome})


async def _mpesa_body(request: Request) -> tuple[Any, str]:
    _check_mpesa_caller(request)
    return load_json(await _read_body(request))


@_never_500(mpesa.PROVIDER)
async def mpesa_stk(request: Request) -> Response:
    provider = mpesa.PROVIDER
    try:
        doc, raw = await _mpesa_body(request)
        result = mpesa.parse_stk(doc)
    except _Rejected as exc:
        return _rejection(provider, request, exc.status, exc.message, exc.reason)
    except BadPayload as exc:
        return _rejection(provider, request, 400, str(exc), "bad_body")
    recorded = await _record(provider, request, lambda pool: record_stk(pool, result, raw))
    return recorded if isinstance(recorded, Response) else JSONResponse(STK_ACCEPTED)


@_never_500(mpesa.PROVIDER)
async def mpesa_c2b_validation(request: Request) -> Response:
    """Accept every well-formed payment: validation happens before the money moves, so nothing is recorded."""
    provider = mpesa.PROVIDER
    try:
        doc, _raw = await _mpesa_body(request)
        mpesa.parse_c2b(doc)
        request.scope["cdc.webhook_outcome"] = "validated"
    except _Rejected as exc:
        return _rejection(provider, request, exc.status, exc.message, exc.reason)
    except BadPayload as exc:
        return _rejection(provider, request, 400, str(exc), "bad_body")
    return JSONResponse(C2B_ACCEPTED)


@_never_500(mpesa.PROVIDER)
async def mpesa_c2b_confirmation(request: Request) -> Response:
    provider = mpesa.PROVIDER
    try:
        doc, raw = await _mpesa_body(request)
        payment = mpesa.parse_c2b(doc)
    except _Rejected as exc:
        return _rejection(provider, request, exc.status, exc.message, exc.reason)
    except BadPayload as exc:
        return _rejection(provider, request, 400, str(exc), "bad_body")
    recorded = await _record(provider, request, lambda pool: record_c2b(pool, payment, raw))
    return recorded if isinstance(recorded, Response) else JSONResponse(C2B_ACCEPTED)


routes: list[BaseRoute] = [
    Route("/v1/webhooks/paystack", paystack_webhook, methods=["POST"], name="webhook_paystack"),
    Route("/v1/webhooks/mpesa/{token}/stk", mpesa_stk, methods=["POST"], name="webhook_mpesa_stk"),
    Route(
        "/v1/webhooks/mpesa/{token}/c2b/validation",
        mpesa_c2b_validation,
        methods=["POST"],
        name="webhook_mpesa_c2b_validation",
    ),
    Route(
        "/v1/webhooks/mpesa/{token}/c2b/confirmation",
        mpesa_c2b_confirmation,
        methods=["POST"],
        name="webhook_mpesa_c2b_confirmation",
    ),
]
