"""What the benchmarks share: a scratch database, its change-log backlog and waiting for it to drain, waiting for a
gateway subprocess to be ready, the connection reports of their client processes, and stopping a subprocess.

The server is CDC_BENCH_ADMIN_URL (default: this machine's PostgreSQL, postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg

from cdc_dashboard.db import with_database
from cdc_dashboard.migrations import apply

__all__ = ["backlog", "connection_reports", "scratch_database", "wait_drained", "wait_ready"]


@contextmanager
def scratch_database(
    prefix: str = "cdc_bench",
    *,
    reuse: str | None = None,
    keep: bool = False,
    prepare: Callable[[str], object] = apply,
) -> Iterator[str]:
    """Yields the URL of a fresh database that `prepare` (default: `db apply`) has set up; dropped afterwards
    unless `keep`. With `reuse`, the named database (already prepared) is used as it is and never dropped."""
    admin = os.environ.get("CDC_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    if reuse:
        yield with_database(admin, reuse)
        return
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    try:
        url = with_database(admin, name)
        prepare(url)
        yield url
    finally:
        if keep:
            print(f"kept database {name}", flush=True)
        else:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'drop database if exists "{name}" with (force)')


def backlog(url: str) -> int:
    """Changes waiting in the change log (not consumed yet)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("select count(*) from cdc.change_log").fetchone()
    return int(row[0]) if row else -1


def wait_drained(url: str, seconds: float = 60) -> None:
    """Wait until the change log is empty (the listener consumed everything), at most `seconds`."""
    deadline = time.monotonic() + seconds
    while backlog(url) and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_ready(port: int, proc: subprocess.Popen[Any], seconds: float = 60) -> None:
    """Wait until the gateway on `port` answers /readyz 200; raise if it exits or takes longer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}")
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
            if sock.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.2)
    raise RuntimeError("the gateway did not become ready")


def connection_reports(clients: list[subprocess.Popen[Any]]) -> tuple[int, int]:
    """(connected, failures) summed over client processes that each print one JSON line once connected."""
    connected = failures = 0
    for client in clients:
        assert client.stdout is not None
        report = json.loads(client.stdout.readline())
        connected += report["connected"]
        failures += report["failures"]
    return connected, failures


def stop(proc: subprocess.Popen[Any], timeout: float = 15) -> None:
    """SIGTERM (a graceful end: a gateway drains, a listener finishes its batch), SIGKILL after `timeout` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
