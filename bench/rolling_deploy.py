"""Rolling deploy through HAProxy: dashboards stay connected while every gateway, then the listener, restarts.

    .venv/bin/python bench/rolling_deploy.py [--dashboards 1000] [--businesses 100] [--rate 200]
        [--client-procs 4] [--warmup 15] [--gap 10] [--tail 15] [--writers 8] [--down-seconds 0]

Creates a scratch database on CDC_BENCH_ADMIN_URL (default postgresql://postgres@127.0.0.1:5432/postgres) with
`--businesses` businesses, and starts deploy/local/cluster.sh on it (3 gateways behind HAProxy, an active and a
standby listener) in a temporary state directory. Then:

1. `--client-procs` processes open `--dashboards` SSE streams through HAProxy, spread evenly over the
   businesses, each dashboard with its own token. Each process binds its sockets to its own loopback address
   (127.0.1.K), so the gateways see distinct callers in X-Forwarded-For, as they would real offices. A dashboard
   behaves like the browser's EventSource: when its stream ends it waits the last `retry:` it was sent (the
   gateway's drain jitters it), then reconnects through the proxy with `Last-Event-ID`, to whichever gateway
   HAProxy picks; a refusal is retried after its Retry-After.
2. bench/e2e_latency.py's writer inserts completed payments straight into PostgreSQL at `--rate` per second,
   each its own transaction, recording each payment's commit time;
3. after `--warmup` seconds, `cluster.sh stop gateway-K` (SIGTERM, wait for the exit), `--down-seconds` of
   pause (a slower deploy: long enough, HAProxy takes the gateway out and every resume goes to another one),
   `cluster.sh start gateway-K` (wait until it is ready and UP in HAProxy), for each gateway in turn,
   `--gap` seconds apart; then the same for the active listener (the standby takes over; the old one comes
   back as the standby); the writer goes on for `--tail` seconds more.

When the listener's backlog is empty and the clients have been quiet for 5 s, the clients stop and report.
Verified (each must be 0): payments without their event on some dashboard of their business, events a
dashboard received twice, event ids not strictly increasing on a dashboard, resyncs. Reported: reconnects per
second (the storm) around each restart, refusals by status, how many dashboards were served by more than one
gateway (HAProxy's log names the server of every stream: no stickiness), commit → event p50/p99/max over all
deliveries, over those whose payment committed during a restart (from its SIGTERM until 5 s, the longest
drain `retry:`, after it was back) and over the others, the standby's takeover time, and `uptime` before and
after. A dashboard between two streams gets the events it missed when it resumes, so during a restart the
latency includes its wait before reconnecting (the jittered `retry:`, up to 5 s).

Caveat: HAProxy, three gateways, two listeners, PostgreSQL, the writer and the clients share this machine's
cores; the clients' own time to parse events is part of every latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from cdc_dashboard.sqlfiles import queries
from cdc_dashboard.tokens import create_token
from e2e_latency import _parse_message, _raise_fd_limit, _summary, _uptime, writer_command  # the same client and stats
from scratch import connection_reports, scratch_database, stop

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "deploy" / "local" / "cluster.sh"
SECRET = "bench-rolling-deploy-" + "r" * 40
# The longest `retry:` a draining gateway sends (gateway/streams.py DRAIN_RETRY_MS): a restart's reconnects
# are over this long after the gateway is back.
DRAIN_RETRY_MAX_S = 5.0


# -- client process: dashboards that reconnect like EventSource ----------------------------------------------


async def _client(config: dict[str, Any]) -> None:
    """Follow every dashboard's stream until stdin says stop; then write what each one saw."""
    url: str = config["url"]
    dashboards: list[list[str]] = config["dashboards"]  # [dashboard id, business]
    # [dashboard index, event id, arrival, [payment ids]]
    events: list[list[Any]] = []
    # [dashboard index, time, status, local port]: every stream open, the first ones included
    opens: list[list[Any]] = []
    errors: Counter[str] = Counter()
    resyncs = 0
    connected = asyncio.Event()
    first_open: set[int] = set()
    stopping = asyncio.Event()

    async def follow(session: aiohttp.ClientSession, index: int, business: str) -> None:
        nonlocal resyncs
        token = create_token(SECRET, [business], 7200)
        last_id: int | None = None
        retry_ms = 2000
        while not stopping.is_set():
            headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = str(last_id)
            try:
                async with session.get(f"{url}/v1/businesses/{business}/events", headers=headers) as resp:
                    peer = resp.connection.transport if resp.connection else None
                    port = peer.get_extra_info("sockname")[1] if peer else None
                    opens.append([index, time.time(), resp.status, port])
                    if resp.status != 200:
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                        continue
                    first_open.add(index)
                    if len(first_open) == len(dashboards):
                        connected.set()
                    lines: list[bytes] = []
                    async for raw in resp.content:
                        line = raw.rstrip(b"\r\n")
                        if line:
                            lines.append(line)
                            continue
                        if not lines:
                            continue
                        message, lines = b"\n".join(lines), []
                        for field in message.split(b"\n"):
                            if field.startswith(b"retry:"):
                                retry_ms = int(field[6:])
                        kind, event_id, data = _parse_message(message)
                        if event_id is not None:
                            last_id = event_id
                        if kind == "resync":
                            resyncs += 1
                        elif kind == "invalidate" and event_id is not None:
                            body = json.loads(data)
                            named = {c["id"] for c in body.get("changes", []) if c.get("table") == "payments"}
                            named |= {p["id"] for p in body.get("payments", [])}
                            events.append([index, event_id, time.time(), sorted(named)])
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
            # The stream ended (a drain, a cut): wait what the server last asked for, as EventSource does.
            await asyncio.sleep(retry_ms / 1000)

    address: str = config["address"]
    connector = aiohttp.TCPConnector(limit=0, force_close=True, local_addr=(address, 0))
    # sock_read: a stream silent for four heartbeats is dead (the proxy would cut it at the same point).
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(follow(session, i, b)) for i, (_d, b) in enumerate(dashboards)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(connected.wait(), 120)
        print(json.dumps({"connected": len(first_open), "failures": len(dashboards) - len(first_open)}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the driver says stop
        stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    out = {"events": events, "opens": opens, "errors": dict(errors), "resyncs": resyncs}
    await asyncio.to_thread(Path(config["out"]).write_text, json.dumps(out))


# -- driver -------------------------------------------------------------------------------------------------


def _cluster(env: dict[str, str], *args: str) -> None:
    subprocess.run([str(CLUSTER), *args], env=env, check=True, stdout=subprocess.DEVNULL)


def _free_base_port(count: int) -> int:
    """A port P such that P .. P+count and P+404 (HAProxy's stats) are free now."""
    for base in range(21000, 40000, 500):
        try:
            for port in [*range(base, base + count + 1), base + 404]:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports")


def _active_listener(url: str, state: Path) -> str:
    """listener-K whose pid the listener's bookkeeping row names as the active node."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("select node from dashboard.listener_state").fetchone()
    pid = str(row[0]).rsplit(":", 1)[1] if row and row[0] else ""
    for pidfile in state.glob("listener-*.pid"):
        if pidfile.read_text().strip() == pid:
            return pidfile.stem
    raise RuntimeError(f"no listener of this cluster is active (node {row})")


def _log_time(path: Path, message: str) -> float | None:
    """Time of the last JSON log line of `path` whose msg is `message`."""
    found = None
    for line in path.read_text(errors="replace").splitlines():
        if f'"msg": "{message}"' in line:
            found = json.loads(line)["ts"]
    return None if found is None else datetime.fromisoformat(found).timestamp()


def _servers_by_stream(haproxy_log: Path) -> dict[tuple[str, int], list[tuple[float, str]]]:
    """(client address, client port) -> (accept time, gateway) of each connection HAProxy logged from it: a
    port can come back later in a run, so a stream is matched to the connection accepted closest to its open."""
    pattern = re.compile(r"^(\S+):(\d+) \[([^\]]+)\] \S+ gateways/(gw\d+) ")
    servers: dict[tuple[str, int], list[tuple[float, str]]] = defaultdict(list)
    for line in haproxy_log.read_text(errors="replace").splitlines():
        if match := pattern.match(line):
            # HAProxy logs in local time; this machine's is UTC, like the benchmark's other clocks.
            accepted = datetime.strptime(match[3], "%d/%b/%Y:%H:%M:%S.%f").replace(tzinfo=UTC).timestamp()
            servers[(match[1], int(match[2]))].append((accepted, match[4]))
    return servers


def _server_of(servers: dict[tuple[str, int], list[tuple[float, str]]], address: str, port: int, at: float) -> str:
    """The gateway of the stream opened from address:port at `at`, or "" when HAProxy did not log it."""
    candidates = servers.get((address, port), [])
    return min(candidates, key=lambda c: abs(c[0] - at))[1] if candidates else ""


def _analyse(
    records: list[list[Any]],
    outputs: list[tuple[dict[str, Any], dict[str, Any]]],
    restarts: list[dict[str, Any]],
    servers: dict[tuple[str, int], list[tuple[float, str]]],
) -> dict[str, Any]:
    committed = {pid: (business, at) for pid, business, _amount, at, _lag in records}
    windows = [(r["started"], r["finished"] + DRAIN_RETRY_MAX_S) for r in restarts]

    def during_restart(at: float) -> bool:
        return any(start <= at <= end for start, end in windows)

    missing = duplicates = out_of_order = resyncs = 0
    latency_all: list[float] = []
    latency_restarts: list[float] = []
    latency_quiet: list[float] = []
    reconnect_times: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    gateways_per_dashboard: list[int] = []
    dashboards = moved = 0
    for config, out in outputs:
        resyncs += out["resyncs"]
        errors.update(out["errors"])
        seen: dict[int, dict[str, float]] = defaultdict(dict)  # dashboard -> payment -> first arrival
        ids: dict[int, list[int]] = defaultdict(list)
        for index, event_id, arrival, named in sorted(out["events"], key=lambda e: e[2]):
            ids[index].append(event_id)
            for pid in named:
                seen[index].setdefault(pid, arrival)
        for history in ids.values():
            duplicates += len(history) - len(set(history))
            out_of_order += sum(1 for a, b in itertools.pairwise(history) if b < a)
        opened: dict[int, list[list[Any]]] = defaultdict(list)
        for index, at, status, port in sorted(out["opens"], key=lambda o: o[1]):
            statuses[status] += 1
            opened[index].append([at, status, port])
        by_business: dict[str, list[int]] = defaultdict(list)
        for index, (_dashboard, business) in enumerate(config["dashboards"]):
            by_business[business].append(index)
            dashboards += 1
            successful = [o for o in opened[index] if o[1] == 200]
            reconnect_times += [o[0] for o in successful[1:]]
            served = [_server_of(servers, config["address"], o[2], o[0]) for o in successful]
            served = [server for server in served if server]
            gateways_per_dashboard.append(len(set(served)))
            moved += sum(1 for a, b in itertools.pairwise(served) if a != b)
        for pid, (business, at) in committed.items():
            for index in by_business.get(business, []):
                arrival = seen[index].get(pid)
                if arrival is None:
                    missing += 1
                    continue
                latency_all.append(arrival - at)
                (latency_restarts if during_restart(at) else latency_quiet).append(arrival - at)
    per_second = Counter(int(t) for t in reconnect_times)
    storms = []
    for restart, (start, end) in zip(restarts, windows, strict=True):
        inside = sorted(t for t in reconnect_times if start <= t <= end)
        counts = [per_second.get(s, 0) for s in range(int(start), int(end) + 1)]
        storms.append(
            {
                "restart": restart["name"],
                "seconds_to_restart": round(restart["finished"] - restart["started"], 1),
                "reconnects": len(inside),
                "reconnects_spread_s": round(inside[-1] - inside[0], 1) if inside else 0,
                "reconnects_per_s_max": max(counts, default=0),
                "reconnects_per_s": counts,
            }
        )
    return {
        "payments_committed": len(records),
        "deliveries_expected": len(latency_all) + missing,
        "payments_without_event_on_a_dashboard": missing,
        "duplicate_events": duplicates,
        "ids_not_increasing": out_of_order,
        "resyncs": resyncs,
        "reconnects": len(reconnect_times),
        "stream_opens_by_status": {str(k): v for k, v in sorted(statuses.items())},
        "client_errors": dict(errors),
        "storms": storms,
        "dashboards": dashboards,
        # Every reconnect reaches a new gateway process (the old one has exited); these also changed server.
        "reconnects_to_another_gateway": moved,
        "dashboards_served_by_2_or_more_gateways": sum(1 for n in gateways_per_dashboard if n >= 2),
        "dashboards_without_haproxy_log_match": sum(1 for n in gateways_per_dashboard if n == 0),
        "commit_to_event_all": _summary(latency_all),
        "commit_to_event_during_restarts": _summary(latency_restarts),
        "commit_to_event_outside_restarts": _summary(latency_quiet),
    }


def run(url: str, args: argparse.Namespace) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        businesses = [str(uuid.uuid4()) for _ in range(args.businesses)]
        clients = [str(uuid.uuid4()) for _ in range(200)]
        with conn.cursor() as cur:
            cur.executemany(
                "insert into businesses (id, name) values (%s, %s)",
                [(b, f"Rolling {i}") for i, b in enumerate(businesses)],
            )
            cur.executemany(
                "insert into clients (id, name, phone) values (%s, %s, %s)",
                [(c, f"Client {i}", f"+2547{i:08d}") for i, c in enumerate(clients)],
            )
    workdir = Path(tempfile.mkdtemp(prefix="rolling-deploy-"))
    state = workdir / "cluster"
    port = _free_base_port(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update(
        CDC_DATABASE_URL=url,
        CDC_SECRET=SECRET,
        CDC_CLUSTER_DIR=str(state),
        CDC_CLUSTER_PORT=str(port),
        CDC_CLUSTER_PYTHON=sys.executable,
    )
    procs: list[subprocess.Popen[Any]] = []
    try:
        _cluster(env, "up")
        proxy = f"http://127.0.0.1:{port}"
        print(f"cluster up at {proxy} (state {state})", flush=True)
        dashboards = [[str(uuid.uuid4()), businesses[i % len(businesses)]] for i in range(args.dashboards)]
        configs: list[dict[str, Any]] = []
        for k in range(args.client_procs):
            config = {
                "url": proxy,
                "address": f"127.0.1.{k + 1}",
                "dashboards": dashboards[k :: args.client_procs],
                "out": str(workdir / f"client-{k}.json"),
            }
            path = workdir / f"client-{k}-config.json"
            path.write_text(json.dumps(config))
            configs.append(config)
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--role", "client", str(path)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        connected, failures = connection_reports(procs)
        print(f"{connected} dashboards connected, {failures} not", flush=True)

        # Four restarts of a few seconds each, `--gap` apart.
        restarts_duration = args.warmup + 4 * (args.gap + 5 + args.down_seconds)
        seconds = restarts_duration + args.tail
        command, writer_out = writer_command(
            workdir,
            url=url,
            businesses=businesses,
            clients=clients,
            rate=args.rate,
            seconds=seconds,
            writers=args.writers,
        )
        load_before = _uptime()
        print(f"before: {load_before}", flush=True)
        writer = subprocess.Popen(command)
        procs.append(writer)
        time.sleep(args.warmup)
        restarts: list[dict[str, Any]] = []
        for name in [f"gateway-{k}" for k in range(1, 4)] + [_active_listener(url, state)]:
            started = time.time()
            _cluster(env, "stop", name)
            time.sleep(args.down_seconds)
            _cluster(env, "start", name)
            restarts.append({"name": name, "started": started, "finished": time.time()})
            print(f"restarted {name} in {restarts[-1]['finished'] - started:.1f} s", flush=True)
            time.sleep(args.gap)
        listener = restarts[-1]
        standby = "listener-2" if listener["name"] == "listener-1" else "listener-1"
        took_over = _log_time(state / f"{standby}.log", "standby taking over as the active listener")
        takeover = None if took_over is None else round(took_over - listener["started"], 2)
        if writer.wait(seconds + 120) != 0:
            raise RuntimeError("the writer failed")
        load_after = _uptime()
        # Until the listener has turned every change into events, then a quiet moment for the last deliveries.
        with psycopg.connect(url, autocommit=True) as conn:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                row = conn.execute(queries("gateway")["listener_lag"]).fetchone()
                if row is not None and row[0] == 0:
                    break
                time.sleep(0.1)
        time.sleep(5)
        clients_procs = procs[: args.client_procs]
        for proc in clients_procs:
            assert proc.stdin is not None
            proc.stdin.write("stop\n")
            proc.stdin.flush()
        for proc in clients_procs:
            proc.wait(120)
        records = json.loads(writer_out.read_text())
        outputs = [(config, json.loads(Path(config["out"]).read_text())) for config in configs]
        # HAProxy logs a stream when it ends, and it notices that a client went away only when its next write
        # fails (a heartbeat): wait until every stream the clients opened is in its log, or 40 s.
        opened = sum(1 for _config, out in outputs for o in out["opens"] if o[2] == 200)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            servers = _servers_by_stream(state / "haproxy.log")
            if sum(len(v) for v in servers.values()) >= opened:
                break
            time.sleep(1)
        result = {
            "command": " ".join(sys.argv),
            "dashboards": args.dashboards,
            "businesses": args.businesses,
            "rate": args.rate,
            "writer_seconds": seconds,
            **_analyse(records, outputs, restarts, servers),
            "standby_took_over_s_after_sigterm": takeover,
            "uptime_before": load_before,
            "uptime_after": load_after,
        }
        print(json.dumps(result, indent=2), flush=True)
        ok = all(
            result[key] == 0
            for key in ("payments_without_event_on_a_dashboard", "duplicate_events", "ids_not_increasing", "resyncs")
        )
        return 0 if ok and connected == args.dashboards else 1
    finally:
        for proc in procs:
            stop(proc, timeout=10)
        subprocess.run([str(CLUSTER), "down"], env=env, check=False, stdout=subprocess.DEVNULL)
        if args.keep_logs:
            print(f"logs kept in {workdir}", flush=True)
        else:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dashboards", type=int, default=1000, help="SSE streams through the proxy (default 1000)")
    parser.add_argument("--businesses", type=int, default=100, help="businesses they watch (default 100)")
    parser.add_argument("--rate", type=float, default=200, help="payments per second (default 200)")
    parser.add_argument("--client-procs", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--writers", type=int, default=8, help="writer connections (default 8)")
    parser.add_argument("--warmup", type=float, default=15, help="seconds of writes before the first restart")
    parser.add_argument("--gap", type=float, default=10, help="seconds between one restart's end and the next")
    parser.add_argument("--tail", type=float, default=15, help="seconds of writes after the last restart's gap")
    parser.add_argument(
        "--down-seconds",
        type=float,
        default=0,
        help="keep each process stopped this long before starting it again, as a slower deploy would (default 0)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the cluster's state directory and logs")
    parser.add_argument("--role", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _raise_fd_limit()
    if args.role:
        asyncio.run(_client(json.loads(Path(args.role[1]).read_text())))
        return 0
    with scratch_database("bench_rolling") as url:
        return run(url, args)


if __name__ == "__main__":
    sys.exit(main())
