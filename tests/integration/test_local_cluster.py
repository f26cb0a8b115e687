"""deploy/local/cluster.sh: three gateways behind HAProxy and two listeners, as an operator starts them.

Needs Debian's haproxy (.ci/run installs it; elsewhere the test is skipped rather than installing packages).
The rolling deploy under load is bench/rolling_deploy.py; this checks the script's own promises: the proxy
answers, resumes by Last-Event-ID across a gateway restart, the gateways see the client in X-Forwarded-For,
the standby takes over, and `down` stops exactly what `up` started.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from .gateway_support import SECRET, append_events, token_for

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (apt-get install haproxy)")

CLUSTER = Path(__file__).resolve().parents[2] / "deploy" / "local" / "cluster.sh"


def _free_base_port() -> int:
    """P with P..P+3 and P+404 free."""
    for base in range(32000, 60000, 97):
        try:
            for port in [base, base + 1, base + 2, base + 3, base + 404]:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports")


def _cluster(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([str(CLUSTER), *args], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _read_event_ids(port: int, business: str, last_id: int, count: int) -> list[int]:
    """Open a stream through the proxy from 127.0.1.1 with Last-Event-ID; the ids of the first `count` events."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.1.1", 0)) as sock:
        sock.sendall(
            f"GET /v1/businesses/{business}/events HTTP/1.1\r\nHost: test\r\n"
            f"Authorization: Bearer {token_for(business)}\r\nLast-Event-ID: {last_id}\r\n\r\n".encode()
        )
        ids: list[int] = []
        data = b""
        while len(ids) < count:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
            ids = [int(line[4:]) for line in data.split(b"\n") if line.startswith(b"id: ")]
        return ids[:count]


def test_cluster_up_resume_takeover_down(db_url: str, tmp_path: Path) -> None:
    state = tmp_path / "cluster"
    port = _free_base_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update(
        CDC_DATABASE_URL=db_url,
        CDC_SECRET=SECRET,
        CDC_CLUSTER_DIR=str(state),
        CDC_CLUSTER_PORT=str(port),
        CDC_CLUSTER_PYTHON=sys.executable,
    )
    try:
        out = _cluster(env, "up")
        assert f"http://127.0.0.1:{port}" in out
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            assert answer.status == 200

        # Events appended before and during a gateway's restart all arrive, in order, through the proxy.
        business = str(uuid.uuid4())
        first = append_events(db_url, (business, "invalidate"))[0]
        _cluster(env, "restart", "gateway-1")
        later = append_events(db_url, (business, "invalidate"), (business, "invalidate"))
        assert _read_event_ids(port, business, first - 1, 3) == [first, *later]

        # A request from 127.0.1.2 that the gateway refuses (no token) is logged with that address: HAProxy
        # forwarded it in X-Forwarded-For and the gateway believed it (CDC_TRUSTED_PROXIES=127.0.0.1).
        with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.1.2", 0)) as sock:
            sock.sendall(f"GET /v1/businesses/{business}/stats HTTP/1.0\r\nHost: test\r\n\r\n".encode())
            assert sock.recv(64).startswith(b"HTTP/1.1 401")
        time.sleep(0.5)
        logs = "".join((state / f"gateway-{k}.log").read_text() for k in (1, 2, 3))
        assert '"client": "127.0.1.2"' in logs

        status = _cluster(env, "status")
        assert "listener-1" in status and "active (holds leadership)" in status.split("listener-1", 1)[1].split("\n")[0]
        _cluster(env, "restart", "listener-1")
        status = _cluster(env, "status")
        assert "active (holds leadership)" in status.split("listener-2", 1)[1].split("\n")[0]
        pids = [int((state / f"{name}.pid").read_text()) for name in ("haproxy", "gateway-1", "listener-2")]
    finally:
        _cluster(env, "down")
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert "nothing to stop" in _cluster(env, "down") or not (state / "haproxy.pid").exists()
