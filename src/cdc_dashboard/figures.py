"""The figures and lists dashboards fetch, read from the precomputed aggregates; manual refresh and rebuild.

Every read is one SQL statement (sql/queries/figures.sql) that also reads the listener's last event id, so
`as_of_event_id` names exactly the event the figures include. Functions take an asyncpg connection; the
gateway (gateway/figures.py) adds authorisation, ETags and HTTP errors, the CLI adds printing.

Parameters a client sends are validated here and rejected with `BadRequest`, whose message says what to fix.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, cast
from zoneinfo import ZoneInfo

import asyncpg

from .sqlfiles import queries

__all__ = [
    "LIST_KINDS",
    "MAX_BUCKETS",
    "MAX_LIMIT",
    "BadRequest",
    "Figures",
    "Granularity",
    "ListKind",
    "Page",
    "RebuildReport",
    "RevenueSeries",
    "business_data",
    "decode_cursor",
    "encode_cursor",
    "list_page",
    "plan_chunks",
    "rebuild",
    "refresh",
    "revenue_series",
    "stats",
]

Granularity = Literal["hour", "day", "month"]
ListKind = Literal["transactions", "payments", "payment_transactions", "client_business_transactions", "bookings"]
LIST_KINDS: tuple[ListKind, ...] = (
    "transactions",
    "payments",
    "payment_transactions",
    "client_business_transactions",
    "bookings",
)
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
# A series longer than this is a mistake (e.g. hourly over years) and would make a huge response.
MAX_BUCKETS = 2000
# The first page: strictly before a key no row has (any timestamp < infinity), so one indexed query serves
# both the first page and the next ones.
_FIRST_PAGE = (datetime.max.replace(tzinfo=UTC), uuid.UUID(int=(1 << 128) - 1))
# A rebuild's chunk: at most this many businesses and (unless one business alone has more) this many rows
# (payments plus bookings), in one transaction. Large enough that per-chunk costs vanish (1M payments: 20k- and
# 50k-row chunks took the same time), small enough that the listener, which waits for a chunk's lock, waits
# under a second when the rebuild has everything to build (docs/BENCHMARKS.md, "Aggregates rebuild").
REBUILD_CHUNK_BUSINESSES = 1000
REBUILD_CHUNK_ROWS = 20_000
# A progress line at least this often while a rebuild runs (also while one long chunk runs).
REBUILD_PROGRESS_SECONDS = 2.0


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


@dataclass
class RebuildReport:
    """What a rebuild repaired (rows per rollup, per business) and the events it emitted."""

    businesses: int = 0
    repaired: dict[str, dict[str, int]] = field(default_factory=dict)
    event_ids: list[int] = field(default_factory=list)


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


async def stats(conn: asyncpg.Connection, business_id: uuid.UUID) -> Figures | None:
    """The business's figures, or None when there is no such business."""
    row = await conn.fetchrow(queries("figures")["stats"], business_id)
    if row is None or not row["found"]:
        return None
    return _figures_from_row(business_id, row)


async def business_data(conn: asyncpg.Connection, business_id: uuid.UUID) -> dict[str, Any] | None:
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
    """An ISO 8601 date or date-time; one without an offset is wall-clock time in the business's timezone."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(
            f"{name} must be an ISO 8601 date or date-time, e.g. 2026-11-01 or 2026-11-01T08:00+03:00"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz)
    return parsed


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


async def revenue_series(
    conn: asyncpg.Connection,
    business_id: uuid.UUID,
    granularity: str | None,
    start: str | None,
    end: str | None,
) -> RevenueSeries | None:
    """`['business-revenue', id]`: completed revenue per bucket and currency over [from, to), zero-filled.

    Defaults: the last 24 hours, 30 days or 12 months up to now. None for an unknown business.
    """
    if granularity not in (None, "", "hour", "day", "month"):
        raise BadRequest("granularity must be one of hour, day, month")
    gran: Granularity = cast(Granularity, granularity or "day")
    tz_name = await conn.fetchval(queries("figures")["business_timezone"], business_id)
    if tz_name is None:
        return None
    tz = ZoneInfo(tz_name)
    end_at = _parse_instant("to", end, tz) if end else datetime.now(UTC)
    start_at = _parse_instant("from", start, tz) if start else _default_start(gran, end_at, tz)
    if start_at >= end_at:
        raise BadRequest("from must be earlier than to")
    buckets = _buckets(gran, start_at, end_at, tz)
    if len(buckets) > MAX_BUCKETS:
        raise BadRequest(f"the range holds more than {MAX_BUCKETS} {gran} buckets: narrow it or use a coarser one")
    if not buckets:
        raise BadRequest("the range holds no bucket")
    q = queries("figures")
    if gran == "hour":
        rows = await conn.fetch(q["revenue_hourly"], business_id, buckets[0], buckets[-1] + timedelta(hours=1))
    elif gran == "day":
        rows = await conn.fetch(q["revenue_daily"], business_id, buckets[0], buckets[-1])
    else:
        rows = await conn.fetch(
            q["revenue_monthly"], business_id, buckets[0], _add_months(buckets[-1], 1) - timedelta(1)
        )
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
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, row_id = raw.partition("|")
        parsed = datetime.fromisoformat(at)
        if parsed.tzinfo is None:
            raise ValueError("naive")
        return parsed, uuid.UUID(row_id)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise BadRequest("before must be a cursor returned as next_before by a previous page") from None


def parse_limit(value: str | None) -> int:
    if value is None or value == "":
        return DEFAULT_LIMIT
    try:
        limit = int(value)
    except ValueError:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return limit


async def list_page(
    conn: asyncpg.Connection, kind: ListKind, business_id: uuid.UUID, before: str | None, limit: str | None
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


# -- refresh and rebuild -------------------------------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def figure_differences(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Figures that differ, by dotted path (`revenue.KES.total_minor`), with both values (0 when absent)."""
    old, new = _flatten(before), _flatten(after)
    return {
        path: {"before": old.get(path, 0), "after": new.get(path, 0)}
        for path in sorted(old.keys() | new.keys())
        if old.get(path, 0) != new.get(path, 0)
    }


