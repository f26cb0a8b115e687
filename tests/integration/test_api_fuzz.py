"""schemathesis fuzzes every operation of the OpenAPI document against a live gateway: no 5xx, and every
response conforms to the document (status code, content type, headers, body).

The gateway is `cdc-dashboard serve` in its own process (real uvicorn over HTTP) on a database with the demo
data, with both webhook providers configured. Each operation runs twice: with an admin token and with a
business token (pytest parameter `who`).

Generated values reach past the authorisation checks where it matters (`_aim`): a generated business id is
replaced, for some cases, by a demo business (the business token's own, or another one), the M-Pesa path token
by the configured one, and the Paystack signature by the body's real signature. The other cases keep what
schemathesis generated, so 401/403/404 are fuzzed too.

The event stream never ends by itself, so its requests carry a token that expires within a second: the
gateway ends the stream then (`: token expired`), after the replay of the events after `Last-Event-ID`.
schemathesis reads the stream to its end and checks each event against the document's event schema.

Per operation, schemathesis runs its coverage phase (boundary and type-confusion values of every parameter,
derived from the document) and `MAX_EXAMPLES` random cases, valid and invalid. Deterministic for CI:
hypothesis is derandomized (the same cases every run) and keeps no example database. Budget: under a minute
on two cores, most of it the event streams (about half a second each, waiting for their token to expire).

Random generation rarely hits the edges of a type, so `test_inputs_at_the_edges_get_a_documented_answer`
sends a table of them (year 9999 and year 1, bigint + 1, odd business id spellings, an absurd token expiry)
through the same checks.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from cdc_dashboard.db import with_database
from cdc_dashboard.demo.seed import load_demo
from cdc_dashboard.gateway.openapi import document
from cdc_dashboard.ingest.paystack import sign
from cdc_dashboard.tokens import create_token

from ..pg import clone_database, drop_database
from .gateway_support import SECRET, free_port, serve_subprocess

PAYSTACK_KEY = "sk_test_fuzz_" + "p" * 20
MPESA_TOKEN = "mpesa-fuzz-" + "m" * 20
MAX_EXAMPLES = 12

CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": 16,
        # The gateway ignores query parameters and headers it does not know, as HTTP APIs do: an extra one is
        # not "invalid data" that must get a 4xx.
        "generation": {"deterministic": True, "database": "none", "allow-extra-parameters": False},
        # Stateful runs (links between operations) are out of scope: each request is judged on its own.
        "phases": {"stateful": {"enabled": False}},
    }
)
SCHEMA = schemathesis.openapi.from_dict(document(), config=CONFIG)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    # A request the document says is invalid (a limit of 0, a cursor of the wrong type...) must get a 4xx.
    negative_data_rejection,
    missing_required_header,
    # Another method on a documented path: 405 (the coverage phase sends them).
    unsupported_method,
    # An operation that needs a token answers 401 without one.
    ignored_auth,
]


@dataclass(frozen=True)
class Target:
    url: str
    # The demo businesses: the business token names the first; the second is another business's.
    businesses: list[str]


@pytest.fixture(scope="module")
def target(admin_url: str, template_db: str) -> Iterator[Target]:
    name = clone_database(admin_url, template_db)
    db_url = with_database(admin_url, name)
    try:
        businesses = [str(business_id) for business_id, _ in load_demo(db_url, days=14)]
        port = free_port()
        env = {
            "CDC_PAYSTACK_SECRET_KEY": PAYSTACK_KEY,
            "CDC_MPESA_CALLBACK_TOKEN": MPESA_TOKEN,
            # Issue 16's refresh cooldown (ignored by a gateway without it): off, so fuzzed refreshes run.
            "CDC_REFRESH_COOLDOWN_SECONDS": "0",
        }
        with serve_subprocess(db_url, port, **env):
            url = f"http://127.0.0.1:{port}"
            # A refresh appends an invalidation: the streams then have events to replay (and to check).
            admin = {"Authorization": f"Bearer {create_token(SECRET, [], 600, admin=True)}"}
            for business in businesses[:2]:
                refresh = SCHEMA["/v1/businesses/{business_id}/refresh"]["POST"].Case(
                    path_parameters={"business_id": business}
                )
                response = refresh.call(base_url=url, headers=admin, timeout=10)
                assert response.status_code == 200, response.text
                refresh.validate_response(response, checks=CHECKS, headers=admin)
            yield Target(url, businesses)
    finally:
        drop_database(admin_url, name)


@pytest.fixture(params=["admin", "business"])
def who(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _token(who: str, target: Target, ttl: int) -> str:
    return create_token(SECRET, [] if who == "admin" else [target.businesses[0]], ttl, admin=who == "admin")


def _pick(value: object, choices: int) -> int:
    """A choice among `choices` that depends only on the generated values: the same case aims the same way."""
    return zlib.crc32(repr(value).encode()) % choices


def _aim(case: Case[Any], target: Target) -> dict[str, Any]:
    """Point some generated cases past authorisation (see the module docstring); the request's extra kwargs."""
    # The whole case decides, not one value: the coverage phase sends many cases with the same business id.
    whole = (case.path_parameters, case.query, case.headers, case.body)
    params = case.path_parameters
    business = params.get("business_id") if params else None
    if params and isinstance(business, str):
        try:
            uuid.UUID(business)
        except ValueError:
            pass  # not a UUID: left for the 400
        else:
            # 0: as generated (unknown business: 403 or 404); 1: the business token's; 2: another's.
            choice = _pick(whole, 3)
            if choice:
                params["business_id"] = target.businesses[choice - 1]
    if params and isinstance(params.get("token"), str) and _pick(whole, 2) == 0:
        params["token"] = MPESA_TOKEN
    if case.operation.path == "/v1/webhooks/paystack" and isinstance(case.body, dict | list | str | int | float):
        # Send the bytes we sign; schemathesis sends `data` as is instead of serialising the body itself.
        raw = json.dumps(case.body).encode()
        signature = case.headers.get("x-paystack-signature") if case.headers is not None else None
        if case.headers is not None and isinstance(signature, str) and _pick(whole, 2) == 0:
            case.headers["x-paystack-signature"] = sign(PAYSTACK_KEY, raw)
        return {"data": raw}
    return {}


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@SCHEMA.parametrize()
def test_every_response_conforms_to_the_document(case: Case[Any], target: Target, who: str) -> None:
    extra = _aim(case, target)
    # The stream ends when its token expires: a second from now (the expiry is a whole second).
    ttl = 1 if case.operation.path.endswith("/events") else 600
    headers = {"Authorization": f"Bearer {_token(who, target, ttl)}"}
    started = time.monotonic()
    response = case.call(base_url=target.url, headers=headers, timeout=10, **extra)
    case.validate_response(response, checks=CHECKS, headers=headers)
    assert time.monotonic() - started < 8, "a request took longer than a few seconds"


