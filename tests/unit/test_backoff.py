from __future__ import annotations

import pytest

from cdc_dashboard.db.backoff import Backoff


def test_doubles_until_cap_without_jitter() -> None:
    b = Backoff(initial=0.1, factor=2, cap=1.0, jitter=0, rand=lambda: 0.5)
    assert [round(b.next_delay(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert b.attempts == 6


def test_jitter_stays_within_bounds_and_reset_restarts() -> None:
    b = Backoff(initial=1.0, factor=2, cap=8.0, jitter=0.5, rand=lambda: 1.0)
    assert b.next_delay() == 0.5
    assert b.next_delay() == 1.0
    b.reset()
    assert b.next_delay() == 0.5


def test_never_gives_up() -> None:
    b = Backoff(initial=0.1, cap=10)
    delays = [b.next_delay() for _ in range(1000)]
    assert all(0 < d <= 10 for d in delays)


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Backoff(initial=0)
