"""Fan-out: N idle SSE connections on one gateway process; its RSS per connection and broadcast latency.

    .venv/bin/python bench/fanout.py [--connections 10000] [--broadcasts 5] [--interval 3] [--clients 1]

Creates a scratch database on CDC_BENCH_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres),
applies the schema and starts `cdc-dashboard serve` (one process). Separate client processes (`--clients`)
open the connections, all to one business's stream (the worst case: every event reaches every stream), with
raw asyncio sockets so the client's own cost stays small. The gateway's RSS is read from /proc before and after
the connections open. Then `--broadcasts` events are appended `--interval` seconds apart through
`dashboard.append_events_v1` (under the events lock, as the listener appends), each carrying its wall-clock
append time; every client notes when each event arrived. Latency = arrival - append (same host, same clock),
over all connections.

The gateway's CPU time per broadcast (from /proc, idle heartbeat time subtracted) is reported too: unlike the
latency it does not depend on what else the machine is doing.

Caveat: on a small machine the gateway, PostgreSQL and the clients share the cores; the clients' time to read
N frames is part of the measured latency, so it is an upper bound on what the gateway itself adds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from cdc_dashboard.tokens import create_token
from scratch import connection_reports, scratch_database, wait_ready

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-fanout-" + "b" * 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- client process -----------------------------------------------------------------------------------------


async def _client(port: int, business: str, token: str, count: int, broadcasts: int, out: Path) -> None:
    """Open `count` streams, report readiness on stdout, then record each event's arrival per stream."""
    arrivals: list[tuple[int, float]] = []
    failures = 0
    request = (
        f"GET /v1/businesses/{business}/events HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    readers: list[asyncio.StreamReader] = []
    writers: list[asyncio.StreamWriter] = []

    async def connect() -> None:
        nonlocal failures
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head[:40])
            readers.append(reader)
            writers.append(writer)
        except Exception:
            failures += 1

    for start in range(0, count, 250):
        await asyncio.gather(*(connect() for _ in range(min(250, count - start))))
    # The client's own garbage collector would walk every connection's objects in full passes that land in
    # broadcasts and count as gateway latency; they live until the end, so take them out of its walks.
    gc.freeze()
    print(json.dumps({"connected": len(readers), "failures": failures}), flush=True)

    async def read(reader: asyncio.StreamReader) -> None:
        seen = 0
        while seen < broadcasts:
            line = await reader.readline()
            if not line:
                return
            if line.startswith(b"data:") and b'"sent_at"' in line:
                data = json.loads(line[5:])
                arrivals.append((data["seq"], time.time() - data["sent_at"]))
                seen += 1

    try:
        async with asyncio.timeout(broadcasts * 30 + 60):
            await asyncio.gather(*(read(r) for r in readers))
    finally:
        await asyncio.to_thread(out.write_text, json.dumps({"latencies": arrivals, "failures": failures}))
        for writer in writers:
            writer.close()


