"""`cdc-dashboard dead-letters` as operators run it (the real CLI in a subprocess, a real PostgreSQL), and the
dead letters in `/v1/status` and `/metrics` (real HTTP). doctor's check is in test_doctor.py.

Dead letters are made the ways the listener makes them: a change it rejects outright (no business key), and a
captured change moved into `dashboard.dead_letters` exactly as the batch stores one (as it will for a change
whose processing raised a data error)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import psycopg
import pytest

from cdc_dashboard.figures import reads

from ..listening import event_rows, payment_ids_in_events, running_listener, wait_for
from .gateway_support import run_gateway, token_for
from .test_cli import run_cli

Conn = psycopg.Connection[Any]

LIST_KEYS = {
    "id",
    "created_at",
    "age_seconds",
    "table",
    "op",
    "business_id",
    "row_id",
    "reason",
    "sqlstate",
    "change",
}
CHANGE_KEYS = {"id", "table", "op", "business_id", "row_id", "old", "new", "captured_at"}
# The listener's sleep announcement, as writers read it (cdc.wake_v1).
SLEEPING = "select coalesce(to_timestamp(pg_sequence_last_value('cdc.sleeping_until_v1')) > now(), false)"


@pytest.fixture
def conn(db_url: str) -> Any:
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


def new_business(conn: Conn) -> str:
    b = str(uuid.uuid4())
    conn.execute("insert into businesses (id, name) values (%s, 'Salon')", (b,))
    return b


def pay(conn: Conn, business: str, amount: int, status: str = "completed") -> tuple[str, int]:
    """A payment through the real capture trigger: its id and its captured change's id."""
    payment = str(uuid.uuid4())
    conn.execute(
        "insert into payments (id, business_id, amount_minor, currency, method, status)"
        " values (%s, %s, %s, 'KES', 'mpesa', %s)",
        (payment, business, amount, status),
    )
    row = conn.execute("select max(id) from cdc.change_log where row_id = %s", (payment,)).fetchone()
    assert row is not None and row[0] is not None
    return payment, int(row[0])


def set_aside(conn: Conn, change_id: int, reason: str, sqlstate: str | None = None) -> int:
    """Move a captured change into dashboard.dead_letters as the listener's batch stores one; its id."""
    row = conn.execute(
        "with taken as (delete from cdc.change_log where id = %s returning *) "
        "insert into dashboard.dead_letters (change, reason, sqlstate) "
        "select jsonb_build_object('id', id, 'table', table_name, 'op', op, 'business_id', business_id, "
        "'row_id', row_id, 'old', old_values, 'new', new_values, 'captured_at', captured_at), %s, %s "
        "from taken returning id",
        (change_id, reason, sqlstate),
    ).fetchone()
    assert row is not None
    return int(row[0])


def rejected_by_the_listener(conn: Conn) -> int:
    """A change with no business key, consumed by the listener's own batch function: it sets it aside."""
    conn.execute(
        "insert into cdc.change_log (table_name, op, business_id, row_id, new_values)"
        " values ('public.payments', 'INSERT', null, %s, '{\"status\": \"completed\"}')",
        (str(uuid.uuid4()),),
    )
    result = conn.execute("select dead_letters from dashboard.consume_changes_v2(100, 'live', 0)").fetchone()
    assert result is not None and len(result[0]) == 1
    row = conn.execute("select max(id) from dashboard.dead_letters").fetchone()
    assert row is not None
    return int(row[0])


def letters(conn: Conn) -> list[tuple[Any, ...]]:
    return conn.execute("select id, change, reason, sqlstate from dashboard.dead_letters order by id").fetchall()


def change_log(conn: Conn) -> list[tuple[Any, ...]]:
    return conn.execute(
        "select id, table_name, op, business_id, row_id, old_values, new_values, captured_at"
        " from cdc.change_log order by id"
    ).fetchall()


def one_line_error(result: Any) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cdc-dashboard: ")
    return str(lines[0])


# -- list ------------------------------------------------------------------------------------------------------