async def _rebuild_in_transaction(conn: asyncpg.Connection, ids: list[uuid.UUID], report: RebuildReport) -> None:
    """Rebuild these businesses and emit their invalidations, in the caller's transaction. A business outside
    `ids` whose figures the rebuild also repaired (a payment or booking moved to or from it) gets one too."""
    q = queries("figures")
    extra: list[str] = []
    chunk = {str(b) for b in ids}
    for r in await conn.fetch(q["rebuild"], ids):
        business = str(r["business_id"])
        if business not in chunk and business not in extra:
            extra.append(business)
        per_business = report.repaired.setdefault(business, {})
        per_business[r["rollup"]] = per_business.get(r["rollup"], 0) + r["rows_repaired"]
    event_ids = await conn.fetchval(q["append_refresh_events"], [str(b) for b in ids] + extra)
    report.event_ids.extend(event_ids)
    report.businesses += len(ids)


async def refresh(conn: asyncpg.Connection, business_id: uuid.UUID) -> dict[str, Any] | None:
    """Recompute one business from the base tables and emit an invalidation, in one transaction.

    Returns what was repaired (rows per rollup, figures before and after), or None for an unknown business.
    """
    async with conn.transaction():
        before = await stats(conn, business_id)
        if before is None:
            return None
        report = RebuildReport()
        await _rebuild_in_transaction(conn, [business_id], report)
        after = await stats(conn, business_id)
        assert after is not None
    rows = report.repaired.get(str(business_id), {})
    return {
        "business_id": str(business_id),
        "event_id": report.event_ids[0],  # its own (any other business's come after it)
        "as_of_event_id": after.as_of_event_id,
        "repaired": bool(rows),
        "rows_repaired": rows,
        "differences": figure_differences(before.figures, after.figures),
        "figures": after.figures,
    }


def plan_chunks(
    sizes: Sequence[tuple[uuid.UUID, int]], max_businesses: int, max_rows: int
) -> list[list[tuple[uuid.UUID, int]]]:
    """Cut (business, rows) pairs, in their order, into chunks of at most `max_businesses` businesses and
    `max_rows` rows; a business with more rows than that is a chunk of its own."""
    chunks: list[list[tuple[uuid.UUID, int]]] = []
    current: list[tuple[uuid.UUID, int]] = []
    rows = 0
    for business, n in sizes:
        if current and (len(current) >= max_businesses or rows + n > max_rows):
            chunks.append(current)
            current, rows = [], 0
        current.append((business, n))
        rows += n
    if current:
        chunks.append(current)
    return chunks


class _Progress:
    """Progress lines of a rebuild: at the start, then at least every `every` seconds (while a long chunk
    runs too), and at the end."""

    def __init__(self, emit: Callable[[str], None] | None, businesses: int, rows: int, chunks: int, every: float):
        self.emit, self.every = emit, every
        self.businesses_total, self.rows_total, self.chunks_total = businesses, rows, chunks
        self.businesses = self.rows = self.chunks = 0
        self.started = self.last = time.monotonic()

    def line(self, state: str = "") -> str:
        if self.rows_total:
            pct = 100 * self.rows // self.rows_total
        else:
            pct = 100 * self.businesses // max(self.businesses_total, 1)
        elapsed = time.monotonic() - self.started
        left = f", about {elapsed * (self.rows_total - self.rows) / self.rows:.0f} s left" if self.rows else ""
        return (
            f"aggregates rebuild: {self.businesses}/{self.businesses_total} businesses ({pct}%), "
            f"{self.rows}/{self.rows_total} rows, {elapsed:.1f} s{state or left}"
        )

    def say(self, text: str) -> None:
        if self.emit is not None:
            self.emit(text)
        self.last = time.monotonic()

    def start(self) -> None:
        self.say(
            f"aggregates rebuild: {self.businesses_total} businesses, {self.rows_total} rows "
            f"(payments and bookings), in {self.chunks_total} chunks"
        )

    def due(self) -> float | None:
        """Seconds until the next line is due (None: a line per chunk, none while one runs)."""
        if self.every <= 0:
            return None
        return max(0.0, self.last + self.every - time.monotonic())

    def running(self) -> None:
        self.say(self.line() + f"; chunk {self.chunks + 1}/{self.chunks_total} running")

    def chunk_done(self, businesses: int, rows: int) -> None:
        self.businesses += businesses
        self.rows += rows
        self.chunks += 1
        if self.chunks < self.chunks_total and not self.due():
            self.say(self.line())

    def finish(self) -> None:
        self.say(self.line(f", done in {self.chunks} chunks"))


