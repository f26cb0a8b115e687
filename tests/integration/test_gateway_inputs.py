"""Inputs out of range through a real gateway and PostgreSQL: each is a 400 that says what is wrong and what is
accepted, never a 500 and never a stream that silently receives nothing; and no redirect built from `Host`."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import aiohttp
import psycopg
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.exceptions import HTTPException
from starlette.routing import Route

from cdc_dashboard.gateway.auth import parse_business_id
from cdc_dashboard.gateway.streams import MAX_EVENT_ID, parse_event_id

from .gateway_support import append_events, open_stream, run_gateway, token_for

B = str(uuid.uuid4())


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.fixture
def business(db_url: str) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("insert into businesses (id, name, timezone) values (%s, 'Salon', 'Pacific/Kiritimati')", (B,))
    return B


async def _get(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, Any]:
    async with session.get(url, headers=headers, allow_redirects=False) as response:
        body = await response.json(content_type=None) if response.status != 200 else None
        return response.status, body


# (path after /v1/businesses/{id}, words the reason must contain)
OUT_OF_RANGE = [
    ("revenue?from=9999-12-31", "1970-01-01 to 9999-01-01"),
    ("revenue?to=0001-01-01", "1970-01-01 to 9999-01-01"),
    ("revenue?from=0001-01-01&to=0001-01-03", "1970-01-01 to 9999-01-01"),
    ("revenue?granularity=month&from=9999-01-01&to=9999-12-31", "1970-01-01 to 9999-01-01"),
    ("revenue?to=9999-12-31T23:59:59.999999", "1970-01-01 to 9999-01-01"),
    ("revenue?granularity=hour&to=0001-01-01T05:00Z", "1970-01-01 to 9999-01-01"),
    ("revenue?from=2026-01-01&to=9999-12-31T23:00-05:00", "1970-01-01 to 9999-01-01"),
    ("revenue?from=1969-12-31&to=1970-01-02", "1970-01-01 to 9999-01-01"),
    ("revenue?granularity=year", "hour, day, month"),
    ("transactions?before=" + _cursor(f"9999-12-31T23:59:59-05:00|{uuid.UUID(int=1)}"), "next_before"),
    ("transactions?before=" + _cursor(f"0001-01-01T00:00:00+05:00|{uuid.UUID(int=1)}"), "next_before"),
    ("transactions?before=" + _cursor(f"2026-01-01T00:00:00+00:00|{uuid.UUID(int=1).hex}"), "next_before"),
    ("payments?before=not-a-cursor", "next_before"),
    ("bookings?before=%00", "next_before"),
    ("transactions?limit=99999999999999999999999", "1 to 200"),
    ("transactions?limit=+5", "1 to 200"),
    ("transactions?limit=5_0", "1 to 200"),
    ("transactions?limit=%EF%BC%91", "1 to 200"),  # a full-width 1
    ("payment-transactions?limit=-1", "1 to 200"),
    ("client-business-transactions?limit=0", "1 to 200"),
    ("events?last_event_id=9223372036854775808", "0 to 9223372036854775807"),
    ("events?last_event_id=99999999999999999999999999999", "0 to 9223372036854775807"),
    ("events?last_event_id=-1", "0 to 9223372036854775807"),
    ("events?last_event_id=1e3", "0 to 9223372036854775807"),
    ("events?last_event_id=%2B5", "0 to 9223372036854775807"),
]


@pytest.mark.parametrize(("query", "reason"), OUT_OF_RANGE, ids=[q for q, _ in OUT_OF_RANGE])
async def test_out_of_range_parameters_are_400_with_a_reason(
    business: str, db_url: str, query: str, reason: str
) -> None:
    headers = {"Authorization": f"Bearer {token_for(business)}"}
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        status, body = await _get(session, f"{gw.url}/v1/businesses/{business}/{query}", **headers)
    assert status == 400, body
    assert reason in body["error"]


async def test_the_ends_of_the_supported_range_are_served(business: str, db_url: str) -> None:
    """In a +14:00 zone, the last month before 9999-01-01 UTC is the local 9999-01: PostgreSQL takes it too."""
    headers = {"Authorization": f"Bearer {token_for(business)}"}
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        for query in (
            "granularity=month&from=9998-01-01&to=9999-01-01T00:00Z",
            "granularity=hour&from=9998-12-31T20:00Z&to=9999-01-01T00:00Z",
            "granularity=day&from=1970-01-01T00:00Z&to=1970-01-03",
            "granularity=month&to=1970-01-01T00:00Z",
        ):
            status, body = await _get(session, f"{gw.url}/v1/businesses/{business}/revenue?{query}", **headers)
            assert status == 200, (query, body)


@pytest.mark.parametrize("value", [str(2**63), "18446744073709551616", "-1", "1.0", "٣", "1 2"])
async def test_last_event_id_header_out_of_range_is_400(business: str, db_url: str, value: str) -> None:
    headers = {"Authorization": f"Bearer {token_for(business)}", "Last-Event-ID": value}
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        # aiohttp sends header values as UTF-8 bytes; the gateway reads them as latin-1: still not digits.
        status, body = await _get(session, f"{gw.url}/v1/businesses/{business}/events", **headers)
    assert status == 400
    assert body["error"] == "Last-Event-ID must be an integer from 0 to 9223372036854775807"


async def test_the_largest_last_event_id_resyncs(business: str, db_url: str) -> None:
    """2^63-1 is a valid id no database gave yet: the stream opens and says resync, as for any future id."""
    append_events(db_url, (business, "invalidate"))
    async with (
        run_gateway(db_url) as gw,
        open_stream(gw.url, business, token_for(business), last_event_id=2**63 - 1) as s,
    ):
        assert s.response.status == 200
        first = await s.next_event()
        assert first is not None and first.event == "resync"


def _spellings(business_id: str) -> list[str]:
    u = uuid.UUID(business_id)
    return [u.hex, "{" + business_id + "}", business_id.upper(), f"urn:uuid:{business_id}", u.hex.upper()]


async def test_other_spellings_of_a_business_id_are_400_naming_the_canonical_one(business: str, db_url: str) -> None:
    """Every /v1 route of a business: a client that keyed its caches by another spelling would never see them
    invalidated (events carry the canonical id), so the gateway says so instead of streaming nothing."""
    token = token_for(business)
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        routes = [r.path for r in gw.app.routes if isinstance(r, Route) and r.path.startswith("/v1/businesses/{")]
        assert "/v1/businesses/{business_id}/events" in routes
        for spelling in _spellings(business):
            for path in routes:
                url = gw.url + path.replace("{business_id}", spelling)
                method = "POST" if path.endswith("/refresh") else "GET"
                headers = {"Authorization": f"Bearer {token}"}
                async with session.request(method, url, headers=headers, allow_redirects=False) as response:
                    assert response.status == 400, (spelling, path, response.status)
                    error = (await response.json())["error"]
                    assert f"lower case with hyphens: {business}" in error, error


async def test_the_page_opens_for_any_spelling_and_uses_the_canonical_id(business: str, db_url: str) -> None:
    token = token_for(business)
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        for spelling in _spellings(business):
            async with session.get(f"{gw.url}/dashboard/{spelling}", params={"access_token": token}) as response:
                assert response.status == 200, spelling
                assert f'<meta name="cdc-business-id" content="{business}">' in await response.text()


async def test_a_canonical_stream_receives_its_events(business: str, db_url: str) -> None:
    async with run_gateway(db_url) as gw, open_stream(gw.url, business, token_for(business)) as stream:
        assert stream.response.status == 200
        (event_id,) = append_events(db_url, (business, "invalidate"))
        event = await stream.next_event()
        assert event is not None and event.id == str(event_id)


async def test_a_trailing_slash_is_404_never_a_redirect_to_the_host_header(business: str, db_url: str) -> None:
    token = token_for(business)
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        for path in (
            f"/v1/businesses/{business}/stats/",
            f"/v1/businesses/{business}/",
            f"/dashboard/{business}/?access_token={token}",
            "/healthz/",
        ):
            headers = {"Host": "evil.example", "Authorization": f"Bearer {token}"}
            async with session.get(gw.url + path, headers=headers, allow_redirects=False) as response:
                assert response.status == 404, path
                assert "location" not in response.headers
                assert "evil.example" not in await response.text()


PROPERTIES = settings(max_examples=300, deadline=None, database=None)


@PROPERTIES
@given(raw=st.none() | st.text(max_size=25) | st.integers().map(str))
@example(raw=str(2**63))
@example(raw="+5")
@example(raw="\u0663")  # an Arabic-Indic 3: int() reads it, no client means it
def test_any_last_event_id_is_refused_or_a_bigint(raw: str | None) -> None:
    try:
        value = parse_event_id(raw)
    except HTTPException as exc:
        assert exc.status_code == 400 and "0 to 9223372036854775807" in exc.detail
        return
    assert value is None or (0 <= value <= MAX_EVENT_ID and raw is not None and int(raw.strip()) == value)


@PROPERTIES
@given(
    raw=st.text(max_size=50)
    | st.uuids().map(str)
    | st.uuids().map(lambda u: u.hex)
    | st.uuids().map(lambda u: str(u).upper())
)
def test_any_business_id_is_refused_or_already_canonical(raw: str) -> None:
    try:
        canonical = parse_business_id(raw)
    except HTTPException as exc:
        assert exc.status_code == 400
        return
    assert canonical == raw == str(uuid.UUID(raw))
