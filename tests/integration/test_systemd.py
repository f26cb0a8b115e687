"""systemd integration: the unit files verify, and `listen` and `serve` speak sd_notify (READY, WATCHDOG,
STOPPING)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .gateway_support import SECRET, free_port

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "cdc-dashboard"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_listener_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "deploy" / "systemd" / "cdc-dashboard-listener.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "EnvironmentFile=" in unit
    # verify checks that ExecStart exists: point it at this checkout's executable.
    local = tmp_path / "cdc-dashboard-listener.service"
    local.write_text(unit.replace("/opt/cdc-dashboard/.venv/bin/cdc-dashboard", str(CLI)))
    result = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_listen_notifies_ready_watchdog_and_stopping(db_url: str, tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(20)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        env.update(CDC_DATABASE_URL=db_url, NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")
        proc = subprocess.Popen([str(CLI), "listen"], env=env, stdout=subprocess.DEVNULL)
        try:
            messages: list[str] = []
            deadline = time.monotonic() + 20
            ready = None
            while time.monotonic() < deadline and not (ready is not None and "WATCHDOG=1" in messages[ready:]):
                messages.append(sock.recv(4096).decode())
                if ready is None and messages[-1].startswith("READY=1"):
                    ready = len(messages) - 1
            assert ready is not None, messages
            assert messages[ready] == "READY=1\nSTATUS=live"
            assert "WATCHDOG=1" in messages[ready:], "the live loop pets the watchdog"
            proc.send_signal(signal.SIGTERM)
            while "STOPPING=1" not in messages:
                messages.append(sock.recv(4096).decode())
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_gateway_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "deploy" / "systemd" / "cdc-dashboard-gateway.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "EnvironmentFile=" in unit
    assert "Restart=on-failure" in unit and "ExecStart=/opt/cdc-dashboard/.venv/bin/cdc-dashboard serve\n" in unit
    local = tmp_path / "cdc-dashboard-gateway.service"
    local.write_text(unit.replace("/opt/cdc-dashboard/.venv/bin/cdc-dashboard", str(CLI)))
    result = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("args", [(), ("--with-listener",)], ids=["serve", "serve-with-listener"])
def test_serve_notifies_ready_once_it_accepts_connections(db_url: str, tmp_path: Path, args: tuple[str, ...]) -> None:
    address = str(tmp_path / "notify.sock")
    port = free_port()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(20)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        env.update(
            CDC_DATABASE_URL=db_url,
            CDC_SECRET=SECRET,
            CDC_HTTP_PORT=str(port),
            NOTIFY_SOCKET=address,
            WATCHDOG_USEC="400000",
        )
        proc = subprocess.Popen([str(CLI), "serve", *args], env=env, stdout=subprocess.DEVNULL)
        try:
            messages = [sock.recv(4096).decode()]
            while not messages[-1].startswith("READY=1"):
                messages.append(sock.recv(4096).decode())
            # One READY for the process (the in-process listener stays quiet), sent once connections are accepted.
            assert messages[-1] == "READY=1\nSTATUS=serving", messages
            assert not any(m.startswith("READY=1") for m in messages[:-1]), messages
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
            while "WATCHDOG=1" not in messages:
                messages.append(sock.recv(4096).decode())
            proc.send_signal(signal.SIGTERM)
            while "STOPPING=1" not in messages:
                messages.append(sock.recv(4096).decode())
            # uvicorn re-raises the SIGTERM it handled; systemd counts death by SIGTERM as a clean stop.
            assert proc.wait(15) in (0, -signal.SIGTERM)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
