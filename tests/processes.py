"""Helpers for tests that run the product as a subprocess."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

__all__ = ["stop_process"]


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Ask a still-running process to stop with `sig`, as systemd or an operator would; kill it if it has not
    exited within `timeout` seconds, so a hung process never outlives its test."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
