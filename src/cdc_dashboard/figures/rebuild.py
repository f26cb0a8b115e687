"""Figures recomputed from the ledger: a manual refresh of one business, and `aggregates rebuild`.

Both repair the precomputed aggregates in place and emit an invalidation event for every business they
rebuilt, so open dashboards fetch the repaired figures.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from ..db import AsyncConnection
from ..errors import UserError
from ..sqlfiles import queries
from .reads import stats

__all__ = ["RebuildReport", "figure_differences", "plan_chunks", "rebuild", "rebuild_lines", "refresh", "run_rebuild"]

# A rebuild's chunk: at most this many businesses and (unless one business alone has more) this many rows
# (payments plus bookings), in one transaction. Large enough that what a chunk costs beyond its rows vanishes,
# small enough that the listener, which waits for a chunk's lock, waits under a second.
REBUILD_CHUNK_BUSINESSES = 1000
REBUILD_CHUNK_ROWS = 20_000
# A progress line at least this often while a rebuild runs (also while one long chunk runs).
REBUILD_PROGRESS_SECONDS = 2.0


@dataclass
class RebuildReport:
    """What a rebuild repaired (rows per rollup, per business) and the events it emitted."""

    businesses: int = 0
    repaired: dict[str, dict[str, int]] = field(default_factory=dict)
    event_ids: list[int] = field(default_factory=list)


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


async def _rebuild_in_transaction(
    conn: AsyncConnection, ids: list[uuid.UUID], report: RebuildReport, timeout: float | None = None
) -> None:
    """Rebuild these businesses and emit their invalidations, in the caller's transaction. A business outside
    `ids` whose figures the rebuild also repaired (a payment or booking moved to or from it) gets one too.
    `timeout` bounds the rebuild statement (None: the connection's own command timeout)."""
    q = queries("figures")
    extra: list[str] = []
    chunk = {str(b) for b in ids}
    for r in await conn.fetch(q["rebuild"], ids, timeout=timeout):
        business = str(r["business_id"])
        if business not in chunk and business not in extra:
            extra.append(business)
        per_business = report.repaired.setdefault(business, {})
        per_business[r["rollup"]] = per_business.get(r["rollup"], 0) + r["rows_repaired"]
    event_ids = await conn.fetchval(q["append_refresh_events"], [str(b) for b in ids] + extra)
    report.event_ids.extend(event_ids)
    report.businesses += len(ids)


async def refresh(
    conn: AsyncConnection, business_id: uuid.UUID, *, rebuild_timeout: float | None = None
) -> dict[str, Any] | None:
    """Recompute one business from the base tables and emit an invalidation, in one transaction.

    Returns what was repaired (rows per rollup, figures before and after), or None for an unknown business.
    `rebuild_timeout` bounds the rebuild statement alone: on a large business it runs for seconds, longer than
    the gateway allows its other statements.
    """
    async with conn.transaction():
        before = await stats(conn, business_id)
        if before is None:
            return None
        report = RebuildReport()
        await _rebuild_in_transaction(conn, [business_id], report, rebuild_timeout)
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
    conn: AsyncConnection,
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