# -- driver -------------------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--broadcasts", type=int, default=5)
    parser.add_argument("--clients", type=int, default=1, help="client processes sharing the connections")
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between broadcasts (default 3)")
    parser.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="seconds between the last connection and the first measurement (default 2)",
    )
    parser.add_argument("--client", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _raise_fd_limit()
    if args.client:
        port, business, token, count, broadcasts, out = args.client
        asyncio.run(_client(int(port), business, token, int(count), int(broadcasts), Path(out)))
        return 0

    with scratch_database("bench_fanout") as db:
        port = _free_port()
        business = str(uuid.uuid4())
        token = create_token(SECRET, [business], 3600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        env.update(
            CDC_DATABASE_URL=db,
            CDC_SECRET=SECRET,
            CDC_HTTP_PORT=str(port),
            CDC_MAX_CONNECTIONS=str(args.connections + 100),
            # Every stream is one token's, opened from 127.0.0.1 at once: lift the per-token and per-address limits.
            CDC_MAX_STREAMS_PER_TOKEN=str(args.connections + 100),
            CDC_RATE_LIMIT_STREAM_OPENS_PER_MINUTE="0",
            CDC_SSE_PING_SECONDS="15",
            CDC_LOG_LEVEL="WARNING",
        )
        gateway: subprocess.Popen[bytes] | None = None
        clients: list[subprocess.Popen[str]] = []
        try:
            cli = Path(sys.executable).parent / "cdc-dashboard"
            gateway = subprocess.Popen([str(cli), "serve"], env=env, cwd=ROOT, preexec_fn=_raise_fd_limit)
            wait_ready(port, gateway, 30)
            time.sleep(1)
            rss_before = _rss_kib(gateway.pid)

            outs = [Path(tempfile.mkstemp(prefix="fanout-", suffix=".json")[1]) for _ in range(args.clients)]
            shares = [
                args.connections // args.clients + (i < args.connections % args.clients) for i in range(args.clients)
            ]
            started = time.monotonic()
            for share, out in zip(shares, outs, strict=True):
                clients.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            __file__,
                            "--client",
                            str(port),
                            business,
                            token,
                            str(share),
                            str(args.broadcasts),
                            str(out),
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            connected, failures = connection_reports(clients)
            connect_seconds = time.monotonic() - started
            time.sleep(args.settle)  # let the gateway settle (allocator, GC)
            rss_after = _rss_kib(gateway.pid)

            # The gateway's CPU while idle (heartbeats only), to subtract from the broadcasts' share.
            idle_start = _cpu_seconds(gateway.pid)
            time.sleep(args.interval)
            idle_cpu = _cpu_seconds(gateway.pid) - idle_start
            cpu_start = _cpu_seconds(gateway.pid)
            with psycopg.connect(db, autocommit=True) as conn:
                for seq in range(args.broadcasts):
                    payload = json.dumps(
                        {"business_id": business, "seq": seq, "sent_at": time.time(), "query_keys": []}
                    )
                    conn.execute(
                        "select dashboard.append_events_v1(array[%s], array['invalidate'], array[%s::jsonb])",
                        (business, payload),
                    )
                    time.sleep(args.interval)
            broadcast_cpu = (_cpu_seconds(gateway.pid) - cpu_start - idle_cpu * args.broadcasts) / args.broadcasts
            arrivals: list[tuple[int, float]] = []
            for client, out in zip(clients, outs, strict=True):
                client.wait(300)
                arrivals += [(seq, latency) for seq, latency in json.loads(out.read_text())["latencies"]]
                out.unlink()
            latencies = [latency for _, latency in arrivals]
            per_broadcast = {seq: [latency for s, latency in arrivals if s == seq] for seq in range(args.broadcasts)}
            expected = connected * args.broadcasts
            result = {
                "connections": connected,
                "connect_failures": failures,
                "connect_seconds": round(connect_seconds, 1),
                "gateway_rss_before_mib": round(rss_before / 1024, 1),
                "gateway_rss_after_mib": round(rss_after / 1024, 1),
                "rss_per_connection_kib": round((rss_after - rss_before) / max(1, connected), 1),
                "broadcasts": args.broadcasts,
                "gateway_cpu_ms_per_broadcast": round(1000 * broadcast_cpu, 1),
                "gateway_cpu_us_per_delivery": round(1e6 * broadcast_cpu / max(1, connected), 1),
                "deliveries": f"{len(latencies)}/{expected}",
                "latency_p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
                "latency_p99_ms": round(1000 * _percentile(latencies, 0.99), 1) if latencies else None,
                "latency_max_ms": round(1000 * max(latencies), 1) if latencies else None,
                "per_broadcast_p50_p99_ms": [
                    [round(1000 * statistics.median(v), 1), round(1000 * _percentile(v, 0.99), 1)]
                    for v in per_broadcast.values()
                    if v
                ],
            }
            print(json.dumps(result, indent=2))
            return 0 if latencies and len(latencies) == expected else 1
        finally:
            for client in clients:
                if client.poll() is None:
                    client.kill()
            if gateway is not None and gateway.poll() is None:
                gateway.send_signal(signal.SIGTERM)
                try:
                    gateway.wait(15)
                except subprocess.TimeoutExpired:
                    gateway.kill()


if __name__ == "__main__":
    sys.exit(main())
