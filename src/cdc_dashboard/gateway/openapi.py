"""The gateway's OpenAPI 3.1 document, served at `GET /openapi.json`.

Why Python data and not a checked-in openapi.json/YAML file, nor generated from route metadata:
- generated from the routes, it could say little more than the paths: starlette routes carry no parameter,
  body or response descriptions, and adding them would spread the contract over every endpoint module;
- a checked-in JSON file cannot hold a comment, repeats every error response twenty times, and its numbers
  (the list page size, the webhook body limit, what M-Pesa is answered) would drift from the code;
- here the document reads top to bottom like the YAML one would write by hand, the repetitive parts are small
  functions (`_errors`, `_list_path`), and the numbers come from the code that enforces them.

What keeps it true (tests/unit/test_openapi.py, tests/integration/test_api_fuzz.py): every route of the app is in the
document and every path of the document is a route, methods included; the document validates against the
OpenAPI 3.1 schema; and schemathesis fuzzes every operation against a live gateway and checks each response's
status, content type, headers and body against it. Change an endpoint, change this file.

Documented where the code does not do it yet (issue 16, in progress): 429 with `Retry-After` (rate limits) and
503 with `Retry-After` on a database outage. A response that can occur only later is harmless to the checks;
a response the gateway sends that is not here fails them.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .. import __version__
from ..figures import reads as figure_queries
from .page import STATIC_DIR
from .streams import MAX_EVENT_ID
from .webhooks import C2B_ACCEPTED, MAX_BODY_BYTES, STK_ACCEPTED

__all__ = ["document", "routes"]

Schema = dict[str, Any]


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> Schema:
    return _ref("schemas", name)


def _json(schema: Schema, description: str, headers: dict[str, Any] | None = None) -> Schema:
    response: Schema = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _header(description: str, schema: Schema | None = None) -> Schema:
    """A response header the gateway always sends."""
    return {"description": description, "required": True, "schema": schema or {"type": "string"}}


def _errors(*statuses: int) -> dict[str, Any]:
    """The `{"error": reason}` responses of these statuses, from components.responses."""
    names = {
        400: "BadRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFound",
        413: "PayloadTooLarge",
        429: "TooManyRequests",
        503: "Unavailable",
    }
    return {str(status): _ref("responses", names[status]) for status in statuses}


# -- schemas -------------------------------------------------------------------------------------------------

_UUID: Schema = {"type": "string", "format": "uuid"}
_CANONICAL_UUID = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_TIME: Schema = {"type": "string", "format": "date-time"}
_MINOR: Schema = {"type": "integer", "minimum": 0, "description": "money in minor units (cents)"}
_CURRENCY: Schema = {"type": "string", "pattern": "^[A-Z]{3}$"}
# The values the tables' CHECK constraints allow (sql/schema/10_base_tables.sql).
_PAYMENT_STATUS: Schema = {"enum": ["pending", "completed", "failed", "refunded"]}
_METHOD: Schema = {"enum": ["mpesa", "paystack", "card", "cash", "bank_transfer", "other"]}
_BOOKING_STATUS: Schema = {"enum": ["pending", "confirmed", "completed", "cancelled", "no_show"]}
_BOOKING_PAYMENT_STATUS: Schema = {"enum": ["unpaid", "pending", "partially_paid", "paid", "refunded"]}
_EVENT_ID: Schema = {"type": "integer", "minimum": 0, "maximum": MAX_EVENT_ID}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, Schema]) -> Schema:
    """A closed object: every property is there (null where a value may be missing), nothing else is."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _counts(description: str) -> Schema:
    return {"type": "object", "description": description, "additionalProperties": {"type": "integer", "minimum": 0}}


_FIGURES = _object(
    {
        "revenue": {
            "type": "object",
            "description": "per currency (ISO 4217 code); a currency appears once a payment in it completed",
            "propertyNames": _CURRENCY,
            "additionalProperties": _object(
                # Sums are exact at any size: JSON integers, never capped at 2^63.
                {
                    "total_minor": {"type": "integer"},
                    "today_minor": {"type": "integer"},
                    "month_minor": {"type": "integer"},
                }
            ),
        },
        "payments_count": {"type": "integer", "minimum": 0},
        "clients_total": {"type": "integer", "minimum": 0},
        "clients_new_today": {"type": "integer", "minimum": 0},
        "bookings": _object(
            {"by_status": _counts("bookings per status"), "by_payment_status": _counts("bookings per payment status")}
        ),
    }
)

