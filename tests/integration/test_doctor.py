"""`cdc-dashboard doctor` as operators run it: the real CLI against a real PostgreSQL and a real `serve`.

A healthy system passes every check (exit 0) and the probe leaves nothing behind; each fault doctor names is
reported with its fix and a non-zero exit, and, where the fix is a command, running it makes doctor pass again.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
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
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import psycopg
import pytest

from cdc_dashboard.db import with_database
from cdc_dashboard.demo.traffic import _businesses
from cdc_dashboard.ops.probe import PROBE_BUSINESS_ID

from ..pg import clone_database, drop_database
from ..processes import stop_process
from .gateway_support import SECRET, free_port, serve_subprocess, token_for

CLI = str(Path(sys.executable).parent / "cdc-dashboard")
CHECKS = [
    "database",
    "schema",
    "capture",
    "capture_triggers",
    "notify_queue",
    "listener",
    "backlog",
    "oldest_transaction",
    "events",
    "dead_letters",
    "gateway",
    "end_to_end",
]


def doctor(db_url: str | None, gateway: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env["CDC_SECRET"] = SECRET
    if db_url is not None:
        env["CDC_DATABASE_URL"] = db_url
    return subprocess.run([CLI, "doctor", "--url", gateway, *args], env=env, capture_output=True, text=True, timeout=60)


def report(db_url: str | None, gateway: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """doctor --json: exit code and the checks by name (asserting the document's shape on the way)."""
    result = doctor(db_url, gateway, "--json")
    assert "Traceback" not in result.stderr, result.stderr
    body = json.loads(result.stdout)
    assert set(body) == {"ok", "database", "gateway", "ms", "checks"}
    assert [c["name"] for c in body["checks"]] == CHECKS
    for check in body["checks"]:
        assert set(check) == {"name", "status", "ms", "summary", "fix", "details"}
        assert check["status"] in ("pass", "fail", "skip")
        assert isinstance(check["ms"], int | float) and check["ms"] >= 0
        assert (check["fix"] is not None) == (check["status"] == "fail"), check
    assert body["ok"] == (result.returncode == 0) == all(c["status"] == "pass" for c in body["checks"])
    return result.returncode, {c["name"]: c for c in body["checks"]}


def wait_until_consumed(db_url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(db_url, autocommit=True) as conn:
        while conn.execute("select count(*) from cdc.change_log").fetchone() != (0,):
            assert time.monotonic() < deadline, "the listener did not consume the change log"
            time.sleep(0.05)


def seed(db_url: str) -> list[str]:
    """Two businesses with clients, bookings and payments in several states."""
    ids = [str(uuid.uuid4()) for _ in range(2)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        for n, business in enumerate(ids):
            conn.execute("insert into businesses (id, name) values (%s, %s)", (business, f"Salon {n}"))
            client = conn.execute(
                "insert into clients (name, phone) values (%s, %s) returning id", (f"Client {n}", f"+2547000000{n}")
            ).fetchone()
            assert client is not None
            booking = conn.execute(
                "insert into bookings (business_id, client_id, amount_due_minor, currency) "
                "values (%s, %s, 250000, 'KES') returning id",
                (business, client[0]),
            ).fetchone()
            assert booking is not None
            for amount, status in ((150000, "completed"), (100000, "completed"), (5000, "failed")):
                payment = conn.execute(
                    "insert into payments (business_id, client_id, booking_id, amount_minor, currency, method, status) "
                    "values (%s, %s, %s, %s, 'KES', 'mpesa', %s) returning id",
                    (business, client[0], booking[0], amount, status),
                ).fetchone()
                assert payment is not None
                conn.execute(
                    "insert into payment_transactions (business_id, payment_id, provider, amount_minor, currency, "
                    "status) values (%s, %s, 'mpesa', %s, 'KES', %s)",
                    (business, payment[0], amount, status),
                )
            conn.execute("update bookings set payment_status = 'paid' where id = %s", (booking[0],))
    return ids


def figures(gateway: str, businesses: list[str]) -> dict[str, Any]:
    """What every business's dashboard shows: stats (without the event position) and its lists."""
    headers = {"Authorization": f"Bearer {token_for(admin=True)}"}
    out: dict[str, Any] = {}
    with httpx.Client(base_url=gateway, headers=headers, timeout=10) as client:
        for business in businesses:
            stats = client.get(f"/v1/businesses/{business}/stats")
            assert stats.status_code == 200, stats.text
            body = stats.json()
            body.pop("as_of_event_id")
            out[business] = {"stats": body}
            for listing in ("payment-transactions", "payments", "transactions"):
                page = client.get(f"/v1/businesses/{business}/{listing}")
                assert page.status_code == 200, page.text
                rows = page.json()
                if isinstance(rows, dict):
                    rows.pop("as_of_event_id", None)
                out[business][listing] = rows
    return out


def probe_traces(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        queries = {
            "businesses": "select count(*) from businesses where id = %(p)s or name like 'cdc-dashboard doctor%%'",
            "payment_transactions": "select count(*) from payment_transactions where provider = 'cdc-dashboard-doctor'"
            " or business_id = %(p)s",
            "events": "select count(*) from dashboard.events where business_id = %(p)s::text",
            "change_log": "select count(*) from cdc.change_log where business_id = %(p)s::text",
            "facts": "select (select count(*) from dashboard.payment_facts where business_id = %(p)s)"
            " + (select count(*) from dashboard.revenue_daily where business_id = %(p)s)"
            " + (select count(*) from dashboard.booking_counts where business_id = %(p)s)",
        }
        counts = {}
        for name, sql in queries.items():
            row = conn.execute(sql, {"p": PROBE_BUSINESS_ID}).fetchone()
            assert row is not None
            counts[name] = row[0]
    return counts


# -- a healthy system, shared by the tests that leave it healthy ---------------------------------------------


@pytest.fixture(scope="module")
def healthy(admin_url: str, template_db: str) -> Iterator[tuple[str, str, list[str]]]:
    """(database URL, gateway URL, seeded businesses) of a running `serve --with-listener`."""
    name = clone_database(admin_url, template_db)
    url = with_database(admin_url, name)
    try:
        businesses = seed(url)
        port = free_port()
        with serve_subprocess(url, port, "--with-listener"):
            wait_until_consumed(url)
            yield url, f"http://127.0.0.1:{port}", businesses
    finally:
        drop_database(admin_url, name)


def test_a_healthy_system_passes_every_check(healthy: tuple[str, str, list[str]]) -> None:
    db_url, gateway, _ = healthy
    code, checks = report(db_url, gateway)
    assert code == 0, {n: c["summary"] for n, c in checks.items() if c["status"] != "pass"}
    assert checks["database"]["details"]["server_version"]
    assert checks["listener"]["details"]["state"] == "live"
    assert checks["listener"]["details"]["leader_connected"] is True
    assert checks["listener"]["details"]["listener_processes"] == 1
    hops = checks["end_to_end"]["details"]["hops"]
    assert set(hops) == {"stream_open_ms", "capture_ms", "listener_ms", "gateway_ms", "total_ms"}
    assert all(v >= 0 for v in hops.values())
    assert hops["total_ms"] >= hops["capture_ms"]


def test_the_table_is_readable_and_the_exit_code_says_all_passed(healthy: tuple[str, str, list[str]]) -> None:
    db_url, gateway, _ = healthy
    result = doctor(db_url, gateway)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in CHECKS:
        assert any(line.split()[:2] == [name, "pass"] for line in lines if line.strip()), (name, result.stdout)
    assert "ms" in result.stdout and "probe arrived in" in result.stdout
    assert lines[-1].startswith("all 12 checks passed")


def test_the_probe_leaves_no_trace_in_any_business_figures(healthy: tuple[str, str, list[str]]) -> None:
    db_url, gateway, businesses = healthy
    before = figures(gateway, businesses)
    for _ in range(2):
        code, checks = report(db_url, gateway)
        assert code == 0 and checks["end_to_end"]["status"] == "pass"
    wait_until_consumed(db_url)
    assert figures(gateway, businesses) == before
    assert probe_traces(db_url) == dict.fromkeys(
        ("businesses", "payment_transactions", "events", "change_log", "facts"), 0
    )


def test_a_dropped_capture_trigger_is_named_and_db_apply_fixes_it(healthy: tuple[str, str, list[str]]) -> None:
    db_url, gateway, _ = healthy
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("drop trigger cdc_capture_v1 on payments")
    code, checks = report(db_url, gateway)
    assert code != 0
    failed = checks["capture_triggers"]
    assert failed["status"] == "fail"
    assert "payments: trigger cdc_capture_v1 is missing" in failed["summary"]
    assert failed["fix"] == "run cdc-dashboard db apply"
    apply = subprocess.run(
        [CLI, "db", "apply"],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("CDC_")}, "CDC_DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert apply.returncode == 0, apply.stderr
    code, checks = report(db_url, gateway)
    assert code == 0, checks["capture_triggers"]


def test_waiting_dead_letters_fail_doctor_until_retried_or_discarded(healthy: tuple[str, str, list[str]]) -> None:
    """doctor names how many wait, the oldest, and the commands; it passes again once they are dealt with."""
    db_url, gateway, businesses = healthy
    with psycopg.connect(db_url, autocommit=True) as conn:
        ids = [
            row[0]
            for row in conn.execute(
                "insert into dashboard.dead_letters (change, reason, sqlstate, created_at) "
                "select jsonb_build_object('id', n, 'table', 'public.payments', 'op', 'UPDATE',"
                " 'business_id', %s::text, 'row_id', gen_random_uuid()::text, 'old', null, 'new', null,"
                " 'captured_at', now()),"
                " 'numeric field overflow', '22003', now() - make_interval(hours => 4 - n) "
                "from generate_series(1, 3) as n order by n returning id",
                (businesses[0],),
            ).fetchall()
        ]
    code, checks = report(db_url, gateway)
    assert code == 1
    failed = checks["dead_letters"]
    assert failed["status"] == "fail"
    assert failed["summary"] == (
        "3 change(s) could not become events and wait in dashboard.dead_letters; oldest 3.0 h ago "
        f"(id {ids[0]}, UPDATE on public.payments: numeric field overflow)"
    )
    assert failed["fix"].startswith("run `cdc-dashboard dead-letters list`, fix the cause, then ")
    assert "`cdc-dashboard dead-letters retry ID...`" in failed["fix"]
    assert "`cdc-dashboard dead-letters discard ID...`" in failed["fix"]
    assert failed["details"]["count"] == 3 and failed["details"]["oldest_id"] == ids[0]
    assert [name for name, c in checks.items() if c["status"] != "pass"] == ["dead_letters"]

    table = doctor(db_url, gateway)
    assert table.returncode == 1
    assert re.search(r"^\s+dead_letters\s+FAIL .* 3 change\(s\) could not become events", table.stdout, re.M)
    assert "fix: run `cdc-dashboard dead-letters list`" in table.stdout

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CDC_")}, "CDC_DATABASE_URL": db_url}
    discard = subprocess.run(
        [CLI, "dead-letters", "discard", *(str(i) for i in ids)], env=env, capture_output=True, text=True, timeout=60
    )
    assert discard.returncode == 0, discard.stderr
    code, checks = report(db_url, gateway)
    assert code == 0, {n: c["summary"] for n, c in checks.items() if c["status"] != "pass"}
    assert checks["dead_letters"]["summary"] == "none"


@contextmanager
def capture_trigger_disabled(db_url: str, table: str) -> Iterator[None]:
    """The table's capture trigger off for the duration (a DBA's mistake doctor must name), then on again."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"alter table {table} disable trigger cdc_capture_v1")
        try:
            yield
        finally:
            conn.execute(f"alter table {table} enable trigger cdc_capture_v1")


def test_a_disabled_trigger_is_named_with_the_statement_that_enables_it(healthy: tuple[str, str, list[str]]) -> None:
    db_url, gateway, _ = healthy
    with capture_trigger_disabled(db_url, "bookings"):
        code, checks = report(db_url, gateway)
    assert code != 0
    assert "bookings: trigger cdc_capture_v1 is disabled" in checks["capture_triggers"]["summary"]
    assert checks["capture_triggers"]["fix"] == "psql: alter table public.bookings enable trigger cdc_capture_v1"


def test_the_probe_names_the_hop_that_failed(healthy: tuple[str, str, list[str]]) -> None:
    db_url, gateway, _ = healthy
    with capture_trigger_disabled(db_url, "payment_transactions"):
        code, checks = report(db_url, gateway)
    assert code != 0
    probe = checks["end_to_end"]
    assert probe["status"] == "fail"
    assert probe["summary"] == "the capture trigger recorded 0 of the probe's 2 changes on public.payment_transactions"
    assert "capture_triggers" in probe["fix"]
    assert "capture_ms" in probe["details"]["hops"] and "total_ms" not in probe["details"]["hops"]
    assert probe_traces(db_url)["businesses"] == 0


def test_a_gateway_that_is_down_is_named_and_the_probe_skipped(healthy: tuple[str, str, list[str]]) -> None:
    db_url, _, _ = healthy
    closed = f"http://127.0.0.1:{free_port()}"
    code, checks = report(db_url, closed)
    assert code != 0
    assert checks["gateway"]["status"] == "fail"
    assert f"no gateway answers at {closed}" in checks["gateway"]["summary"]
    assert "systemctl start cdc-dashboard-gateway" in checks["gateway"]["fix"]
    assert checks["end_to_end"]["status"] == "skip"
    assert all(checks[n]["status"] == "pass" for n in CHECKS[:10])


# -- faults that need a system of their own ------------------------------------------------------------------


def test_a_stopped_listener_is_named_with_how_to_start_it(db_url: str) -> None:
    port = free_port()
    with serve_subprocess(db_url, port):  # a gateway, and no listener anywhere
        gateway = f"http://127.0.0.1:{port}"
        code, checks = report(db_url, gateway)
        assert code != 0
        assert checks["gateway"]["status"] == "pass"
        assert checks["listener"]["status"] == "fail"
        assert checks["listener"]["summary"] == "the listener has never run against this database"
        assert "systemctl restart cdc-dashboard-listener" in checks["listener"]["fix"]
        assert checks["end_to_end"]["status"] == "skip"

        # A listener that ran and vanished (killed, host gone) leaves a heartbeat that goes stale.
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "update dashboard.listener_state set state = 'live', node = 'db-host:4242', "
                "heartbeat_at = now() - interval '1 minute'"
            )
        code, checks = report(db_url, gateway)
        assert code != 0
        assert re.match(r"no listener heartbeat for 6\d\.\d s ", checks["listener"]["summary"])
        assert "db-host:4242" in checks["listener"]["summary"]
        assert "systemctl restart cdc-dashboard-listener" in checks["listener"]["fix"]


def test_backlog_stale_events_and_dead_letters_are_named(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        # A change nobody consumed for a minute, an event pruning forgot, a change set aside.
        conn.execute(
            "insert into cdc.change_log (table_name, op, business_id, row_id, captured_at) "
            "values ('public.payments', 'INSERT', %s, %s, now() - interval '1 minute')",
            (str(uuid.uuid4()), str(uuid.uuid4())),
        )
        conn.execute(
            "insert into dashboard.events (id, business_id, kind, payload, created_at) "
            "values (nextval('dashboard.event_id_seq'), %s, 'invalidate', '{}', now() - interval '10 days')",
            (str(uuid.uuid4()),),
        )
        conn.execute(
            "insert into dashboard.dead_letters (change, reason) values ('{}', 'INSERT on x carries no business key')"
        )
    code, checks = report(db_url, f"http://127.0.0.1:{free_port()}")
    assert code != 0
    assert re.match(
        r"1 change\(s\) waiting, oldest 6\d\.\d s: the listener is not consuming", checks["backlog"]["summary"]
    )
    assert "systemctl restart cdc-dashboard-listener" in checks["backlog"]["fix"]
    assert "pruning is not keeping up" in checks["events"]["summary"]
    assert "CDC_EVENT_RETENTION_DAYS" in checks["events"]["fix"]
    assert checks["dead_letters"]["summary"].startswith("1 change(s) could not become events")
    assert "carries no business key" in checks["dead_letters"]["summary"]
    assert checks["dead_letters"]["fix"].startswith("run `cdc-dashboard dead-letters list`")


@pytest.mark.parametrize(
    ("stop", "summary"),
    [
        (signal.SIGKILL, "no listener holds the leadership lock"),  # before its heartbeat goes stale
        (signal.SIGTERM, "the listener stopped"),
    ],
    ids=["killed", "stopped"],
)
def test_a_listener_that_is_gone_is_named_at_once(db_url: str, stop: signal.Signals, summary: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env["CDC_DATABASE_URL"] = db_url
    proc = subprocess.Popen([CLI, "listen"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        with psycopg.connect(db_url, autocommit=True) as conn:
            while conn.execute("select state from dashboard.listener_state").fetchone() != ("live",):
                assert proc.poll() is None and time.monotonic() < deadline, "the listener did not go live"
                time.sleep(0.1)
    finally:
        stop_process(proc, stop, timeout=10)
    code, checks = report(db_url, f"http://127.0.0.1:{free_port()}")
    assert code != 0
    listener = checks["listener"]
    assert listener["status"] == "fail" and listener["summary"].startswith(summary), listener
    assert "systemctl restart cdc-dashboard-listener" in listener["fix"]


def test_a_schema_behind_says_db_apply(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("delete from dashboard.schema_migrations where version = '0005_incremental_aggregates.sql'")
    code, checks = report(db_url, f"http://127.0.0.1:{free_port()}")
    assert code != 0
    assert checks["schema"]["status"] == "fail"
    assert checks["schema"]["summary"] == "1 migration(s) pending: 0005_incremental_aggregates.sql"
    assert checks["schema"]["fix"] == "run cdc-dashboard db apply"


def test_an_empty_database_fails_with_db_apply_and_no_traceback(empty_db_url: str) -> None:
    code, checks = report(empty_db_url, f"http://127.0.0.1:{free_port()}")
    assert code != 0
    assert checks["database"]["status"] == "pass"
    assert checks["schema"]["fix"] == checks["capture"]["fix"] == "run cdc-dashboard db apply"
    assert checks["capture_triggers"]["status"] == "skip"
    # What needs the schema is skipped, pointing at the schema, rather than failing for the same cause.
    assert checks["listener"]["status"] == "skip" and "schema" in checks["listener"]["summary"]


def test_a_role_without_rights_is_told_which_role_to_use(db_url: str) -> None:
    role = f"doctor_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"create role {role} login password 'doctor-test'")
    parts = urlsplit(db_url)
    host = parts.netloc.rpartition("@")[2]
    as_role = urlunsplit(parts._replace(netloc=f"{role}:doctor-test@{host}"))
    try:
        code, checks = report(as_role, f"http://127.0.0.1:{free_port()}")
        assert code != 0
        for name in ("schema", "capture", "listener"):
            assert checks[name]["status"] == "fail" and checks[name]["summary"].startswith("permission denied")
            assert "the listener's database role" in checks[name]["fix"]
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(f"drop role {role}")


def test_an_unreachable_database_fails_first_and_skips_the_rest() -> None:
    code, checks = report("postgresql://nobody@127.0.0.1:1/none", f"http://127.0.0.1:{free_port()}")
    assert code != 0
    assert checks["database"]["status"] == "fail"
    assert "cannot connect to postgresql://nobody@127.0.0.1:1/none" in checks["database"]["summary"]
    assert "CDC_DATABASE_URL" in checks["database"]["fix"]
    assert all(checks[n]["status"] == "skip" for n in CHECKS[1:10]), checks
    assert checks["end_to_end"]["status"] == "skip"
    result = doctor(None, f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "CDC_DATABASE_URL is not set" in result.stdout


def test_the_probe_needs_the_gateways_secret(healthy: tuple[str, str, list[str]]) -> None:
    db_url, gateway, _ = healthy
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update(CDC_DATABASE_URL=db_url, CDC_SECRET="another-secret-" + "x" * 40)
    result = subprocess.run(
        [CLI, "doctor", "--json", "--url", gateway], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    probe = {c["name"]: c for c in json.loads(result.stdout)["checks"]}["end_to_end"]
    assert probe["status"] == "fail" and "refused the probe's token" in probe["summary"]
    assert "CDC_SECRET" in probe["fix"]
    assert probe_traces(db_url)["businesses"] == 0


def output(log: IO[bytes]) -> bytes:
    log.seek(0)
    return log.read()


def test_doctor_finds_the_demo_that_run_is_running_here(tmp_path: Path) -> None:
    """`cdc-dashboard run` then `cdc-dashboard doctor` in the same directory, with no configuration at all."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env["CDC_HTTP_PORT"] = str(port)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([CLI, "run"], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while b"Press Ctrl-C" not in output(log):
                assert proc.poll() is None and time.monotonic() < deadline, output(log).decode()
                time.sleep(0.2)
            result = subprocess.run([CLI, "doctor"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stderr == ""
            assert "local socket" in result.stdout.splitlines()[0]
        finally:
            stop_process(proc, signal.SIGINT, timeout=30)
    # Once it stopped, doctor does not start the demo's database itself.
    result = subprocess.run([CLI, "doctor"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "CDC_DATABASE_URL is not set" in result.stdout


def test_simulate_never_picks_the_probe_business(db_url: str) -> None:
    """The probe business exists only while a probe runs; simulate must not pay it in that moment either."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "insert into businesses (id, name, created_at) values (%s, 'probe', now() - interval '1 day')",
            (PROBE_BUSINESS_ID,),
        )
        other = conn.execute("insert into businesses (name) values ('a shop') returning id").fetchone()

    async def pick() -> list[uuid.UUID]:
        pool = await asyncpg.create_pool(db_url, min_size=1, max_size=1)
        try:
            return [business.id for business in await _businesses(pool, 1, random.Random(1))]
        finally:
            await pool.close()

    assert other is not None and asyncio.run(pick()) == [other[0]]
