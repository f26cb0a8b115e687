"""The gateway as operators run it: `cdc-dashboard serve` processes, SIGTERM drain, replicas, ops endpoints."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import psycopg
from starlette.requests import Request
from starlette.responses import Response

from cdc_dashboard.gateway.auth import decode_token

from .gateway_support import (
    SECRET,
    append_events,
    free_port,
    open_stream,
    run_gateway,
    serve_subprocess,
    token_for,
)

CLI = str(Path(sys.executable).parent / "cdc-dashboard")


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update(values)
    return env


def test_serve_refuses_to_start_without_a_secret(db_url: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [CLI, "serve"], env=_env(CDC_DATABASE_URL=db_url), cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "CDC_SECRET" in lines[0]


def test_serve_refuses_a_database_without_schema_or_unreachable(empty_db_url: str, tmp_path: Path) -> None:
    for url, reason in ((empty_db_url, "cdc-dashboard db apply"), ("postgresql://nobody@127.0.0.1:1/none", "connect")):
        result = subprocess.run(
            [CLI, "serve"],
            env=_env(CDC_DATABASE_URL=url, CDC_SECRET=SECRET, CDC_HTTP_PORT=str(free_port())),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0], result.stderr


def test_token_command_prints_a_token_for_the_businesses(tmp_path: Path) -> None:
    b = str(uuid.uuid4())
    result = subprocess.run(
        [CLI, "token", b, "--ttl", "60"], env=_env(CDC_SECRET=SECRET), cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    claims = decode_token(SECRET, result.stdout.strip().splitlines()[-1])
    assert claims.business_ids == {b} and not claims.admin and 50 < claims.seconds_left() <= 60
    admin = subprocess.run(
        [CLI, "token", "--admin"], env=_env(CDC_SECRET=SECRET), cwd=tmp_path, capture_output=True, text=True
    )
    assert decode_token(SECRET, admin.stdout.strip().splitlines()[-1]).admin
    bad = subprocess.run(
        [CLI, "token", "not-a-uuid"], env=_env(CDC_SECRET=SECRET), cwd=tmp_path, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and bad.stdout == ""


async def test_two_gateway_processes_give_the_same_events_the_same_ids(db_url: str) -> None:
    b = str(uuid.uuid4())
    p1, p2 = free_port(), free_port()
    with serve_subprocess(db_url, p1), serve_subprocess(db_url, p2):
        async with (
            open_stream(f"http://127.0.0.1:{p1}", b, token_for(b)) as s1,
            open_stream(f"http://127.0.0.1:{p2}", b, token_for(b)) as s2,
        ):
            ids = append_events(db_url, *[(b, "invalidate")] * 5)
            got1 = [(e.id, e.data) for e in await s1.events(5)]
            got2 = [(e.id, e.data) for e in await s2.events(5)]
        assert got1 == got2
        assert [int(i or 0) for i, _ in got1] == ids


async def test_sigterm_drains_streams_with_jittered_retry_and_exits_quickly(db_url: str) -> None:
    b = str(uuid.uuid4())
    port = free_port()
    token = token_for(b)
    with serve_subprocess(db_url, port) as served:
        url = f"http://127.0.0.1:{port}"
        async with (
            open_stream(url, b, token) as s1,
            open_stream(url, b, token) as s2,
            open_stream(url, b, None, query=f"?access_token={token}") as s3,
        ):
            [event_id] = append_events(db_url, (b, "invalidate"))
            for stream in (s1, s2, s3):
                event = await stream.next_event()
                assert event is not None and event.id == str(event_id)
            started = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)
            for stream in (s1, s2, s3):
                assert await stream.until_closed(timeout=8) == []
                assert "server shutting down" in stream.comments
                # The first retry is the stream's start (2000 ms); the drain adds a jittered one.
                assert len(stream.retries) == 2 and 1000 <= stream.retries[1] <= 5000
            closed_after = time.monotonic() - started
        code = await asyncio.to_thread(served.proc.wait, 10)
        exited_after = time.monotonic() - started
        output = served.output()
    assert closed_after < 3, f"streams ended {closed_after:.1f} s after SIGTERM"
    assert exited_after < 10, f"the process exited {exited_after:.1f} s after SIGTERM"
    assert code in (0, -signal.SIGTERM), output[-2000:]
    assert "Traceback" not in output
    assert SECRET not in output and token not in output


async def test_serve_with_listener_turns_a_plain_insert_into_an_event(db_url: str) -> None:
    b, client = str(uuid.uuid4()), str(uuid.uuid4())
    port = free_port()
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("insert into businesses (id, name) values (%s, 'Gateway Salon')", (b,))
        conn.execute("insert into clients (id, name, phone) values (%s, 'Achieng', '+254700000002')", (client,))
    with serve_subprocess(db_url, port, "--with-listener") as served:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session, session.get(f"{url}/readyz") as response:
            body = await response.json()
        assert response.status == 200 and body["checks"]["listener"] is True
        async with open_stream(url, b, token_for(b)) as stream:
            payment = str(uuid.uuid4())
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute(
                    "insert into payments (id, business_id, client_id, amount_minor, currency, method, status)"
                    " values (%s, %s, %s, 150000, 'KES', 'mpesa', 'completed')",
                    (payment, b, client),
                )
            event = await stream.next_event(timeout=10)
            assert event is not None and event.event == "invalidate"
            assert payment in event.data
        assert "Traceback" not in served.output()


async def test_health_readiness_metrics_and_errors(db_url: str) -> None:
    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:

        async def boom(request: Request) -> Response:
            raise RuntimeError("secret internals")

        gw.app.add_route("/boom", boom)
        async with session.get(f"{gw.url}/healthz") as r:
            assert r.status == 200
        async with session.get(f"{gw.url}/readyz") as r:
            assert r.status == 200
            assert (await r.json())["checks"] == {"database": True, "listening": True, "not_draining": True}
        b = str(uuid.uuid4())
        async with open_stream(gw.url, b, token_for(b)) as stream:
            append_events(db_url, (b, "invalidate"))
            assert await stream.next_event() is not None
            async with session.get(f"{gw.url}/metrics") as r:
                text = await r.text()
        for name in (
            "cdc_gateway_open_streams 1.0",
            "cdc_gateway_events_sent_total 1.0",
            "cdc_gateway_slow_clients_dropped_total 0.0",
            "cdc_gateway_event_lag_seconds",
            "cdc_listener_backlog 0.0",
            "cdc_listener_lag_seconds 0.0",
            "process_resident_memory_bytes",
        ):
            assert name in text
        async with session.get(f"{gw.url}/nowhere") as r:
            assert r.status == 404 and (await r.json()) == {"error": "Not Found"}
        async with session.get(f"{gw.url}/boom") as r:
            assert r.status == 500
            body = await r.text()
            assert "secret internals" not in body and "Traceback" not in body
            assert (await r.json()) == {"error": "internal error"}
        # A gateway that lost its LISTEN connection is not ready.
        gw.app_state.hub.listening.clear()
        async with session.get(f"{gw.url}/readyz") as r:
            assert r.status == 503


async def test_run_serves_the_demo_and_prints_the_dashboard_url_last(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = _env(CDC_DATABASE_URL=db_url, CDC_HTTP_PORT=str(port), CDC_STATE_DIR=str(tmp_path / "state"))
    proc = await asyncio.create_subprocess_exec(
        CLI, "run", env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            while not (line := (await proc.stdout.readline()).decode()).startswith("http://"):
                assert line, "run ended before printing the dashboard URL"
        url = line.strip()
        assert url.startswith(f"http://127.0.0.1:{port}/dashboard/") and "?access_token=" in url
        business, token = url.split("/dashboard/")[1].split("?access_token=")
        secret = (tmp_path / "state" / "secret").read_text().strip()
        assert decode_token(secret, token).business_ids == {business}
        # The URL is printed once the gateway and its listener are ready: the stream answers at once.
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {token}"}
            async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                assert response.status == 200
            async with session.get(f"http://127.0.0.1:{port}/v1/businesses/{business}/events", headers=headers) as r:
                assert r.status == 200
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            rest = (await proc.stdout.read()).decode()
            code = await proc.wait()
        assert code == 0, rest
        assert "Traceback" not in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cors_allows_only_the_configured_origins(db_url: str) -> None:
    b = str(uuid.uuid4())
    preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    async with (
        run_gateway(db_url, cors_origins="https://app.example, https://admin.example") as gw,
        aiohttp.ClientSession() as session,
    ):
        url = f"{gw.url}/v1/businesses/{b}/events"
        async with session.options(url, headers={"Origin": "https://app.example", **preflight}) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        async with session.options(url, headers={"Origin": "https://evil.example", **preflight}) as r:
            assert r.status == 400
            assert "Access-Control-Allow-Origin" not in r.headers
