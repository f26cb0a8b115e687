"""The figures and lists dashboards fetch, read from the precomputed aggregates.

Every read is one SQL statement (sql/queries/figures.sql) that also reads the listener's last event id, so
`as_of_event_id` names exactly the event the figures include. Functions take an asyncpg connection; the
gateway (gateway/figures.py) adds authorisation, ETags and HTTP errors.

Parameters a client sends are validated here and rejected with `BadRequest`, whose message says what to fix.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo

import asyncpg

from ..db import AsyncConnection
from ..sqlfiles import queries

__all__ = [
    "EARLIEST",
    "LATEST",
    "MAX_BUCKETS",
    "MAX_LIMIT",
    "BadRequest",
    "Figures",
    "Granularity",
    "ListKind",
    "Page",
    "RevenueSeries",
    "SeriesPlan",
    "business_data",
    "decode_cursor",
    "encode_cursor",
    "list_page",
    "plan_series",
    "revenue_series",
    "stats",
    "stats_of",
]

Granularity = Literal["hour", "day", "month"]
ListKind = Literal["transactions", "payments", "payment_transactions", "client_business_transactions", "bookings"]
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
# A series longer than this is a mistake (e.g. hourly over years) and would make a huge response.
MAX_BUCKETS = 2000
# The instants `from` and `to` may name. Outside them the arithmetic the series needs (a day or a month either
# side, the business's offset) would leave the years Python's datetime can hold (1..9999): payments predate
# neither the Unix epoch nor the year 9999, so the range costs no real query and every date in it is safe.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)
# The first page: strictly before a key no row has (any timestamp < infinity), so one indexed query serves
# both the first page and the next ones.
_FIRST_PAGE = (datetime.max.replace(tzinfo=UTC), uuid.UUID(int=(1 << 128) - 1))


class BadRequest(ValueError):
    """A parameter the client must fix; the message says which and how."""


@dataclass(frozen=True)
class Figures:
    """DESIGN's `stats` figures of one business, exactly as of `as_of_event_id`."""

    business_id: str
    as_of_event_id: int
    figures: dict[str, Any]
    profile: dict[str, Any]

    def stats_body(self) -> dict[str, Any]:
        return {"business_id": self.business_id, "as_of_event_id": self.as_of_event_id, **self.figures}


@dataclass(frozen=True)
class RevenueSeries:
    as_of_event_id: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Page:
    as_of_event_id: int
    items: list[dict[str, Any]]
    next_before: str | None


def _figures_from_row(business_id: uuid.UUID, row: asyncpg.Record) -> Figures:
    raw = json.loads(row["figures"])
    # DESIGN's order, whatever order jsonb keeps its keys in.
    figures = {
        "revenue": {
            currency: {k: amounts[k] for k in ("total_minor", "today_minor", "month_minor")}
            for currency, amounts in sorted(raw["revenue"].items())
        },
        "payments_count": raw["payments_count"],
        "clients_total": raw["clients_total"],
        "clients_new_today": raw["clients_new_today"],
        "bookings": {
            "by_status": dict(sorted(raw["bookings"]["by_status"].items())),
            "by_payment_status": dict(sorted(raw["bookings"]["by_payment_status"].items())),
        },
    }
    profile = {
        "id": str(business_id),
        "name": row["name"],
        "timezone": row["timezone"],
        "created_at": row["created_at"].isoformat(),
        "today": row["today"].isoformat(),
    }
    return Figures(str(business_id), row["as_of_event_id"], figures, profile)


async def stats(conn: AsyncConnection, business_id: uuid.UUID) -> Figures | None:
    """The business's figures, or None when there is no such business."""
    return (await stats_of(conn, [business_id])).get(business_id)


async def stats_of(
    conn: AsyncConnection, business_ids: Sequence[uuid.UUID], *, timeout: float | None = None
) -> dict[uuid.UUID, Figures]:
    """The figures of these businesses, all as of the same event, in one statement; unknown ids are left out.

    `timeout` bounds the statement (None: the connection's own command timeout)."""
    rows = await conn.fetch(queries("figures")["stats"], business_ids, timeout=timeout)
    return {row["business_id"]: _figures_from_row(row["business_id"], row) for row in rows if row["found"]}