def test_list_shows_each_dead_letter_as_a_table_and_as_json(db_url: str, conn: Conn) -> None:
    empty = run_cli("dead-letters", "list", CDC_DATABASE_URL=db_url)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.strip() == "no dead letters waiting"
    empty_json = run_cli("dead-letters", "list", "--json", CDC_DATABASE_URL=db_url)
    assert empty_json.returncode == 0 and json.loads(empty_json.stdout) == []

    b = new_business(conn)
    payment, change_id = pay(conn, b, 5000)
    overflow = set_aside(conn, change_id, "bigint out of range\nCONTEXT: a second line", "22003")
    no_key = rejected_by_the_listener(conn)

    result = run_cli("dead-letters", "list", "--json", CDC_DATABASE_URL=db_url)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert [d["id"] for d in body] == [overflow, no_key]  # oldest first
    for d in body:
        assert set(d) == LIST_KEYS
        assert set(d["change"]) == CHANGE_KEYS
        assert datetime.fromisoformat(d["created_at"]).tzinfo is not None
        assert 0 <= d["age_seconds"] < 60
    first, second = body
    assert (first["table"], first["op"], first["business_id"], first["row_id"]) == (
        "public.payments",
        "INSERT",
        b,
        payment,
    )
    assert first["reason"] == "bigint out of range\nCONTEXT: a second line"
    assert first["sqlstate"] == "22003"
    assert first["change"]["id"] == change_id and first["change"]["new"]["status"] == "completed"
    assert first["change"]["old"] is None
    assert second["business_id"] is None
    assert second["reason"] == "INSERT on public.payments carries no business key"
    assert second["sqlstate"] is None

    table = run_cli("dead-letters", "list", CDC_DATABASE_URL=db_url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["id", "age", "table", "op", "business", "row", "id", "reason"]
    assert re.match(
        rf"\s*{overflow}\s+\d+ s\s+public\.payments\s+INSERT\s+{b}\s+{payment}\s+"
        r"bigint out of range CONTEXT: a second line \(SQLSTATE 22003\)$",
        lines[1],
    ), lines[1]
    assert re.match(
        rf"\s*{no_key}\s+\d+ s\s+public\.payments\s+INSERT\s+-\s+\S+\s+INSERT on public\.payments carries no business",
        lines[2],
    ), lines[2]
    assert "2 dead letter(s)" in lines[-1] and "cdc-dashboard dead-letters retry" in lines[-1]


# -- retry -----------------------------------------------------------------------------------------------------


def test_retry_puts_the_change_back_in_the_log_and_removes_its_dead_letter(db_url: str, conn: Conn) -> None:
    b = new_business(conn)
    payment, change_id = pay(conn, b, 5000)
    conn.execute("update payments set status = 'refunded' where id = %s", (payment,))
    _, update_id = pay(conn, b, 1)  # (only to have a second change to leave alone)
    captured = {row[0]: row for row in change_log(conn)}
    update_change = conn.execute(
        "select max(id) from cdc.change_log where row_id = %s and op = 'UPDATE'", (payment,)
    ).fetchone()
    assert update_change is not None
    insert_letter = set_aside(conn, change_id, "numeric field overflow", "22003")
    update_letter = set_aside(conn, update_change[0], "value out of range", "22003")
    before = time.time()

    result = run_cli("dead-letters", "retry", str(update_letter), str(insert_letter), CDC_DATABASE_URL=db_url)
    assert result.returncode == 0, result.stderr
    assert letters(conn) == []
    retried = [row for row in change_log(conn) if row[0] != update_id]
    assert len(retried) == 2
    # Fresh ids after everything captured so far, in the order the changes were set aside.
    assert all(row[0] > max(captured) for row in retried)
    for (new_id, *fields, captured_at), original in zip(
        retried, (captured[change_id], captured[update_change[0]]), strict=True
    ):
        assert fields == list(original[1:7])  # table, op, business, row, old and new values: unchanged
        assert captured_at.timestamp() >= before - 1  # captured now: it entered the queue now
        assert f"as change {new_id}: " in result.stdout
    assert retried[1][5]["status"] == "completed" and retried[1][6]["status"] == "refunded"
    # An INSERT has no old values: SQL null as the capture writes it, not a JSON null (psycopg reads both as None).
    assert conn.execute("select old_values is null from cdc.change_log where id = %s", (retried[0][0],)).fetchone() == (
        True,
    )
    assert re.search(rf"^retried dead letter {insert_letter} as change {retried[0][0]}: INSERT on", result.stdout, re.M)
    assert re.search(rf"^retried dead letter {update_letter} as change {retried[1][0]}: UPDATE on", result.stdout, re.M)
    assert "retried 2 dead letter(s)" in result.stdout


def test_retry_all_and_nothing_to_retry(db_url: str, conn: Conn) -> None:
    nothing = run_cli("dead-letters", "retry", "--all", CDC_DATABASE_URL=db_url)
    assert nothing.returncode == 0, nothing.stderr
    assert nothing.stdout.strip() == "no dead letters waiting: nothing to retry"
    b = new_business(conn)
    ids = [set_aside(conn, pay(conn, b, amount)[1], "division by zero", "22012") for amount in (1, 2, 3)]
    result = run_cli("dead-letters", "retry", "--all", CDC_DATABASE_URL=db_url)
    assert result.returncode == 0, result.stderr
    assert letters(conn) == []
    assert len(change_log(conn)) == 3
    assert [int(m) for m in re.findall(r"^retried dead letter (\d+)", result.stdout, re.M)] == ids


def test_a_retry_that_fails_midway_changes_nothing(db_url: str, conn: Conn) -> None:
    """The inserts, the deletes and the wake-up are one transaction: a failure on the second change leaves the
    first one's dead letter in place and nothing in the log."""
    b = new_business(conn)
    good = set_aside(conn, pay(conn, b, 100)[1], "numeric field overflow")
    _, change_id = pay(conn, b, 200)
    conn.execute("update cdc.change_log set row_id = 'boom' where id = %s", (change_id,))
    bad = set_aside(conn, change_id, "numeric field overflow")
    conn.execute(
        "create function public.boom() returns trigger language plpgsql as $$ begin"
        " if new.row_id = 'boom' then raise exception 'refusing row boom'; end if; return new; end $$"
    )
    conn.execute("create trigger boom before insert on cdc.change_log for each row execute function public.boom()")
    before = letters(conn)

    error = one_line_error(run_cli("dead-letters", "retry", str(good), str(bad), CDC_DATABASE_URL=db_url))
    assert error == "cdc-dashboard: retry failed, nothing changed: refusing row boom"
    assert letters(conn) == before
    assert change_log(conn) == []

    conn.execute("drop trigger boom on cdc.change_log")
    assert run_cli("dead-letters", "retry", str(good), str(bad), CDC_DATABASE_URL=db_url).returncode == 0
    assert letters(conn) == [] and len(change_log(conn)) == 2


def test_retry_refuses_a_change_the_listener_would_set_aside_again(db_url: str, conn: Conn) -> None:
    b = new_business(conn)
    good = set_aside(conn, pay(conn, b, 100)[1], "numeric field overflow")
    no_key = rejected_by_the_listener(conn)
    before = letters(conn)
    error = one_line_error(run_cli("dead-letters", "retry", str(good), str(no_key), CDC_DATABASE_URL=db_url))
    assert error == (
        f"cdc-dashboard: dead letter {no_key} would be set aside again (INSERT on public.payments carries no "
        "business key): nothing retried; correct its change in dashboard.dead_letters or discard it"
    )
    assert letters(conn) == before and change_log(conn) == []
    assert one_line_error(run_cli("dead-letters", "retry", "--all", CDC_DATABASE_URL=db_url)).startswith(
        f"cdc-dashboard: dead letter {no_key} would be set aside again"
    )
    assert letters(conn) == before and change_log(conn) == []

    # The documented way out: correct the stored change, then retry it.
    conn.execute(
        "update dashboard.dead_letters set change = jsonb_set(change, '{business_id}', to_jsonb(%s::text))"
        " where id = %s",
        (b, no_key),
    )
    assert run_cli("dead-letters", "retry", str(no_key), CDC_DATABASE_URL=db_url).returncode == 0
    assert [row[3] for row in change_log(conn)] == [b]


def test_unknown_ids_and_bad_input_are_one_line_and_change_nothing(db_url: str, conn: Conn) -> None:
    b = new_business(conn)
    first = set_aside(conn, pay(conn, b, 100)[1], "numeric field overflow")
    second = set_aside(conn, pay(conn, b, 200)[1], "numeric field overflow")
    before = letters(conn)
    unknown = second + 1000

    for command in ("retry", "discard"):
        error = one_line_error(
            run_cli("dead-letters", command, str(first), str(unknown), str(second), CDC_DATABASE_URL=db_url)
        )
        done = "retried" if command == "retry" else "discarded"
        assert error == (
            f"cdc-dashboard: no dead letter with id {unknown}: nothing {done} (`cdc-dashboard dead-letters list` "
            "shows them)"
        )
        assert letters(conn) == before and change_log(conn) == []

    bad_inputs = [
        (("retry",), "name the dead letter IDs to retry"),
        (("retry", "--all", str(first)), "name dead letter IDs or --all, not both"),
        (("retry", str(first), "x7"), "'x7' is not a dead letter id"),
        (("retry", "1.5"), "'1.5' is not a dead letter id"),
        (("retry", ""), "'' is not a dead letter id"),
        (("retry", "0"), "'0' is not a dead letter id (ids are positive integers)"),
        (("retry", str(2**63)), f"'{2**63}' is not a dead letter id (ids are positive integers)"),
        (("discard",), "name the dead letter IDs to discard"),
        (("discard", str(first), "seven"), "'seven' is not a dead letter id"),
    ]
    for args, message in bad_inputs:
        error = one_line_error(run_cli("dead-letters", *args, CDC_DATABASE_URL=db_url))
        assert error.startswith(f"cdc-dashboard: {message}"), (args, error)
        assert letters(conn) == before and change_log(conn) == []
    # Bad ids are reported before the database is needed.
    assert "not a dead letter id" in one_line_error(run_cli("dead-letters", "retry", "x"))
    assert "CDC_DATABASE_URL is not set" in one_line_error(run_cli("dead-letters", "list"))
    unreachable = one_line_error(
        run_cli("dead-letters", "list", CDC_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    )
    assert unreachable.startswith("cdc-dashboard: cannot connect to postgresql://nobody@127.0.0.1:1/none")


# -- discard ---------------------------------------------------------------------------------------------------


def test_discard_deletes_them_and_prints_each_whole(db_url: str, conn: Conn) -> None:
    b = new_business(conn)
    payment, change_id = pay(conn, b, 100)
    kept = set_aside(conn, pay(conn, b, 200)[1], "numeric field overflow")
    gone = set_aside(conn, change_id, "numeric field overflow", "22003")
    no_key = rejected_by_the_listener(conn)
    stored = {row[0]: row[1] for row in letters(conn)}

    result = run_cli("dead-letters", "discard", str(no_key), str(gone), str(gone), CDC_DATABASE_URL=db_url)
    assert result.returncode == 0, result.stderr
    assert [row[0] for row in letters(conn)] == [kept]
    assert change_log(conn) == []  # discarded, not retried
    lines = result.stdout.splitlines()
    assert lines[-1] == "discarded 2 dead letter(s)"
    assert lines[0].startswith(
        f"discarded dead letter {gone}: INSERT on public.payments, business {b}, row {payment} "
        "(numeric field overflow (SQLSTATE 22003)); change: "
    )
    assert lines[1].startswith(f"discarded dead letter {no_key}: INSERT on public.payments, business -, row ")
    for line, letter in zip(lines[:2], (gone, no_key), strict=True):
        assert json.loads(line.split("; change: ", 1)[1]) == stored[letter]  # the whole change, restorable


# -- through a running listener --------------------------------------------------------------------------------


async def test_after_the_fix_a_retried_payment_is_consumed_by_the_listener_and_the_figures_come_right(
    db_url: str,
) -> None:
    """A running listener sets aside a completed payment whose processing fails (the poison: a check on the
    facts table that rejects its amount, as test_listener_poison.py makes one); the payment is missing from the
    figures. Once the cause is fixed, `dead-letters retry` puts it back: the listener (woken by the retry, not by
    its poll) consumes it, an event names it with its toast, and the figures equal the ledger again."""
    from ..oracle import expected_figures

    poison = 666
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"alter table dashboard.payment_facts add constraint poison check (amount_minor <> {poison})")
        b = new_business(conn)
        async with running_listener(db_url, probe_interval=30.0):
            with conn.transaction():  # one batch: the poison sits among good changes
                counted, _ = pay(conn, b, 150000)
                lost, _ = pay(conn, b, poison)
                also_counted, _ = pay(conn, b, 250000)
            await wait_for(lambda: also_counted in payment_ids_in_events(db_url))
            assert counted in payment_ids_in_events(db_url)
            [(letter, change, reason, sqlstate)] = letters(conn)
            assert (change["row_id"], change["op"], sqlstate) == (lost, "INSERT", "23514")
            assert 'violates check constraint "poison"' in reason
            assert lost not in payment_ids_in_events(db_url)
            listed = run_cli("dead-letters", "list", "--json", CDC_DATABASE_URL=db_url)
            assert [(d["id"], d["row_id"], d["sqlstate"]) for d in json.loads(listed.stdout)] == [
                (letter, lost, "23514")
            ]

            oracle = await asyncpg.connect(db_url)
            try:
                stats = await reads.stats(oracle, uuid.UUID(b))
                assert stats is not None
                assert stats.figures["payments_count"] == 2  # the set-aside payment counts nowhere yet
                assert stats.figures["revenue"]["KES"]["total_minor"] == 400000
                assert stats.figures != await expected_figures(oracle, uuid.UUID(b))

                conn.execute("alter table dashboard.payment_facts drop constraint poison")  # the fix
                await wait_for(lambda: conn.execute(SLEEPING).fetchone() == (True,), timeout=5)
                last_event = event_rows(db_url)[-1]["id"]
                started = time.monotonic()
                result = await asyncio.to_thread(run_cli, "dead-letters", "retry", str(letter), CDC_DATABASE_URL=db_url)
                assert result.returncode == 0, result.stderr
                events = await wait_for(lambda: event_rows(db_url, after=last_event), timeout=5, interval=0.005)
                # Woken by the retry's NOTIFY: the listener's own poll is 30 s away.
                assert time.monotonic() - started < 5.0
                data = events[0]["payload"]
                data = data if isinstance(data, dict) else json.loads(data)
                assert data["changes"] == [{"table": "payments", "op": "INSERT", "id": lost}]
                assert [p["id"] for p in data["payments"]] == [lost]  # the toast the owner never got
                assert letters(conn) == [] and change_log(conn) == []

                async with oracle.transaction(isolation="repeatable_read", readonly=True):
                    stats = await reads.stats(oracle, uuid.UUID(b))
                    assert stats is not None
                    assert stats.figures == await expected_figures(oracle, uuid.UUID(b))
                assert stats.figures["payments_count"] == 3
                assert stats.figures["revenue"]["KES"]["total_minor"] == 400000 + poison
            finally:
                await oracle.close()


# -- /v1/status and /metrics -----------------------------------------------------------------------------------


async def test_status_lists_the_newest_dead_letters_and_metrics_count_them(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        b = new_business(conn)
        ids = [
            set_aside(conn, pay(conn, b, amount)[1], f"numeric field overflow {amount}", "22003")
            for amount in range(1, 26)
        ]
        no_key = rejected_by_the_listener(conn)
        ids.append(no_key)
        conn.execute(
            "update dashboard.dead_letters set created_at = now() - interval '2 hours' where id = %s", (ids[0],)
        )
    headers = {"Authorization": f"Bearer {token_for(admin=True)}"}

    async def status(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
        async with session.get(f"{base}/v1/status", headers=headers) as r:
            assert r.status == 200, await r.text()
            return dict(await r.json())

    async def gauge(session: aiohttp.ClientSession, base: str) -> float:
        async with session.get(f"{base}/metrics") as r:
            assert r.status == 200
            found = re.search(r"^cdc_dead_letters (\S+)$", await r.text(), re.M)
        assert found, "no cdc_dead_letters gauge"
        return float(found.group(1))

    async with run_gateway(db_url) as gw, aiohttp.ClientSession() as session:
        body = await status(session, gw.url)
        assert body["database"] == "ok" and body["listener_state"] is not None
        dead = body["dead_letters"]
        assert set(dead) == {"count", "oldest_at", "recent"}
        assert dead["count"] == 26
        assert datetime.now().astimezone() - datetime.fromisoformat(dead["oldest_at"]) > timedelta(hours=1)
        assert [d["id"] for d in dead["recent"]] == ids[::-1][:20]  # the newest 20, newest first
        for d in dead["recent"]:
            assert set(d) == {"id", "table", "op", "business_id", "row_id", "reason", "sqlstate", "created_at"}
        newest, second = dead["recent"][0], dead["recent"][1]
        assert newest["business_id"] is None and newest["sqlstate"] is None
        assert newest["reason"] == "INSERT on public.payments carries no business key"
        assert (second["table"], second["op"], second["business_id"]) == ("public.payments", "INSERT", b)
        assert (second["reason"], second["sqlstate"]) == ("numeric field overflow 25", "22003")
        assert await gauge(session, gw.url) == 26

        discard = await asyncio.to_thread(
            run_cli, "dead-letters", "discard", *(str(i) for i in ids), CDC_DATABASE_URL=db_url
        )
        assert discard.returncode == 0, discard.stderr
        assert (await status(session, gw.url))["dead_letters"] == {"count": 0, "oldest_at": None, "recent": []}
        assert await gauge(session, gw.url) == 0
