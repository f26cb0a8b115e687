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

Deterministic for CI: hypothesis is derandomized (same cases on every run) and has no example database.
Budget: about a minute on two cores (`max_examples` below).
"""

from __future__ import annotations

import json
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
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
        env = {"CDC_PAYSTACK_SECRET_KEY": PAYSTACK_KEY, "CDC_MPESA_CALLBACK_TOKEN": MPESA_TOKEN}
        with serve_subprocess(db_url, port, **env):
            yield Target(f"http://127.0.0.1:{port}", businesses)
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