_AS_OF = {"business_id": _UUID, "as_of_event_id": _EVENT_ID}


def _page(item: Schema) -> Schema:
    return _object(
        {
            **_AS_OF,
            "items": {"type": "array", "items": item},
            "next_before": {
                **_nullable({"type": "string"}),
                "description": "the `before` of the next page; null on the last page",
            },
        }
    )


# The item of each list, as sql/queries/figures.sql builds it.
_LIST_ITEMS: dict[str, Schema] = {
    "Transaction": _object(
        {
            "id": _UUID,
            "amount_minor": _MINOR,
            "refunded_minor": _MINOR,
            "currency": _CURRENCY,
            "method": _METHOD,
            "status": _PAYMENT_STATUS,
            "client_id": _nullable(_UUID),
            "client_name": _nullable({"type": "string"}),
            "booking_id": _nullable(_UUID),
            "provider": _nullable({"type": "string"}),
            "provider_reference": _nullable({"type": "string"}),
            "at": _TIME,
            "paid_at": _nullable(_TIME),
            "created_at": _TIME,
        }
    ),
    "Payment": _object(
        {
            "id": _UUID,
            "client_id": _nullable(_UUID),
            "booking_id": _nullable(_UUID),
            "amount_minor": _MINOR,
            "refunded_minor": _MINOR,
            "currency": _CURRENCY,
            "method": _METHOD,
            "status": _PAYMENT_STATUS,
            "provider": _nullable({"type": "string"}),
            "provider_reference": _nullable({"type": "string"}),
            "paid_at": _nullable(_TIME),
            "created_at": _TIME,
            "updated_at": _TIME,
        }
    ),
    "PaymentTransaction": _object(
        {
            "id": _UUID,
            "payment_id": _nullable(_UUID),
            "provider": {"type": "string"},
            "amount_minor": _MINOR,
            "currency": _CURRENCY,
            "status": _PAYMENT_STATUS,
            "created_at": _TIME,
            "updated_at": _TIME,
        }
    ),
    "ClientBusinessTransaction": _object(
        {
            "id": _UUID,
            "client_id": _nullable(_UUID),
            "client_name": _nullable({"type": "string"}),
            "payment_id": _nullable(_UUID),
            "type": {"enum": ["payment", "refund"]},
            "amount_minor": _MINOR,
            "currency": _CURRENCY,
            "created_at": _TIME,
            "updated_at": _TIME,
        }
    ),
    "Booking": _object(
        {
            "id": _UUID,
            "client_id": _nullable(_UUID),
            "client_name": _nullable({"type": "string"}),
            "amount_due_minor": _MINOR,
            "currency": _CURRENCY,
            "status": _BOOKING_STATUS,
            "payment_status": _BOOKING_PAYMENT_STATUS,
            "starts_at": _nullable(_TIME),
            "created_at": _TIME,
            "updated_at": _TIME,
        }
    ),
}

# Webhook bodies, as loosely as the parsers (cdc_dashboard.ingest) read them. Not stricter: a body that breaks
# a rule here must be refused (the fuzzing sends such bodies and expects a 4xx). Identifiers may be numbers
# (read as their decimal text), amounts numeric strings; fields a parser does not read are left open.
_IDENTIFIER: Schema = {"type": ["string", "number"], "description": "text, or a whole number read as its digits"}
_OPTIONAL_TEXT: Schema = {"type": ["string", "number", "null"]}
_AMOUNT: Schema = {"type": ["number", "string"], "description": "a positive number, or the same as a string"}


def _when(field: str, value: str, then: Schema) -> Schema:
    return {"if": {"properties": {field: {"const": value}}, "required": [field]}, "then": then}


