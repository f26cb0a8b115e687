"""Every refused request is counted by reason and logged once, in one place.

Two paths lead here: the app's HTTPException handler (gateway/app.py; every route but the webhooks) and the
webhooks' own reject helper (gateway/webhooks.py). Each calls `record`, which

- counts `cdc_gateway_rejected_requests_total{reason}` (Prometheus), `reason` from the small fixed set
  `Reason` below, so the label cannot grow with what clients send;
- logs one line: method, route template (`/v1/businesses/{business_id}/events`, never the path, which can hold
  the M-Pesa callback token, nor the query string, which can hold `access_token`), status, reason, client
  address, and the message the client got (messages never repeat a token or a signature).

Naming the reason of a new refusal: `raise Rejected(400, "from is out of range", reason="bad_request")`, with
a reason added to `Reason` when none fits. A plain `HTTPException` is counted too, by its status
(`REASON_BY_STATUS`): a new 400 needs no change here to be counted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal, get_args

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

from .addresses import client_address
from .state import gateway_state

__all__ = ["REASONS", "REASON_BY_STATUS", "Reason", "Rejected", "reason_of", "record", "route_template"]

log = logging.getLogger(__name__)

Reason = Literal[
    # any route
    "bad_request",  # 400: a parameter or id out of range or malformed
    "unauthorized",  # 401: token missing, forged, malformed or expired
    "forbidden",  # 403: the token does not name the business, or is not an admin token
    "not_found",  # 404: no such business, or no such route
    "method_not_allowed",  # 405
    "too_large",  # 413: a webhook body over 1 MB
    "rate_limited",  # 429: the client address is over its rate limit
    "stream_cap",  # 429: the token holds CDC_MAX_STREAMS_PER_TOKEN streams already
    "refresh_cooldown",  # 429: the business was refreshed less than CDC_REFRESH_COOLDOWN_SECONDS ago
    "over_capacity",  # 503: CDC_MAX_CONNECTIONS streams are open
    "draining",  # 503: the gateway is shutting down
    "unavailable",  # 503: the database cannot be reached, or the gateway is starting
    # webhooks
    "bad_signature",  # 401: x-paystack-signature does not match the body
    "bad_token",  # 401: unknown M-Pesa callback token
    "address_not_allowed",  # 403: the M-Pesa caller is not in CDC_MPESA_ALLOWED_IPS
    "bad_body",  # 400: the body is not what the provider sends
    "not_configured",  # 503: the provider's secret is not set
    "other",  # any other status
]
REASONS: tuple[Reason, ...] = get_args(Reason)

REASON_BY_STATUS: Mapping[int, Reason] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    429: "rate_limited",
    503: "unavailable",
}


class Rejected(HTTPException):
    """An HTTPException that names its reason for the metrics and the log (else it is told by the status)."""

    def __init__(
        self, status_code: int, detail: str, *, reason: Reason, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(status_code, detail, headers=headers)
        self.reason: Reason = reason


def reason_of(exc: HTTPException) -> Reason:
    if isinstance(exc, Rejected):
        return exc.reason
    return REASON_BY_STATUS.get(exc.status_code, "other")


def route_template(request: HTTPConnection) -> str:
    """The matched route's path template; "-" when no route matched (the raw path may hold a secret)."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "-"


def record(
    request: HTTPConnection, status: int, reason: Reason, message: str, *, what: str = "request", **fields: object
) -> None:
    """Count and log one refused request (see the module's docstring for what is never logged)."""
    gateway_state(request).metrics.rejected_requests.labels(reason).inc()
    address = client_address(request)
    log.warning(
        "%s rejected: %s",
        what,
        message[:300],
        extra={
            "method": request.scope.get("method", "GET"),
            "route": route_template(request),
            "status": status,
            "reason": reason,
            "client": str(address) if address is not None else None,
            **fields,
        },
    )
