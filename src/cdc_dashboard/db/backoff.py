"""Reconnect delays: exponential with jitter, capped, never giving up.

Jitter matters: after a PostgreSQL restart every listener and gateway reconnects at once; spreading them
out keeps the server from a thundering herd of connection attempts.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """`next_delay()` gives initial·factor^n seconds (capped), each scaled by a random factor in [1-jitter, 1]."""

    def __init__(
        self,
        initial: float = 0.1,
        factor: float = 2.0,
        cap: float = 10.0,
        jitter: float = 0.5,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not (initial > 0 and factor >= 1 and cap >= initial and 0 <= jitter <= 1):
            raise ValueError("backoff needs initial > 0, factor >= 1, cap >= initial, 0 <= jitter <= 1")
        self._initial, self._factor, self._cap, self._jitter, self._rand = initial, factor, cap, jitter, rand
        self._attempts = 0

    @property
    def attempts(self) -> int:
        return self._attempts

    def next_delay(self) -> float:
        base = min(self._cap, self._initial * self._factor**self._attempts)
        self._attempts += 1
        return base * (1 - self._jitter * self._rand())

    def reset(self) -> None:
        """After a success: the next failure starts again from the initial delay."""
        self._attempts = 0
