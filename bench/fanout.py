"""Fan-out: N idle SSE connections on one gateway process (or several); RSS per connection and broadcast latency.

    .venv/bin/python bench/fanout.py [--connections 10000] [--broadcasts 5] [--interval 3] [--clients 1]
        [--gateways 1] [--source-addresses 1] [--client-loop asyncio|uvloop] [--through-haproxy]

Creates a scratch database on CDC_BENCH_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres),
applies the schema and starts `cdc-dashboard serve` (one process). Separate client processes (`--clients`)
open the connections, all to one business's stream (the worst case: every event reaches every stream), read
by asyncio protocols (no task or StreamReader per connection) so that the clients' own CPU, which shares the
cores with the gateway and counts in the latency, stays small (`--client-loop uvloop` runs the clients on
uvloop). The gateway's RSS is read from /proc before and after the connections open. Then `--broadcasts`
events are appended `--interval` seconds apart through `dashboard.append_events_v1` (under the events lock,
as the listener appends), each carrying its wall-clock append time; every client notes when each event
arrived. Latency = arrival - append (same host, same clock), over all connections.

The gateway's CPU time per broadcast (from /proc, less its idle CPU over as long) is reported too: unlike the
latency it does not depend on what else the machine is doing. So is the clients' (they read on the same cores).
Two things are kept out of that window: heartbeats (`--ping-seconds`, default 120, longer than a run: the
streams all open within seconds, so their heartbeats come in rounds of N, each costing more CPU than a
broadcast, that fall on some broadcasts and not others), and the clients' disconnects (they stay connected
until the gateways' CPU has been read).

With `--gateways G`, G `serve` processes on distinct ports share the one database (each with its own LISTEN)
and the connections are spread over them evenly; RSS and CPU are summed over the gateways, the latency is
over every connection of every gateway. Past about 28,000 connections to one address and port from one
source address the client runs out of ephemeral ports, and a process may open at most 20,000 files here:
`--source-addresses K` binds the client sockets to 127.0.0.1 … 127.0.0.K in turn (the whole 127/8 is
loopback on Linux), and `--clients` splits the connections over processes.

With `--through-haproxy`, an HAProxy (deploy/haproxy/haproxy.cfg, rendered as deploy/local/cluster.sh renders
it: its own ports and one `server` line per gateway, nothing else changed) stands in front of the gateways and
every client connects to it; its RSS and CPU are reported apart from the gateways'. Each proxied stream holds
two of HAProxy's descriptors, so the committed config (maxconn 9,800, ulimit-n 20,000) caps a run at 9,800.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import uvloop

from cdc_dashboard.tokens import create_token
from scratch import connection_reports, scratch_database, wait_ready

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-fanout-" + "b" * 40
# Linux's IP_BIND_ADDRESS_NO_PORT (the socket module does not name it).
_IP_BIND_ADDRESS_NO_PORT = 24


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


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _haproxy_config(port: int, stats_port: int, gateway_ports: list[int]) -> str:
    """deploy/haproxy/haproxy.cfg for these ports: the substitution deploy/local/cluster.sh's start_haproxy makes
    (the two `bind` lines, the block between `# BEGIN servers` and `# END servers`), nothing else."""
    binds = {
        "    bind 127.0.0.1:8000": f"    bind 127.0.0.1:{port}",
        "    bind 127.0.0.1:8404": f"    bind 127.0.0.1:{stats_port}",
    }
    out: list[str] = []
    skip = False
    for line in (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text().splitlines():
        if line.startswith("    # BEGIN servers"):
            out.append(line)
            out += [f"    server gw{k} 127.0.0.1:{p}" for k, p in enumerate(gateway_ports, 1)]
            skip = True
        elif line.startswith("    # END servers"):
            skip = False
            out.append(line)
        elif not skip:
            out.append(binds.get(line, line))
    return "\n".join(out) + "\n"


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- client process -----------------------------------------------------------------------------------------


class _Stream(asyncio.Protocol):
    """One stream connection of a client process, read in `data_received`: no task and no StreamReader per
    connection, so that the client's own CPU (it shares the cores with the gateway) stays small."""

    def __init__(self, arrivals: list[tuple[int, float]], broadcasts: int, finished: Callable[[_Stream], None]) -> None:
        self.head: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._arrivals = arrivals
        self._broadcasts = broadcasts
        self._finished: Callable[[_Stream], None] | None = finished
        self._pending = b""
        self._seen = 0

    def data_received(self, data: bytes) -> None:
        now = time.time()
        data = self._pending + data
        if not self.head.done():
            head, found, data = data.partition(b"\r\n\r\n")
            if not found:
                self._pending = head
                return
            self.head.set_result(head)
        lines = data.split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            # The event's data line; chunk sizes, ids, names and heartbeats are lines of their own.
            if line.startswith(b"data:") and b'"sent_at"' in line:
                event = json.loads(line[5:])
                self._arrivals.append((event["seq"], now - event["sent_at"]))
                self._seen += 1
                if self._seen == self._broadcasts:
                    self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.head.done():
            self.head.set_exception(ConnectionError("closed before the response head"))
        self._finish()

    def _finish(self) -> None:
        finished, self._finished = self._finished, None
        if finished is not None:
            finished(self)