_WEBHOOK_BODIES: dict[str, Schema] = {
    "PaystackEvent": {
        "type": "object",
        "description": "a Paystack event: charge.success and refund.processed are recorded (their `data` must have "
        "what the rules below require), any other event is acknowledged as `ignored` (docs/API.md, Webhooks)",
        "required": ["event"],
        "properties": {"event": {**_IDENTIFIER, "examples": ["charge.success", "refund.processed"]}},
        "allOf": [
            _when(
                "event",
                "charge.success",
                {
                    "required": ["data"],
                    "properties": {
                        "data": {
                            "type": "object",
                            "required": ["reference", "amount", "currency"],
                            "properties": {
                                "reference": _IDENTIFIER,
                                "amount": {**_AMOUNT, "description": "subunits (kobo, cents)"},
                                "currency": {"type": "string", "description": "ISO 4217, e.g. NGN"},
                                "paid_at": {"description": "ISO 8601; or paidAt"},
                                "customer": {"description": "email, phone, first_name, last_name"},
                                "metadata": {"description": "business_id, booking_id (an object, or it as JSON)"},
                                "subaccount": {"description": "subaccount_code: the business's"},
                            },
                        }
                    },
                },
            ),
            _when(
                "event",
                "refund.processed",
                {
                    "required": ["data"],
                    "properties": {
                        "data": {
                            "type": "object",
                            "required": ["transaction_reference", "refund_reference", "amount", "currency"],
                            "properties": {
                                "transaction_reference": _IDENTIFIER,
                                "refund_reference": _IDENTIFIER,
                                "amount": _AMOUNT,
                                "currency": {"type": "string"},
                            },
                        }
                    },
                },
            ),
        ],
    },
    "MpesaStkCallback": {
        "type": "object",
        "description": "the STK push result Safaricom posts to CallBackURL; with ResultCode 0, CallbackMetadata.Item "
        "holds Amount, MpesaReceiptNumber, TransactionDate (YYYYMMDDHHmmss, Kenyan time) and PhoneNumber",
        "required": ["Body"],
        "properties": {
            "Body": {
                "type": "object",
                "required": ["stkCallback"],
                "properties": {
                    "stkCallback": {
                        "type": "object",
                        "required": ["CheckoutRequestID", "ResultCode"],
                        "properties": {
                            "CheckoutRequestID": _IDENTIFIER,
                            "ResultCode": {"type": ["integer", "string"], "description": "0: paid"},
                            "ResultDesc": _OPTIONAL_TEXT,
                        },
                    }
                },
            }
        },
    },
    "MpesaC2B": {
        "type": "object",
        "description": "a C2B validation or confirmation request",
        "required": ["TransID", "TransAmount", "BusinessShortCode"],
        "properties": {
            "TransID": _IDENTIFIER,
            "TransAmount": {**_AMOUNT, "description": "shillings, e.g. 1500.00"},
            "TransTime": {**_OPTIONAL_TEXT, "description": "YYYYMMDDHHmmss, Kenyan time"},
            "BusinessShortCode": _IDENTIFIER,
            "BillRefNumber": _OPTIONAL_TEXT,
            "MSISDN": _OPTIONAL_TEXT,
            "FirstName": _OPTIONAL_TEXT,
            "MiddleName": _OPTIONAL_TEXT,
            "LastName": _OPTIONAL_TEXT,
        },
    },
}

