"""Figures pushed with live events: a dashboard sets `['dashboard-stats', id]` from the event, fetching nothing.

For every batch of events the hub is about to deliver, the businesses in it that have a stream on this gateway
get their `dashboard-stats` figures read in ONE statement (sql/queries/figures.sql `stats`, the same one
`GET /stats` runs), and the last event of each such business in the batch carries them:

    data: {...the event's payload..., "figures": {"dashboard-stats": {...the body GET /stats returns...}}}

So a gateway reads figures once per batch, whatever the number of streams, businesses or events in it; a
dashboard that sets the query's data from the event makes no request for it.

The rules, and why:
- Only the last event of a business in the batch carries figures: the earlier ones would carry the same body
  (one read, one snapshot), and a client applies the last anyway.
- Only live delivery: replays (the hub's memory, the database) send the stored payload. Figures read now would
  be far newer than a replayed event, which is allowed, but a resuming client refetches anyway, and reading
  figures per resuming stream is exactly the per-subscriber read this avoids.
- Guarantee 2: the figures include the event they arrive with. They are read after the batch, in one snapshot
  whose `as_of_event_id` is `dashboard.listener_state.last_event_id`; every appender (the listener, a manual
  refresh) moves it in the transaction that appends the event and changes the figures, so it is normally at
  least the batch's last id. An event above it (appended by some other path) gets no figures: the client then
  refetches, as it does for every key not pushed. A manual refresh's event carries figures like any other:
  its transaction rebuilt them and moved `last_event_id` to the event.
- A read that fails or takes longer than READ_TIMEOUT_SECONDS (a lock, a slow or dead database) costs the batch
  its figures, not its delivery: the events go out plain, dashboards refetch, one line is logged.
- `invalidate` events only: a `resync` makes the client refetch everything.
- `dashboard-stats` only: every other key the event names is refetched. Its figures are a few rollup rows per
  business; the next candidate, the transactions page, reads fifty rows per business on this path that every
  event of the batch waits for, and would make every subscriber's frame many times larger (measured:
  docs/BENCHMARKS.md, "2026-12-08: pushing the transactions page too? (issue 18)").

The read runs on the hub's own LISTEN connection, between reading the batch and dispatching it: it needs no
pooled connection, so a pool busy with HTTP requests (up to its acquire timeout) never delays live events, and
it runs once per batch by construction. While it runs, new events wait in the table and are read, with their
figures, as the next batch (batches grow with load: more events per read). A read that times out is cancelled
on the server; when the path is dead and that cancellation is never acknowledged, asyncpg terminates the
connection within the next statement's timeout, and the hub reconnects and catches up by id, losing nothing
(tests/integration/test_gateway_outage.py freezes the path during a read).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Container, Sequence
from typing import Any

import asyncpg

from ..db import AsyncConnection
from ..figures import reads
from .database import describe_error, is_unavailable
from .metrics import GatewayMetrics

__all__ = ["PUSHED_KEY", "READ_TIMEOUT_SECONDS", "live_payloads", "with_figures"]

log = logging.getLogger(__name__)

# The query key whose data the events carry (DESIGN, "The event stream").
PUSHED_KEY = "dashboard-stats"
# The figures of a whole batch are index lookups on the aggregates, milliseconds even for a thousand
# businesses: a read that takes this long means a lock or a struggling database, and the events should not
# wait for it any longer than this.
READ_TIMEOUT_SECONDS = 1.0


def with_figures(payload: str, stats_body: dict[str, Any]) -> str | None:
    """The payload (a JSON object's text) with `"figures": {"dashboard-stats": stats_body}` as its last member;
    None when the payload is not an object.

    Spliced into the text rather than parsed and re-serialised: the rest of the event stays byte for byte what
    the replay of the same event sends. The body is serialised as `GET /stats` serialises it (starlette's
    JSONResponse), so the two are equal byte for byte too. Payloads never have a `figures` member of their own
    (the listener and manual refresh build them: sql/schema/40_listener_batch.sql, 20_events.sql).
    """
    text = payload.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    inner = text[:-1].rstrip()
    figures = json.dumps({PUSHED_KEY: stats_body}, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # A member's value never ends with "{", so this is an empty object.
    comma = "" if inner.endswith("{") else ","
    return f'{inner}{comma}"figures":{figures}}}'


def _last_invalidations(rows: Sequence[asyncpg.Record], subscribed: Container[str]) -> dict[uuid.UUID, asyncpg.Record]:
    """Each subscribed business's last event in the batch, when that is an `invalidate`, by business id."""
    last: dict[str, asyncpg.Record] = {}
    for row in rows:
        business = row["business_id"]
        if business is not None and business in subscribed:
            last[business] = row
    out: dict[uuid.UUID, asyncpg.Record] = {}
    for business, row in last.items():
        if row["kind"] != "invalidate":
            continue
        try:
            key = uuid.UUID(business)
        except ValueError:
            continue  # not a business the figures know (streams only open for canonical UUIDs anyway)
        out[key] = row
    return out


async def live_payloads(
    conn: AsyncConnection,
    rows: Sequence[asyncpg.Record],
    subscribed: Container[str],
    metrics: GatewayMetrics,
) -> dict[int, str]:
    """Event id → payload with figures, for the last `invalidate` of each business in `rows` (one batch, in id
    order) that has a stream here (`subscribed`: business ids). One statement, none when no business qualifies;
    an empty answer when it fails (logged): the events then go out as they are."""
    events = _last_invalidations(rows, subscribed)
    if not events:
        return {}
    metrics.figures_reads.inc()
    try:
        with metrics.figures_read_seconds.time():
            found = await reads.stats_of(conn, list(events), timeout=READ_TIMEOUT_SECONDS)
    except Exception as exc:
        # Whatever it was, the batch is delivered: an error here must never hold events back (the hub would
        # retry the same batch, and fail the same way, forever). A database that is away or slow is expected
        # and needs one line; anything else is a bug and gets its traceback.
        metrics.figures_read_failures.inc()
        expected = is_unavailable(exc) or isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError)
        log.warning(
            "reading the figures of a batch failed; its events go out without figures",
            extra={"error": describe_error(exc), "businesses": len(events)},
            exc_info=None if expected else exc,
        )
        return {}
    payloads: dict[int, str] = {}
    for business, figures in found.items():
        row = events[business]
        if figures.as_of_event_id < row["id"]:
            # Figures that do not include the event would break guarantee 2: the client refetches instead.
            metrics.figures_withheld.inc()
            continue
        payload = with_figures(row["payload"], figures.stats_body())
        if payload is not None:
            payloads[row["id"]] = payload
    metrics.figures_pushed.inc(len(payloads))
    return payloads