async def _with_heartbeat(work: Coroutine[Any, Any, None], shown: _Progress) -> None:
    """Await `work`, with a progress line whenever one is due while it runs."""
    task = asyncio.create_task(work)
    try:
        while not (await asyncio.wait({task}, timeout=shown.due()))[0]:
            shown.running()
    finally:
        if not task.done():
            task.cancel()
    await task


async def rebuild(
    conn: asyncpg.Connection,
    business_ids: list[uuid.UUID] | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    chunk_businesses: int = REBUILD_CHUNK_BUSINESSES,
    chunk_rows: int = REBUILD_CHUNK_ROWS,
    progress_seconds: float = REBUILD_PROGRESS_SECONDS,
) -> RebuildReport:
    """Recompute these businesses (all when None) from the base tables and emit each one's invalidation.

    The businesses are taken in id order, in chunks of at most `chunk_businesses` businesses and `chunk_rows`
    payments and bookings; each chunk is one transaction that reads just its businesses' rows through their
    indexes (sql/schema/30_aggregates.sql), so a rebuild costs what the ledger's rows cost. A chunk that committed stays
    rebuilt if a later one fails: run it again. `progress` receives a line at the start, at least every
    `progress_seconds`, and at the end. Unknown ids are rebuilt too (to nothing); a business created while
    the rebuild runs is not (the listener builds it)."""
    q = queries("figures")
    if business_ids is None:
        sizes = [(r["id"], r["rows"]) for r in await conn.fetch(q["rebuild_sizes"])]
    else:
        sizes = [(r["id"], r["rows"]) for r in await conn.fetch(q["rebuild_sizes_of"], list(set(business_ids)))]
    chunks = plan_chunks(sizes, max(chunk_businesses, 1), max(chunk_rows, 1))
    shown = _Progress(progress, len(sizes), sum(n for _, n in sizes), len(chunks), progress_seconds)
    shown.start()
    report = RebuildReport()

    async def one(ids: list[uuid.UUID]) -> None:
        async with conn.transaction():
            await _rebuild_in_transaction(conn, ids, report)

    for chunk in chunks:
        await _with_heartbeat(one([b for b, _ in chunk]), shown)
        shown.chunk_done(len(chunk), sum(n for _, n in chunk))
    shown.finish()
    return report


def rebuild_lines(report: RebuildReport) -> list[str]:
    """What `cdc-dashboard aggregates rebuild` prints: each repair, then a summary."""
    lines = [
        f"{business}: repaired " + ", ".join(f"{rollup} {n} rows" for rollup, n in sorted(rows.items()))
        for business, rows in sorted(report.repaired.items())
    ]
    lines.append(
        f"rebuilt {report.businesses} businesses; "
        + (f"repaired {len(report.repaired)} of them" if report.repaired else "nothing needed repair")
        + f"; emitted {len(report.event_ids)} invalidation events"
    )
    return lines


def run_rebuild(url: str, business_ids: list[str] | None, progress: Callable[[str], None] | None = None) -> list[str]:
    """`cdc-dashboard aggregates rebuild [--business ID]`: rebuild, emit invalidations, describe the repairs.

    Progress lines go to `progress` as the rebuild runs (the CLI prints them on stderr); the returned lines
    (stdout) are the repairs and the summary."""
    from .errors import UserError

    try:
        ids = [uuid.UUID(b) for b in business_ids] if business_ids else None
    except ValueError:
        raise UserError("--business must be a business id (a UUID)") from None

    async def go() -> RebuildReport:
        try:
            conn = await asyncpg.connect(url, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            raise UserError(f"cannot connect to the database: {exc}") from None
        try:
            if ids is not None:
                q = queries("figures")
                unknown = [str(b) for b in ids if not await conn.fetchval(q["business_exists"], b)]
                if unknown:
                    raise UserError(f"no such business: {', '.join(unknown)}")
            return await rebuild(conn, ids, progress=progress)
        finally:
            await conn.close()

    return rebuild_lines(asyncio.run(go()))