_SCHEMAS: dict[str, Schema] = {
    "Error": {
        **_object({"error": {"type": "string"}}),
        "description": "every error of the JSON API; `error` says what to fix (never a token or a traceback)",
    },
    "Figures": _FIGURES,
    "Stats": _object({**_AS_OF, **_FIGURES["properties"]}),
    "BusinessData": _object(
        {
            **_AS_OF,
            "business": _object(
                {
                    "id": _UUID,
                    "name": {"type": "string"},
                    "timezone": {"type": "string", "description": "IANA name, e.g. Africa/Nairobi"},
                    "created_at": _TIME,
                    "today": {"type": "string", "format": "date", "description": "the business's local date"},
                }
            ),
            "figures": _schema("Figures"),
        }
    ),
    "Revenue": _object(
        {
            **_AS_OF,
            "granularity": {"enum": ["hour", "day", "month"]},
            "timezone": {"type": "string"},
            "from": _TIME,
            "to": _TIME,
            "series": {
                "type": "object",
                "description": "per currency, one entry per bucket of [from, to), oldest first, zero-filled",
                "propertyNames": _CURRENCY,
                "additionalProperties": {
                    "type": "array",
                    "items": _object(
                        {
                            "bucket": {
                                "type": "string",
                                "description": "local date-time with offset (hour), date (day) or YYYY-MM (month)",
                            },
                            "revenue_minor": {"type": "integer"},
                            "payments_count": {"type": "integer", "minimum": 0},
                        }
                    ),
                },
            },
        }
    ),
    **_LIST_ITEMS,
    **{f"{name}Page": _page(_schema(name)) for name in _LIST_ITEMS},
    "Refresh": _object(
        {
            **_AS_OF,
            "event_id": _EVENT_ID,
            "repaired": {"type": "boolean"},
            "rows_repaired": _counts("rows repaired per internal table"),
            "differences": {
                "type": "object",
                "description": "figures that changed, by dotted path (revenue.KES.total_minor)",
                "additionalProperties": _object({"before": {"type": "integer"}, "after": {"type": "integer"}}),
            },
            "figures": _schema("Figures"),
        }
    ),
    **_WEBHOOK_BODIES,
    "StreamEvent": {
        "type": "object",
        "description": "one event of the stream (comments such as `: ping` and the first `retry:` are not events)",
        "required": ["event", "id", "data"],
        "properties": {
            "event": {
                "enum": ["invalidate", "resync"],
                "description": "invalidate: refetch (or set) the query keys; resync: refetch everything",
            },
            "id": {"type": "string", "pattern": "^[0-9]+$", "description": "the event id, for Last-Event-ID"},
            "retry": {"type": "integer", "minimum": 0},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {
                    "type": "object",
                    "required": ["business_id"],
                    "properties": {
                        "business_id": _UUID,
                        "query_keys": {
                            "description": "TanStack query keys: [name, business id, ...]",
                            "type": "array",
                            "items": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                        },
                        "changes": {"type": "array", "items": {"type": "object"}},
                        "change_count": {"type": "integer", "minimum": 0},
                        "payments": {"type": "array", "items": {"type": "object"}},
                        "committed_at": _TIME,
                        "reason": {"type": "string", "description": "e.g. manual_refresh, history_unavailable"},
                        "figures": {
                            "type": "object",
                            "description": "live events only, on a business's last event of a delivery batch: "
                            "query key name -> the body its GET returns at that moment, `as_of_event_id` >= this "
                            "event's id; set it as the query's data instead of refetching (docs/API.md)",
                            "properties": {"dashboard-stats": _schema("Stats")},
                            "additionalProperties": False,
                        },
                    },
                },
            },
        },
    },
    "PaystackAnswer": _object(
        {
            "received": {"const": True},
            "outcome": {"enum": ["recorded", "refunded", "duplicate", "unattributed", "ignored"]},
        }
    ),
    "MpesaStkAnswer": _object(
        {"ResultCode": {"const": STK_ACCEPTED["ResultCode"]}, "ResultDesc": {"const": STK_ACCEPTED["ResultDesc"]}}
    ),
    "MpesaC2BAnswer": _object(
        {"ResultCode": {"const": C2B_ACCEPTED["ResultCode"]}, "ResultDesc": {"const": C2B_ACCEPTED["ResultDesc"]}}
    ),
    "Health": _object({"status": {"const": "ok"}}),
    "Readiness": {
        "type": "object",
        "required": ["status", "checks"],
        "additionalProperties": False,
        "properties": {
            "status": {"enum": ["ready", "not ready"]},
            "checks": {
                "type": "object",
                "description": "database, listening, not_draining, and listener with --with-listener",
                "additionalProperties": {"type": "boolean"},
            },
            "error": {"type": "string", "description": "when not ready: which checks fail"},
        },
    },
    "Status": {
        "type": "object",
        "description": "troubleshooting state (docs/API.md, Operations); `database` is `ok` or why not",
        "required": ["gateway", "database"],
        "properties": {
            "gateway": {
                "type": "object",
                "required": ["node", "listening", "position", "streams", "businesses", "draining"],
                "properties": {
                    "node": {"type": "string"},
                    "listening": {"type": "boolean"},
                    "position": {"type": "integer"},
                    "streams": {"type": "integer", "minimum": 0},
                    "businesses": {"type": "integer", "minimum": 0},
                    "draining": {"type": "boolean"},
                    "reconnects": {"type": "integer", "minimum": 0},
                    "last_error": {"type": ["string", "null"]},
                },
            },
            "listener_state": {"type": ["object", "null"]},
            "dead_letters": {
                "oneOf": [
                    {
                        "type": "object",
                        "required": ["count", "oldest_at", "recent"],
                        "properties": {
                            "count": {"type": "integer", "minimum": 0},
                            "oldest_at": _nullable(_TIME),
                            "recent": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                    _object({"error": {"type": "string"}}),
                ]
            },
            "database": {"type": "string"},
            "embedded_listener": {"type": "object"},
        },
    },
}

# -- parameters ----------------------------------------------------------------------------------------------


def _or_empty(schema: Schema) -> Schema:
    """A query parameter or header sent empty (`?limit=`, as an HTML form sends a blank field) is taken as absent."""
    return {"anyOf": [schema, {"const": ""}]}


_INSTANT = _or_empty({"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]})

_PARAMETERS: dict[str, Schema] = {
    "BusinessId": {
        "name": "business_id",
        "in": "path",
        "required": True,
        "description": "the business's UUID, lower case with hyphens (the spelling events and bodies carry); any "
        "other spelling, or not a UUID, is a 400 (after the token is checked)",
        "schema": {**_UUID, "pattern": _CANONICAL_UUID},
    },
    "PageBusinessId": {
        "name": "business_id",
        "in": "path",
        "required": True,
        "description": "the business's UUID in any spelling (links get pasted and retyped: upper case, braces, "
        "no hyphens); the page then uses the canonical one. Not a UUID: the 400 page",
        "schema": {"type": "string"},
    },
    "Limit": {
        "name": "limit",
        "in": "query",
        "description": f"rows per page (default {figure_queries.DEFAULT_LIMIT})",
        "schema": _or_empty({"type": "integer", "minimum": 1, "maximum": figure_queries.MAX_LIMIT}),
    },
    "Before": {
        "name": "before",
        "in": "query",
        "description": "the `next_before` of the previous page (an opaque cursor); anything else is a 400",
        "schema": {"type": "string"},
    },
    "IfNoneMatch": {
        "name": "If-None-Match",
        "in": "header",
        "description": "the ETag of a previous answer: 304 while the data is unchanged",
        "schema": {"type": "string"},
    },
    "Granularity": {
        "name": "granularity",
        "in": "query",
        "description": "bucket size, in the business's timezone; absent or empty: day",
        "schema": {"enum": ["hour", "day", "month", ""], "default": "day"},
    },
    "From": {
        "name": "from",
        "in": "query",
        "description": "inclusive start: ISO 8601 date or date-time; without an offset, the business's wall "
        "clock. Default: 24 hours, 30 days or 12 months before `to`",
        "schema": _INSTANT,
    },
    "To": {
        "name": "to",
        "in": "query",
        "description": "exclusive end, as `from`; default now. More than "
        f"{figure_queries.MAX_BUCKETS} buckets, or `from` not before `to`: 400",
        "schema": _INSTANT,
    },
    "LastEventIdHeader": {
        "name": "Last-Event-ID",
        "in": "header",
        "description": "resume after this event id (EventSource sends it on reconnect); not an id: 400",
        "schema": _or_empty(_EVENT_ID),
    },
    "LastEventIdQuery": {
        "name": "last_event_id",
        "in": "query",
        "description": "as the Last-Event-ID header, for a first connection (the header wins)",
        "schema": _or_empty(_EVENT_ID),
    },
    "MpesaToken": {
        "name": "token",
        "in": "path",
        "required": True,
        "description": "CDC_MPESA_CALLBACK_TOKEN, the secret in the callback URL registered with Safaricom",
        "schema": {"type": "string"},
    },
}

# -- responses -----------------------------------------------------------------------------------------------

_RETRY_AFTER = _header("seconds to wait before trying again", {"type": "string", "pattern": "^[0-9]+$"})
_ERROR = _schema("Error")

_RESPONSES: dict[str, Schema] = {
    "BadRequest": _json(_ERROR, "a parameter or body out of range or malformed; the reason says which"),
    "Unauthorized": _json(_ERROR, "no token, or a forged, expired or malformed one"),
    "Forbidden": _json(_ERROR, "the token does not name this business (or is not an admin token)"),
    "NotFound": _json(_ERROR, "no such business"),
    "PayloadTooLarge": _json(_ERROR, f"body over {MAX_BODY_BYTES} bytes"),
    "TooManyRequests": _json(_ERROR, "past a rate limit", {"Retry-After": _RETRY_AFTER}),
    "Unavailable": _json(
        _ERROR,
        "the database cannot be reached, or the gateway is at its limit or draining",
        {"Retry-After": _RETRY_AFTER},
    ),
}

_CACHE_HEADERS = {
    "Cache-Control": _header("no-cache", {"const": "no-cache"}),
    "ETag": _header("weak tag of the body without as_of_event_id", {"type": "string", "pattern": '^W/".+"$'}),
    "X-As-Of-Event-Id": _header("the body's as_of_event_id", {"type": "string", "pattern": "^[0-9]+$"}),
}

# -- paths ---------------------------------------------------------------------------------------------------

_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]
# `?access_token=` only where a browser cannot send a header: EventSource and the page's own link.
_BEARER_OR_QUERY: list[dict[str, list[str]]] = [{"bearer": []}, {"accessToken": []}]
_BUSINESS_ERRORS = (400, 401, 403, 404, 503)
_BUSINESS_ID = _ref("parameters", "BusinessId")


def _figures_get(operation_id: str, summary: str, schema: Schema, *query: str) -> Schema:
    return {
        "parameters": [_BUSINESS_ID],
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "tags": ["figures"],
            "security": _BEARER,
            "parameters": [_ref("parameters", name) for name in (*query, "IfNoneMatch")],
            "responses": {
                "200": _json(schema, "the data, as of `as_of_event_id`", _CACHE_HEADERS),
                "304": {"description": "unchanged since the If-None-Match tag", "headers": _CACHE_HEADERS},
                **_errors(*_BUSINESS_ERRORS),
            },
        },
    }


def _list_path(operation_id: str, item: str, what: str) -> Schema:
    return _figures_get(operation_id, f"{what}, newest first, a keyset page", _schema(f"{item}Page"), "Limit", "Before")


_B = "/v1/businesses/{business_id}"
_WEBHOOK_ERRORS = (400, 401, 413, 429, 503)


def _mpesa(operation_id: str, summary: str, body: str, answer: str) -> Schema:
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "tags": ["webhooks"],
            "security": [],
            "parameters": [_ref("parameters", "MpesaToken")],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _schema(body)}}},
            "responses": {
                "200": _json(_schema(answer), "accepted (recorded, or a duplicate of what was)"),
                **_errors(*_WEBHOOK_ERRORS, 403),
            },
        }
    }