async def _client(config: dict[str, Any]) -> None:
    """Open `count` streams, report readiness on stdout, then record each event's arrival per stream.

    Connection number `offset + i` goes to gateway port `(offset + i) % len(ports)`, from source address
    `(offset + i) // len(ports) % len(sources)`, so that every gateway and every source gets its share.
    """
    ports: list[int] = config["ports"]
    sources: list[str] = config["sources"]
    count: int = config["count"]
    broadcasts: int = config["broadcasts"]
    out = Path(config["out"])
    arrivals: list[tuple[int, float]] = []
    failures = 0
    request = (
        f"GET /v1/businesses/{config['business']}/events HTTP/1.1\r\nHost: bench\r\n"
        f"Authorization: Bearer {config['token']}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    transports: list[asyncio.BaseTransport] = []
    loop = asyncio.get_running_loop()
    all_read = asyncio.Event()
    # The connected streams that have not yet seen every broadcast (nor closed).
    reading: set[_Stream] = set()

    def finished(stream: _Stream) -> None:
        if stream in reading:
            reading.discard(stream)
            if not reading:
                all_read.set()

    async def connect(number: int) -> None:
        nonlocal failures
        port = ports[number % len(ports)]
        source = sources[number // len(ports) % len(sources)]
        sock = socket.socket()
        try:
            # Bound to a source address without a port: the port is then chosen at connect() for the whole
            # (source, destination) pair, so each source address has the ephemeral range for each gateway.
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            transport, stream = await loop.create_connection(lambda: _Stream(arrivals, broadcasts, finished), sock=sock)
            transport.write(request)
            head = await stream.head
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head[:40])
            transports.append(transport)
            reading.add(stream)
        except Exception:
            sock.close()
            failures += 1

    offset: int = config["offset"]
    for start in range(0, count, 250):
        await asyncio.gather(*(connect(offset + start + i) for i in range(min(250, count - start))))
    # The client's own garbage collector would walk every connection's objects in full passes that land in
    # broadcasts and count as gateway latency; they live until the end, so take them out of its walks.
    gc.freeze()
    print(json.dumps({"connected": len(transports), "failures": failures}), flush=True)

    try:
        async with asyncio.timeout(broadcasts * 30 + 60):
            if reading:
                await all_read.wait()
    finally:
        await asyncio.to_thread(out.write_text, json.dumps({"latencies": arrivals, "failures": failures}))
    # Connected until the driver has read the gateways' CPU (it closes our stdin): closing 10,000 connections
    # costs a gateway more CPU than a broadcast, and is no part of one.
    await asyncio.to_thread(sys.stdin.read)
    for transport in transports:
        transport.close()


# -- driver -------------------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=10000, help="in all, over every gateway")
    parser.add_argument("--broadcasts", type=int, default=5)
    parser.add_argument("--clients", type=int, default=1, help="client processes sharing the connections")
    parser.add_argument("--gateways", type=int, default=1, help="`serve` processes sharing the connections")
    parser.add_argument(
        "--source-addresses", type=int, default=1, help="client sockets bound to 127.0.0.1 … 127.0.0.K in turn"
    )
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between broadcasts (default 3)")
    parser.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="seconds between the last connection and the first measurement (default 2)",
    )
    parser.add_argument(
        "--client-loop",
        choices=["uvloop", "asyncio"],
        default="asyncio",
        help="the clients' event loop (default asyncio, as in the earlier runs; uvloop made no measurable difference)",
    )
    parser.add_argument(
        "--through-haproxy",
        action="store_true",
        help="clients connect to an HAProxy in front of the gateways (deploy/haproxy/haproxy.cfg)",
    )
    parser.add_argument(
        "--ping-seconds",
        type=float,
        default=120.0,
        help="the gateways' CDC_SSE_PING_SECONDS (default 120: none within a run; runs before 2026-12-08 had 15)",
    )
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _raise_fd_limit()
    if args.client:
        config = json.loads(args.client)
        if config["loop"] == "uvloop":
            uvloop.run(_client(config))
        else:
            asyncio.run(_client(config))
        return 0

    with scratch_database("bench_fanout") as db:
        business = str(uuid.uuid4())
        token = create_token(SECRET, [business], 3600)
        per_gateway = -(-args.connections // args.gateways)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        env.update(
            CDC_DATABASE_URL=db,
            CDC_SECRET=SECRET,
            CDC_MAX_CONNECTIONS=str(per_gateway + 100),
            # Every stream is one token's, opened from 127.0.0.1 at once: lift the per-token and per-address limits.
            CDC_MAX_STREAMS_PER_TOKEN=str(per_gateway + 100),
            CDC_RATE_LIMIT_STREAM_OPENS_PER_MINUTE="0",
            CDC_SSE_PING_SECONDS=str(args.ping_seconds),
            CDC_LOG_LEVEL="WARNING",
        )
        gateways: list[subprocess.Popen[bytes]] = []
        haproxy: subprocess.Popen[bytes] | None = None
        cfg: Path | None = None
        clients: list[subprocess.Popen[str]] = []
        try:
            cli = Path(sys.executable).parent / "cdc-dashboard"
            ports = [_free_port() for _ in range(args.gateways)]
            for port in ports:
                gateways.append(
                    subprocess.Popen(
                        [str(cli), "serve"],
                        env={**env, "CDC_HTTP_PORT": str(port)},
                        cwd=ROOT,
                        preexec_fn=_raise_fd_limit,
                    )
                )
            for port, gateway in zip(ports, gateways, strict=True):
                wait_ready(port, gateway, 30)
            targets = ports
            if args.through_haproxy:
                proxy_port, stats_port = _free_port(), _free_port()
                cfg = Path(tempfile.mkstemp(prefix="fanout-haproxy-", suffix=".cfg")[1])
                cfg.write_text(_haproxy_config(proxy_port, stats_port, ports))
                subprocess.run(["haproxy", "-q", "-c", "-f", str(cfg)], check=True)
                haproxy = subprocess.Popen(
                    ["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                wait_ready(proxy_port, haproxy, 30)
                # Every server UP (rise 2, checks 1 s apart), so that leastconn spreads over all of them.
                time.sleep(3)
                targets = [proxy_port]
            time.sleep(1)
            rss_before = [_rss_kib(g.pid) for g in gateways]
            haproxy_rss_before = _rss_kib(haproxy.pid) if haproxy else 0

            outs = [Path(tempfile.mkstemp(prefix="fanout-", suffix=".json")[1]) for _ in range(args.clients)]
            shares = [
                args.connections // args.clients + (i < args.connections % args.clients) for i in range(args.clients)
            ]
            sources = [f"127.0.0.{i + 1}" for i in range(args.source_addresses)]
            load_before = _uptime()
            started = time.monotonic()
            offset = 0
            for share, out in zip(shares, outs, strict=True):
                config = {
                    "ports": targets,
                    "sources": sources,
                    "offset": offset,
                    "count": share,
                    "business": business,
                    "token": token,
                    "broadcasts": args.broadcasts,
                    "loop": args.client_loop,
                    "out": str(out),
                }
                offset += share
                clients.append(
                    subprocess.Popen(
                        [sys.executable, __file__, "--client", json.dumps(config)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            connected, failures = connection_reports(clients)
            connect_seconds = time.monotonic() - started
            time.sleep(args.settle)  # let the gateways settle (allocator, GC)
            rss_after = [_rss_kib(g.pid) for g in gateways]
            haproxy_rss_after = _rss_kib(haproxy.pid) if haproxy else 0

            def gateways_cpu() -> float:
                return sum(_cpu_seconds(g.pid) for g in gateways)

            def clients_cpu() -> float:
                return sum(_cpu_seconds(c.pid) for c in clients)

            # The CPU used while idle, to subtract from the broadcasts' share.
            idle_start, clients_idle_start = gateways_cpu(), clients_cpu()
            time.sleep(args.interval)
            idle_cpu = gateways_cpu() - idle_start
            clients_idle_cpu = clients_cpu() - clients_idle_start
            haproxy_cpu_start = _cpu_seconds(haproxy.pid) if haproxy else 0.0
            cpu_start, clients_cpu_start = gateways_cpu(), clients_cpu()
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
            broadcast_cpu = (gateways_cpu() - cpu_start - idle_cpu * args.broadcasts) / args.broadcasts
            # The clients read every frame on the same cores: their share is part of the measured latency.
            clients_broadcast_cpu = (
                clients_cpu() - clients_cpu_start - clients_idle_cpu * args.broadcasts
            ) / args.broadcasts
            # HAProxy's CPU over the broadcasts, per broadcast.
            haproxy_cpu = (_cpu_seconds(haproxy.pid) - haproxy_cpu_start) / args.broadcasts if haproxy else 0.0
            load_after = _uptime()
            arrivals: list[tuple[int, float]] = []
            for client, out in zip(clients, outs, strict=True):
                assert client.stdin is not None
                client.stdin.close()
                client.wait(300)
                arrivals += [(seq, latency) for seq, latency in json.loads(out.read_text())["latencies"]]
                out.unlink()
            latencies = [latency for _, latency in arrivals]
            per_broadcast = {seq: [latency for s, latency in arrivals if s == seq] for seq in range(args.broadcasts)}
            expected = connected * args.broadcasts
            result = {
                "gateways": args.gateways,
                "through_haproxy": args.through_haproxy,
                "client_loop": args.client_loop,
                "connections": connected,
                "connect_failures": failures,
                "connect_seconds": round(connect_seconds, 1),
                "gateway_rss_before_mib": [round(kib / 1024, 1) for kib in rss_before],
                "gateway_rss_after_mib": [round(kib / 1024, 1) for kib in rss_after],
                "rss_per_connection_kib": round((sum(rss_after) - sum(rss_before)) / max(1, connected), 1),
                **(
                    {
                        "haproxy_rss_before_mib": round(haproxy_rss_before / 1024, 1),
                        "haproxy_rss_after_mib": round(haproxy_rss_after / 1024, 1),
                        "haproxy_rss_per_connection_kib": round(
                            (haproxy_rss_after - haproxy_rss_before) / max(1, connected), 1
                        ),
                        "haproxy_cpu_ms_per_broadcast": round(1000 * haproxy_cpu, 1),
                    }
                    if haproxy
                    else {}
                ),
                "broadcasts": args.broadcasts,
                "gateway_cpu_ms_per_broadcast": round(1000 * broadcast_cpu, 1),
                "gateway_cpu_us_per_delivery": round(1e6 * broadcast_cpu / max(1, connected), 1),
                "clients_cpu_ms_per_broadcast": round(1000 * clients_broadcast_cpu, 1),
                "deliveries": f"{len(latencies)}/{expected}",
                "latency_p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
                "latency_p99_ms": round(1000 * _percentile(latencies, 0.99), 1) if latencies else None,
                "latency_max_ms": round(1000 * max(latencies), 1) if latencies else None,
                "per_broadcast_p50_p99_ms": [
                    [round(1000 * statistics.median(v), 1), round(1000 * _percentile(v, 0.99), 1)]
                    for v in per_broadcast.values()
                    if v
                ],
                "load_before": load_before,
                "load_after": load_after,
            }
            print(json.dumps(result, indent=2))
            return 0 if latencies and len(latencies) == expected else 1
        finally:
            for client in clients:
                if client.poll() is None:
                    client.kill()
            if haproxy and haproxy.poll() is None:
                haproxy.terminate()
                haproxy.wait(15)
            if cfg:
                cfg.unlink()
            for gateway in gateways:
                if gateway.poll() is None:
                    gateway.send_signal(signal.SIGTERM)
            for gateway in gateways:
                try:
                    gateway.wait(15)
                except subprocess.TimeoutExpired:
                    gateway.kill()


if __name__ == "__main__":
    sys.exit(main())