async def business_data(conn: AsyncConnection, business_id: uuid.UUID) -> dict[str, Any] | None:
    """`['business-data', id]`: the profile and the headline figures, or None for an unknown business."""
    figures = await stats(conn, business_id)
    if figures is None:
        return None
    return {
        "business_id": figures.business_id,
        "as_of_event_id": figures.as_of_event_id,
        "business": figures.profile,
        "figures": figures.figures,
    }


# -- revenue series ------------------------------------------------------------------------------------------


def _parse_instant(name: str, value: str, tz: ZoneInfo) -> datetime:
    """An ISO 8601 date or date-time between EARLIEST and LATEST, in UTC; one without an offset is wall-clock
    time in the business's timezone."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(
            f"{name} must be an ISO 8601 date or date-time, e.g. 2026-11-01 or 2026-11-01T08:00+03:00"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz)
    try:
        # Near year 1 or 9999 the conversion itself overflows (e.g. 9999-12-31T23:00-05:00).
        instant = parsed.astimezone(UTC)
    except (OverflowError, ValueError):
        instant = None
    if instant is None or not EARLIEST <= instant <= LATEST:
        raise BadRequest(f"{name} must be from {EARLIEST.date()} to {LATEST.date()} (UTC)")
    return instant


def _month_start(d: date) -> date:
    return d.replace(day=1)


def _add_months(d: date, months: int) -> date:
    index = d.year * 12 + d.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def _buckets(granularity: Granularity, start: datetime, end: datetime, tz: ZoneInfo) -> list[Any]:
    """Bucket starts covering [start, end): local hour instants, local days, or first days of local months."""
    out: list[Any] = []
    if granularity == "hour":
        local = start.astimezone(tz)
        hour = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
        while hour < end and len(out) <= MAX_BUCKETS:
            out.append(hour)
            hour += timedelta(hours=1)
        return out
    first = start.astimezone(tz).date()
    last = (end - timedelta(microseconds=1)).astimezone(tz).date()
    if granularity == "day":
        d = first
        while d <= last and len(out) <= MAX_BUCKETS:
            out.append(d)
            d += timedelta(days=1)
        return out
    m = _month_start(first)
    while m <= last and len(out) <= MAX_BUCKETS:
        out.append(m)
        m = _add_months(m, 1)
    return out


def _label(bucket: Any, granularity: Granularity, tz: ZoneInfo) -> str:
    if granularity == "hour":
        return str(bucket.astimezone(tz).isoformat())
    if granularity == "day":
        return str(bucket.isoformat())
    return f"{bucket.year:04d}-{bucket.month:02d}"


def _default_start(granularity: Granularity, end: datetime, tz: ZoneInfo) -> datetime:
    local_end = (end - timedelta(microseconds=1)).astimezone(tz)
    if granularity == "hour":
        return end - timedelta(hours=24)
    if granularity == "day":
        return datetime.combine(local_end.date() - timedelta(days=29), datetime.min.time(), tz)
    return datetime.combine(_add_months(local_end.date(), -11), datetime.min.time(), tz)


def _granularity(value: str | None) -> Granularity:
    """The requested granularity (absent or empty: day), or BadRequest."""
    if value not in (None, "", "hour", "day", "month"):
        raise BadRequest("granularity must be one of hour, day, month")
    return cast(Granularity, value or "day")


@dataclass(frozen=True)
class SeriesPlan:
    """What a revenue request asks for, checked: the instants, the buckets, and the SQL bounds of the query."""

    granularity: Granularity
    start: datetime
    end: datetime
    buckets: list[Any]
    lower: Any
    upper: Any


def plan_series(granularity: str | None, start: str | None, end: str | None, tz: ZoneInfo, now: datetime) -> SeriesPlan:
    """The series a request names in the business's timezone `tz`, or BadRequest saying what to fix.

    Pure (no database), so the property tests can try any input: anything it returns can be queried.
    """
    gran = _granularity(granularity)
    end_at = _parse_instant("to", end, tz) if end else now
    start_at = _parse_instant("from", start, tz) if start else _default_start(gran, end_at, tz)
    if start_at >= end_at:
        raise BadRequest("from must be earlier than to")
    buckets = _buckets(gran, start_at, end_at, tz)
    if len(buckets) > MAX_BUCKETS:
        raise BadRequest(f"the range holds more than {MAX_BUCKETS} {gran} buckets: narrow it or use a coarser one")
    if not buckets:
        raise BadRequest("the range holds no bucket")
    if gran == "hour":
        lower, upper = buckets[0], buckets[-1] + timedelta(hours=1)
    elif gran == "day":
        lower, upper = buckets[0], buckets[-1]
    else:
        lower, upper = buckets[0], _add_months(buckets[-1], 1) - timedelta(1)
    return SeriesPlan(gran, start_at, end_at, buckets, lower, upper)


async def revenue_series(
    conn: AsyncConnection,
    business_id: uuid.UUID,
    granularity: str | None,
    start: str | None,
    end: str | None,
) -> RevenueSeries | None:
    """`['business-revenue', id]`: completed revenue per bucket and currency over [from, to), zero-filled.

    Defaults: the last 24 hours, 30 days or 12 months up to now. None for an unknown business.
    """
    # Checked before the database too (plan_series checks it again): a bad granularity is a 400 for any id.
    _granularity(granularity)
    tz_name = await conn.fetchval(queries("figures")["business_timezone"], business_id)
    if tz_name is None:
        return None
    tz = ZoneInfo(tz_name)
    plan = plan_series(granularity, start, end, tz, datetime.now(UTC))
    gran, start_at, end_at, buckets = plan.granularity, plan.start, plan.end, plan.buckets
    query = {"hour": "revenue_hourly", "day": "revenue_daily", "month": "revenue_monthly"}[gran]
    rows = await conn.fetch(queries("figures")[query], business_id, plan.lower, plan.upper)
    as_of = rows[0]["as_of_event_id"]
    found: dict[str, dict[Any, tuple[int, int]]] = {}
    for r in rows:
        if r["currency"] is not None:
            found.setdefault(r["currency"], {})[r["bucket"]] = (int(r["revenue_minor"]), r["payments_count"])
    series = {
        currency: [
            {
                "bucket": _label(b, gran, tz),
                "revenue_minor": by_bucket.get(b, (0, 0))[0],
                "payments_count": by_bucket.get(b, (0, 0))[1],
            }
            for b in buckets
        ]
        for currency, by_bucket in sorted(found.items())
    }
    body = {
        "business_id": str(business_id),
        "as_of_event_id": as_of,
        "granularity": gran,
        "timezone": tz_name,
        "from": start_at.astimezone(tz).isoformat(),
        "to": end_at.astimezone(tz).isoformat(),
        "series": series,
    }
    return RevenueSeries(as_of, body)


# -- lists ---------------------------------------------------------------------------------------------------


def encode_cursor(sort_at: datetime, row_id: uuid.UUID) -> str:
    """An opaque `before` cursor: the (time, id) key of the last row of a page."""
    raw = f"{sort_at.astimezone(UTC).isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The key of a cursor made by `encode_cursor`; BadRequest for anything else.

    A cursor is valid only when encoding its key gives it back: that refuses, in one rule, garbage, other
    spellings of the same key, and instants a query could not bind (an offset that overflows near year 9999).
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, row_id = raw.partition("|")
        parsed = datetime.fromisoformat(at)
        key = (parsed, uuid.UUID(row_id))
        if parsed.tzinfo is None or encode_cursor(*key) != cursor:
            raise ValueError("not a cursor this gateway made")
        return key
    except (ValueError, OverflowError, UnicodeDecodeError, binascii.Error):
        raise BadRequest("before must be a cursor returned as next_before by a previous page") from None


def parse_limit(value: str | None) -> int:
    # ASCII digits only: int() would also take "+5", "5_0" and other scripts' digits, which no client means.
    if value is None or value == "":
        return DEFAULT_LIMIT
    if not (value.isascii() and value.isdigit() and len(value) <= 3 and 1 <= int(value) <= MAX_LIMIT):
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(value)


async def list_page(
    conn: AsyncConnection, kind: ListKind, business_id: uuid.UUID, before: str | None, limit: str | None
) -> Page | None:
    """One page, newest first, strictly before the cursor; None for an unknown business."""
    size = parse_limit(limit)
    key = decode_cursor(before) if before else _FIRST_PAGE
    q = queries("figures")
    # One more row than asked tells whether a next page exists without a count.
    rows = await conn.fetch(q[kind], business_id, key[0], key[1], size + 1)
    if rows[0]["id"] is None and not await conn.fetchval(q["business_exists"], business_id):
        return None
    found = [r for r in rows if r["id"] is not None]
    items = [json.loads(r["item"]) for r in found[:size]]
    next_before = encode_cursor(found[size - 1]["sort_at"], found[size - 1]["id"]) if len(found) > size else None
    return Page(rows[0]["as_of_event_id"], items, next_before)