_PATHS: dict[str, Schema] = {
    f"{_B}/events": {
        "parameters": [_BUSINESS_ID],
        "get": {
            "operationId": "streamEvents",
            "summary": "the business's invalidation events as Server-Sent Events (docs/API.md, The event stream)",
            "tags": ["events"],
            "security": _BEARER_OR_QUERY,
            "parameters": [_ref("parameters", "LastEventIdHeader"), _ref("parameters", "LastEventIdQuery")],
            "responses": {
                "200": {
                    "description": "`retry: 2000`, then `invalidate` and `resync` events with integer ids and "
                    "`: ping` comments; ends when the token expires, the client lags, or the gateway drains",
                    "headers": {
                        "Cache-Control": _header("no-cache, no-transform", {"const": "no-cache, no-transform"}),
                        "X-Accel-Buffering": _header("no: proxies must not buffer", {"const": "no"}),
                    },
                    # For text/event-stream the schema describes each event (as OpenAPI 3.2's itemSchema
                    # will): schemathesis parses the stream and checks every event against it.
                    "content": {"text/event-stream": {"schema": _schema("StreamEvent")}},
                },
                # No 404: a stream for a business that has no row yet is allowed (it may be created later).
                **_errors(400, 401, 403, 429, 503),
            },
        },
    },
    f"{_B}/stats": _figures_get("getStats", "DESIGN's stats figures (query key dashboard-stats)", _schema("Stats")),
    f"{_B}/revenue": _figures_get(
        "getRevenue",
        "completed revenue net of refunds per bucket and currency over [from, to)",
        _schema("Revenue"),
        "Granularity",
        "From",
        "To",
    ),
    _B: _figures_get("getBusiness", "profile and headline figures (query key business-data)", _schema("BusinessData")),
    f"{_B}/transactions": _list_path("listTransactions", "Transaction", "payments by coalesce(paid_at, created_at)"),
    f"{_B}/payments": _list_path("listPayments", "Payment", "payments by created_at"),
    f"{_B}/payment-transactions": _list_path("listPaymentTransactions", "PaymentTransaction", "provider records"),
    f"{_B}/client-business-transactions": _list_path(
        "listClientBusinessTransactions", "ClientBusinessTransaction", "client ledger rows"
    ),
    f"{_B}/bookings": _list_path("listBookings", "Booking", "bookings by created_at"),
    f"{_B}/refresh": {
        "parameters": [_BUSINESS_ID],
        "post": {
            "operationId": "refresh",
            "summary": "recompute the business's aggregates from the base tables and emit an invalidation",
            "tags": ["figures"],
            "security": _BEARER,
            "responses": {
                "200": _json(
                    _schema("Refresh"), "what was repaired", {"Cache-Control": _CACHE_HEADERS["Cache-Control"]}
                ),
                **_errors(*_BUSINESS_ERRORS, 429),
            },
        },
    },
    "/v1/webhooks/paystack": {
        "post": {
            "operationId": "paystackWebhook",
            "summary": "Paystack events (charge.success, refund.processed)",
            "tags": ["webhooks"],
            "security": [],
            "parameters": [
                {
                    "name": "x-paystack-signature",
                    "in": "header",
                    "required": True,
                    "description": "lowercase hex HMAC-SHA512 of the raw body, key CDC_PAYSTACK_SECRET_KEY",
                    "schema": {"type": "string"},
                }
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _schema("PaystackEvent")}}},
            "responses": {"200": _json(_schema("PaystackAnswer"), "what the event did"), **_errors(*_WEBHOOK_ERRORS)},
        }
    },
    "/v1/webhooks/mpesa/{token}/stk": _mpesa(
        "mpesaStk", "M-Pesa STK push result", "MpesaStkCallback", "MpesaStkAnswer"
    ),
    "/v1/webhooks/mpesa/{token}/c2b/validation": _mpesa(
        "mpesaC2bValidation", "M-Pesa C2B validation: accepts every well-formed payment", "MpesaC2B", "MpesaC2BAnswer"
    ),
    "/v1/webhooks/mpesa/{token}/c2b/confirmation": _mpesa(
        "mpesaC2bConfirmation", "M-Pesa C2B confirmation: records the payment", "MpesaC2B", "MpesaC2BAnswer"
    ),
    "/dashboard/{business_id}": {
        "parameters": [_ref("parameters", "PageBusinessId")],
        "get": {
            "operationId": "dashboardPage",
            "summary": "the live dashboard page; a bad link gets an HTML error page",
            "tags": ["page"],
            "security": _BEARER_OR_QUERY,
            "responses": {
                "200": {
                    "description": "the page (it loads only /static files of this origin)",
                    "headers": {
                        "Cache-Control": _header("no-store: the URL carries a token", {"const": "no-store"}),
                        "Referrer-Policy": _header("no-referrer", {"const": "no-referrer"}),
                        "Content-Security-Policy": _header("default-src 'self' and friends"),
                    },
                    "content": {"text/html": {"schema": {"type": "string"}}},
                },
                **{
                    str(status): {"description": why, "content": {"text/html": {"schema": {"type": "string"}}}}
                    for status, why in [
                        (400, "not a business id"),
                        (401, "no token, or a forged or expired one"),
                        (403, "the token does not name this business"),
                        (503, "the gateway cannot check tokens or reach the database"),
                    ]
                },
            },
        },
    },
    "/static/{file}": {
        "get": {
            "operationId": "staticFile",
            "summary": "the page's script and styles, and realtime.js for any dashboard app (docs/REALTIME_JS.md)",
            "tags": ["page"],
            "security": [],
            "parameters": [
                {
                    "name": "file",
                    "in": "path",
                    "required": True,
                    "schema": {"enum": sorted(p.name for p in STATIC_DIR.iterdir() if p.is_file())},
                }
            ],
            "responses": {
                "200": {
                    "description": "the file",
                    "content": {
                        "text/javascript": {"schema": {"type": "string"}},
                        "text/css": {"schema": {"type": "string"}},
                        "text/html": {"schema": {"type": "string"}},
                    },
                },
                "404": _json(_ERROR, "no such file"),
            },
        }
    },
    "/healthz": {
        "get": {
            "operationId": "healthz",
            "summary": "liveness: the process answers",
            "tags": ["operations"],
            "security": [],
            "responses": {"200": _json(_schema("Health"), "alive")},
        }
    },
    "/readyz": {
        "get": {
            "operationId": "readyz",
            "summary": "readiness: database, LISTEN, not draining (and the in-process listener)",
            "tags": ["operations"],
            "security": [],
            "responses": {
                "200": _json(_schema("Readiness"), "ready"),
                "503": _json(
                    _schema("Readiness"),
                    "not ready: the failing checks are false",
                    {"Retry-After": {**_RETRY_AFTER, "required": False}},
                ),
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics (docs/API.md, Operations); keep it off the public internet",
            "tags": ["operations"],
            "security": [],
            "responses": {
                "200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/v1/status": {
        "get": {
            "operationId": "status",
            "summary": "troubleshooting state: gateway, listener bookkeeping, dead letters",
            "tags": ["operations"],
            "security": _BEARER,
            "responses": {
                "200": _json(_schema("Status"), "the state"),
                **_errors(401, 403),
                "503": _json(
                    _schema("Status"),
                    "the database cannot be read: the same body, `database` says why",
                    {"Retry-After": _RETRY_AFTER},
                ),
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "this document",
            "tags": ["operations"],
            "security": [],
            "responses": {
                "200": _json({"type": "object", "required": ["openapi", "paths"]}, "the OpenAPI 3.1 document")
            },
        }
    },
}

_DOCUMENT: Schema = {
    "openapi": "3.1.0",
    "info": {
        "title": "cdc-dashboard gateway",
        "version": __version__,
        "description": "Realtime payment dashboards: figures, lists, the event stream, webhooks. "
        'Prose and examples: docs/API.md. Errors are `{"error": reason}`.',
    },
    "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
    "security": _BEARER,
    "paths": _PATHS,
    "components": {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "a dashboard token (`cdc-dashboard token`): HS256, names businesses or is admin",
            },
            "accessToken": {
                "type": "apiKey",
                "in": "query",
                "name": "access_token",
                "description": "the same token in the URL, for EventSource and the page link (browsers cannot "
                "set headers there)",
            },
        },
        "schemas": _SCHEMAS,
        "parameters": _PARAMETERS,
        "responses": _RESPONSES,
    },
}


@functools.cache
def _body() -> bytes:
    # Built once: the document does not change while the process runs.
    return json.dumps(_DOCUMENT, separators=(",", ":")).encode()


def document() -> Schema:
    """A copy of the document, for tests and tools (the served one must not be changed by a caller)."""
    return copy.deepcopy(_DOCUMENT)


async def openapi_json(request: Request) -> Response:
    return Response(_body(), media_type="application/json", headers={"Cache-Control": "no-cache"})


routes: list[BaseRoute] = [Route("/openapi.json", openapi_json, methods=["GET"])]
