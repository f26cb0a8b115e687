"""`cdc-dashboard listen` as operators run it: signals, hot standby, JSON logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import psycopg

CLI = str(Path(sys.executable).parent / "cdc-dashboard")


@contextmanager
def listen_process(db_url: str) -> Iterator[tuple[subprocess.Popen[bytes], IO[bytes]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env["CDC_DATABASE_URL"] = db_url
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([CLI, "listen"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc, log
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def state(conn: psycopg.Connection[Any]) -> tuple[str, str | None]:
    row = conn.execute("select state, node from dashboard.listener_state").fetchone()
    assert row is not None
    return row[0], row[1]


def wait_until(predicate: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


def insert_payment(conn: psycopg.Connection[Any], business: str) -> str:
    payment = str(uuid.uuid4())
    conn.execute(
        "insert into payments (id, business_id, amount_minor, currency, method, status)"
        " values (%s, %s, 500, 'KES', 'cash', 'completed')",
        (payment, business),
    )
    return payment


def delivered(conn: psycopg.Connection[Any], payment: str) -> bool:
    row = conn.execute(
        "select exists (select 1 from dashboard.events where payload::jsonb -> 'changes' @> jsonb_build_array("
        "jsonb_build_object('id', %s::text)))",
        (payment,),
    ).fetchone()
    return bool(row and row[0])


def test_sigterm_stops_cleanly_within_5_seconds(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn, listen_process(db_url) as (proc, log):
        wait_until(lambda: state(conn)[0] == "live")
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 5
        assert state(conn)[0] == "stopped"
        log.seek(0)
        lines = [json.loads(line) for line in log.read().decode().splitlines() if line.strip()]
        assert any(entry["msg"] == "listener live" for entry in lines), "logs are JSON lines"
        assert lines[-1]["msg"] == "listener stopped"


def test_standby_takes_over_within_5_seconds_of_sigkill(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        business = str(uuid.uuid4())
        conn.execute("insert into businesses (id, name) values (%s, 'HA Salon')", (business,))
        with listen_process(db_url) as (first, _):
            wait_until(lambda: state(conn)[0] == "live")
            with listen_process(db_url) as (second, _):
                time.sleep(1.5)  # the second one is now a standby
                assert state(conn)[1] == f"{os.uname().nodename}:{first.pid}"
                before = insert_payment(conn, business)
                wait_until(lambda: delivered(conn, before))
                first.send_signal(signal.SIGKILL)
                first.wait(5)
                killed_at = time.monotonic()
                payment = insert_payment(conn, business)  # written while nobody is active
                wait_until(lambda: state(conn)[1] == f"{os.uname().nodename}:{second.pid}", timeout=10)
                wait_until(lambda: delivered(conn, payment), timeout=10)
                assert time.monotonic() - killed_at < 5