# -- inputs at the edges ---------------------------------------------------------------------------------------
# Sent as written, through the same checks. `expect`: the statuses the contract allows (DESIGN: 400 for any
# parameter out of range, never a 5xx). A case the gateway is known to fail gets `known`, saying why: an xfail
# (not strict, so a fix that lands elsewhere first does not turn the suite red; pytest then reports XPASS and the
# `known` goes). The cases of issue 16 all pass since its fixes landed; they guard them now.

_DEMO = "{demo}"  # replaced by the first demo business
_BIG_DAY = "9999-12-31"


@dataclass(frozen=True)
class Edge:
    name: str
    path: str
    query: dict[str, str]
    expect: frozenset[int]
    headers: dict[str, str] | None = None
    business: str = _DEMO
    token_exp: int | None = None  # a token expiring then (epoch seconds) instead of a normal one
    body: dict[str, Any] | None = None  # POSTed (the webhooks), signed for Paystack
    known: str | None = None


def _cursor(at: str) -> str:
    return base64.urlsafe_b64encode(f"{at}|{uuid.UUID(int=1)}".encode()).decode().rstrip("=")


_REVENUE = "/v1/businesses/{business_id}/revenue"
_PAYMENTS = "/v1/businesses/{business_id}/payments"
_EVENTS = "/v1/businesses/{business_id}/events"
_STATS = "/v1/businesses/{business_id}/stats"
_C2B = "/v1/webhooks/mpesa/{token}/c2b/confirmation"
_PAYSTACK = "/v1/webhooks/paystack"
_400 = frozenset({400})


def _c2b(paid: str) -> dict[str, Any]:
    return {"TransID": f"EDGE{paid}", "TransAmount": "10.00", "TransTime": paid, "BusinessShortCode": "174379"}


def _charge(paid: str) -> dict[str, Any]:
    data = {"reference": f"edge-{paid}", "amount": 1000, "currency": "KES", "paid_at": paid}
    return {"event": "charge.success", "data": {**data, "customer": {"email": "edge@example.com"}}}


_200_OR_400 = frozenset({200, 400})

