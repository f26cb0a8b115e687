"""Durations as an operator reads them in the tools' output: seconds, then minutes, hours, days."""

from __future__ import annotations

__all__ = ["duration_text"]


def duration_text(seconds: float, *, decimals: int = 1) -> str:
    """`12.5 s`, `7 min`, `3.2 h`, `4.0 days`; `decimals` is the precision of the seconds."""
    if seconds < 120:
        return f"{seconds:.{decimals}f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
