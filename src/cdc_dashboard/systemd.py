"""sd_notify for `Type=notify` units: READY, WATCHDOG, STOPPING, STATUS.

A datagram to $NOTIFY_SOCKET; outside systemd (no socket) every call is a no-op. The protocol is a few lines
of text, so it is written here rather than pulling in a dependency.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

__all__ = ["Notifier"]


class Notifier:
    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET")
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self._address = address
        usec = os.environ.get("WATCHDOG_USEC")
        # Pet the watchdog at twice its rate, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2_000_000 if usec and usec.isdigit() else None
        self._last_watchdog = 0.0

    def notify(self, message: str) -> None:
        if not self._address:
            return
        # OSError: systemd is gone (shutdown), there is nobody to tell.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.sendto(message.encode(), self._address)

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def watchdog(self) -> None:
        """Called from the healthy loop; sends at most at the interval systemd asked for."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= self.watchdog_interval:
            self._last_watchdog = now
            self.notify("WATCHDOG=1")