EDGES = [
    Edge("revenue from the last day", _REVENUE, {"from": _BIG_DAY}, _400),
    Edge(
        "revenue of the last month",
        _REVENUE,
        {"granularity": "month", "from": "9999-11-01", "to": "9999-12-31T12:00"},
        _200_OR_400,
    ),
    Edge(
        "revenue to the last hour",
        _REVENUE,
        {"granularity": "hour", "from": "9999-12-31T20:00", "to": "9999-12-31T23:59:59.999999"},
        _200_OR_400,
    ),
    Edge(
        "revenue past year 9999 in UTC",
        _REVENUE,
        {"from": "9999-12-30", "to": "9999-12-31T23:00-12:00"},
        _200_OR_400,
    ),
    Edge(
        "revenue from year 1, hourly",
        _REVENUE,
        {"granularity": "hour", "from": "0001-01-01", "to": "0001-01-02"},
        _200_OR_400,
    ),
    Edge(
        "revenue from year 1, daily",
        _REVENUE,
        {"from": "0001-01-01T00:00Z", "to": "0001-01-03T00:00Z"},
        _200_OR_400,
    ),
    Edge("revenue from year 1 to now", _REVENUE, {"granularity": "month", "from": "0001-01-01"}, _400),
    Edge(
        "cursor in year 1",
        _PAYMENTS,
        {"before": _cursor("0001-01-01T00:00:00+05:00")},
        _200_OR_400,
    ),
    Edge(
        "cursor past year 9999 in UTC",
        _PAYMENTS,
        {"before": _cursor("9999-12-31T23:00:00-05:00")},
        _200_OR_400,
    ),
    Edge("limit with 5000 digits", _PAYMENTS, {"limit": "9" * 5000}, _400),
    Edge("Last-Event-ID above bigint", _EVENTS, {}, _400, headers={"Last-Event-ID": str(2**63)}),
    # Replays the refresh events of the fixture: each is checked against the document's event schema.
    Edge("stream from the first event", _EVENTS, {"last_event_id": "0"}, frozenset({200})),
    Edge("stream from past the newest event", _EVENTS, {}, frozenset({200}), headers={"Last-Event-ID": str(2**62)}),
    Edge("last_event_id with 5000 digits", _EVENTS, {"last_event_id": "9" * 5000}, _400),
    # One spelling of a business id, the canonical one (the document's pattern); any other is a 400.
    Edge("business id in braces", _EVENTS, {}, _400, business="{braces}"),
    Edge("business id without hyphens", _EVENTS, {}, _400, business="{hex}"),
    Edge("stats for a business id in braces", _STATS, {}, _400, business="{braces}"),
    Edge("stats for a business id in upper case", _STATS, {}, _400, business="{upper}"),
    Edge("a token that expires in year 33658", _STATS, {}, frozenset({200, 401}), token_exp=10**12),
    Edge("C2B paid in year 9999", _C2B, {}, _200_OR_400, business=MPESA_TOKEN, body=_c2b("99991231235959")),
    Edge("C2B paid in year 1", _C2B, {}, _200_OR_400, business=MPESA_TOKEN, body=_c2b("00010101000000")),
    Edge("Paystack paid past year 9999 in UTC", _PAYSTACK, {}, _200_OR_400, body=_charge("9999-12-31T23:00-12:00")),
    Edge("Paystack paid in year 1", _PAYSTACK, {}, _200_OR_400, body=_charge("0001-01-01T00:00+05:00")),
]


@pytest.mark.parametrize(
    "edge",
    [
        pytest.param(
            edge, id=edge.name, marks=[pytest.mark.xfail(reason=edge.known, strict=False)] if edge.known else []
        )
        for edge in EDGES
    ],
)
def test_inputs_at_the_edges_get_a_documented_answer(edge: Edge, target: Target) -> None:
    demo = target.businesses[0]
    spelled = {_DEMO: demo, "{braces}": f"{{{demo}}}", "{hex}": uuid.UUID(demo).hex, "{upper}": demo.upper()}
    if edge.token_exp is None:
        token = _token("admin", target, 1)  # 1 s: a stream ends then
    else:
        claims = {"iss": "cdc-dashboard", "sub": "admin", "businesses": [], "admin": True, "iat": int(time.time())}
        token = jwt.encode({**claims, "exp": edge.token_exp}, SECRET, algorithm="HS256")
    headers = {"Authorization": f"Bearer {token}", **(edge.headers or {})}
    extra: dict[str, Any] = {}
    if edge.body is None:
        operation = SCHEMA[edge.path]["GET"]
        case = operation.Case(path_parameters={"business_id": spelled.get(edge.business, edge.business)})
    else:
        raw = json.dumps(edge.body).encode()
        extra["data"] = raw
        headers |= {"Content-Type": "application/json", "x-paystack-signature": sign(PAYSTACK_KEY, raw)}
        operation = SCHEMA[edge.path]["POST"]
        case = operation.Case(
            path_parameters={"token": edge.business} if "{token}" in edge.path else {}, body=edge.body
        )
    case.query = dict(edge.query)
    response = case.call(base_url=target.url, headers=headers, timeout=10, **extra)
    assert response.status_code in edge.expect, response.text[:300]
    case.validate_response(response, checks=CHECKS, headers=headers)
