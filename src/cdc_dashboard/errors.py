"""Errors the command line reports as one line and a non-zero exit, never as a traceback."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Something the operator can fix; the message says what and how."""
