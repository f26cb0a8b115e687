"""The gateway's limits: per-address rate limits, the per-token stream cap and the manual-refresh cooldown.

All three live in the memory of one gateway process (no database round trip on the hot path, and nothing to
clean up after a crash). With N replicas behind a balancer a client gets at most N times each limit, which
is what they are for: to keep one client from taking a whole gateway, not to meter it exactly.

Every table here is bounded: entries go when they no longer limit anything (a bucket refilled, a cooldown
over, a token's last stream closed), and the rate-limit table also has a hard ceiling, so a caller with many
addresses cannot grow the gateway's memory.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Settings

__all__ = ["Limits", "RateLimiter", "RefreshCooldown", "StreamsPerToken", "retry_after"]

Clock = Callable[[], float]

# Distinct addresses a rate limiter remembers at most (~250 bytes each: 25 MB at the ceiling). Past it the least
# recently seen is forgotten: that address starts again with a full bucket, the worst an attacker with this many
# addresses gets.
MAX_TRACKED_ADDRESSES = 100_000


def retry_after(seconds: float) -> str:
    """A `Retry-After` value: whole seconds, rounded up, at least 1 (0 would invite an immediate retry)."""
    return str(max(1, math.ceil(seconds)))


class RateLimiter:
    """A token bucket per key: `per_minute` requests a minute on average, in bursts of up to `per_minute`.

    The bucket holds a minute's worth so that a reconnect storm (every dashboard behind one NAT after a
    deploy) passes whole, while a flood is held to the average. `per_minute` 0 turns the limiter off.
    """

    def __init__(self, per_minute: int, *, max_keys: int = MAX_TRACKED_ADDRESSES, clock: Clock = time.monotonic):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self._max_keys = max_keys
        self._clock = clock
        # key -> (tokens, when they were counted), least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float | None:
        """Spend one token of `key`'s bucket: None when there was one, else the seconds until there is."""
        if self.capacity <= 0:
            return None
        now = self._clock()
        self._evict(now)
        tokens, counted_at = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - counted_at) * self.rate)
        wait: float | None = None
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[key] = (tokens, now)  # (re)inserted last: the most recently used
        return wait

    def _evict(self, now: float) -> None:
        # A bucket untouched for a full refill (a minute) is full again, the same as no entry: drop those from
        # the old end, and the oldest beyond the ceiling. Each entry is dropped once: O(1) per call on average.
        refill_seconds = self.capacity / self.rate
        while self._buckets:
            oldest_key = next(iter(self._buckets))
            _, counted_at = self._buckets[oldest_key]
            if now - counted_at < refill_seconds and len(self._buckets) < self._max_keys:
                return
            del self._buckets[oldest_key]


class StreamsPerToken:
    """How many streams each token holds open on this gateway; entries go with a token's last stream."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, token_id: str) -> bool:
        """Count one more stream of the token; False (and nothing counted) when it holds `limit` already."""
        held = self._open.get(token_id, 0)
        if held >= self.limit:
            return False
        self._open[token_id] = held + 1
        return True

    def release(self, token_id: str) -> None:
        held = self._open.get(token_id, 0) - 1
        if held > 0:
            self._open[token_id] = held
        else:
            self._open.pop(token_id, None)

    def held(self, token_id: str) -> int:
        return self._open.get(token_id, 0)


class RefreshCooldown:
    """At most one manual refresh per business per `seconds` on this gateway.

    The slot is claimed before the refresh runs, so a double click does not rebuild twice in parallel; a
    refresh that fails gives its slot back (`forget`), so the retry after an outage is not refused.
    """

    def __init__(self, seconds: float, *, clock: Clock = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        # business -> when its last refresh was claimed, oldest first (one cooldown for all: claim order is
        # expiry order, so expired entries are always at the front).
        self._claimed: OrderedDict[str, float] = OrderedDict()

    def claim(self, business_id: str) -> float | None:
        """None when the refresh may run now (and the slot is taken), else the seconds left to wait."""
        if self.seconds <= 0:
            return None
        now = self._clock()
        while self._claimed:
            oldest, at = next(iter(self._claimed.items()))
            if now - at < self.seconds:
                break
            del self._claimed[oldest]
        claimed_at = self._claimed.get(business_id)
        if claimed_at is not None:
            return self.seconds - (now - claimed_at)
        self._claimed[business_id] = now
        return None

    def forget(self, business_id: str) -> None:
        self._claimed.pop(business_id, None)


@dataclass(eq=False)
class Limits:
    """The limits of one gateway, from its settings."""

    webhooks: RateLimiter
    stream_opens: RateLimiter
    streams_per_token: StreamsPerToken
    refresh: RefreshCooldown
    # Seconds a client told "stream cap reached" waits: long enough for a closed tab's stream to be noticed.
    stream_cap_retry_seconds: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            webhooks=RateLimiter(settings.rate_limit_webhooks_per_minute),
            stream_opens=RateLimiter(settings.rate_limit_stream_opens_per_minute),
            streams_per_token=StreamsPerToken(settings.max_streams_per_token),
            refresh=RefreshCooldown(settings.refresh_cooldown_seconds),
        )
