"""A database of the last release before 0010 upgrades with today's `db apply` (issue 15).

The fixture is the migrations themselves: a new database gets exactly 0001-0009 from sql/schema/migrations/,
recorded as the `db apply` of that release recorded them, with the capture installed (plus the cdc.wake_state
table its install.sql made) and the four tables tracked. The listener of that release (consume_changes_v1)
consumes part of a history of writes; the rest waits in cdc.change_log. Then `db apply` applies 0010-0013,
keeps every row, the listener's batch of today consumes what waited, and every figure equals DESIGN's
definition (the oracle of test_aggregates_exact).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from cdc_dashboard import migrations
from cdc_dashboard.migrations import apply

from . import test_aggregates_exact
from .test_aggregates_exact import BUSINESSES, CLIENTS, check_exact, consume, run_history

LAST_OLD = "0009_lighter_aggregate_sync.sql"
# sha256 of sql/triggers/install.sql in that release, as its `db apply` recorded it.
OLD_INSTALL_SHA256 = "9696166038d13dc7fb1d3d9bfb91ed38c874f2be4fa7358e60f470d10e8ecbd3"

# Writes a database at 0009 accepts (no refunds yet): payments of every status across midnight and the first of
# the month, corrections of status, currency, client, time and business, deletes, and bookings.
HISTORY: list[tuple[Any, ...]] = [
    ("pay", 0, 0, 150000, "KES", "completed", (0, -3), True, 2),
    ("pay", 0, 1, 90000, "KES", "completed", (0, 4), False, 0),
    ("pay", 1, 2, 2500, "USD", "completed", (1, -1), True, 5),
    ("pay", 1, None, 7000, "USD", "pending", (4, 0), True, 0),
    ("pay", 2, 3, 123456, "INR", "completed", (3, 10), True, 1),
    ("pay", 2, 0, 5000, "KES", "failed", (2, 0), False, 0),
    ("book", 0, "pending", "unpaid"),
    ("book", 1, "confirmed", "paid"),
    ("book", 2, "completed", "partially_paid"),
]
LATER: list[tuple[Any, ...]] = [
    ("status", 3, "completed"),
    ("currency", 1, "TZS"),
    ("client", 0, 2),
    ("time", 2, (2, 30)),
    ("move", 4, 0),
    ("delete", 5),
    ("status", 1, "refunded"),
    ("pay", 1, 1, 40000, "USD", "completed", (0, 0), True, 0),
    ("rebook", 0, "confirmed", "paid"),
    ("movebook", 1, 2),
    ("unbook", 2),
]


@pytest.fixture
def at_0009(empty_db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A database as the release with migrations 0001-0009 left it."""
    old = [p for p in migrations.schema_files() if p.name <= LAST_OLD]
    assert [p.name[:4] for p in old] == [f"{i:04d}" for i in range(1, 10)]
    with monkeypatch.context() as patched:
        patched.setattr(migrations, "schema_files", lambda: old)
        done = apply(empty_db_url, baseline=False)
    assert done[: len(old)] == [f"applied {p.name}" for p in old]
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        # That release's capture made this table too (today's install.sql drops it).
        conn.execute("create table cdc.wake_state (singleton boolean primary key default true check (singleton))")
        conn.execute(
            "update dashboard.schema_migrations set checksum = %s where version = 'triggers/install.sql'",
            (OLD_INSTALL_SHA256,),
        )
        for business_id, tz in BUSINESSES:
            conn.execute("insert into businesses (id, name, timezone) values (%s, %s, %s)", (business_id, "Salon", tz))
        for client_id in CLIENTS:
            conn.execute("insert into clients (id, name) values (%s, %s)", (client_id, "Client"))
    yield empty_db_url


def consume_as_0009(conn: psycopg.Connection[Any]) -> None:
    """The listener of that release: its batch, until the change log is empty."""
    while conn.execute("select consumed from dashboard.consume_changes_v1(1000, 'live', 0)").fetchone() != (0,):
        pass


def test_database_at_0009_upgrades_keeps_its_data_and_consumes_what_waited(
    at_0009: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = at_0009
    with psycopg.connect(url, autocommit=True) as conn, monkeypatch.context() as patched:
        # ("sync",): that release's listener consumes what was written so far; LATER waits in the change log.
        patched.setattr(test_aggregates_exact, "consume", consume_as_0009)
        run_history(conn, [*HISTORY, ("sync",), *LATER], consume_all=False)
        waiting = conn.execute("select count(*) from cdc.change_log").fetchone()
        assert waiting is not None and waiting[0] > 0
        before = conn.execute(
            "select (select count(*) from payments), (select count(*) from bookings),"
            " (select count(*) from dashboard.events), (select count(*) from dashboard.payment_facts)"
        ).fetchone()
        assert before is not None and before[2] > 0 and before[3] > 0  # that listener did consume a part

    done = apply(url)
    new = [p.name for p in migrations.schema_files() if p.name > LAST_OLD]
    assert done[: len(new)] == [f"applied {name}" for name in new]
    assert "installed capture (triggers/install.sql)" in done  # its checksum changed since that release
    assert apply(url) == []

    with psycopg.connect(url, autocommit=True) as conn:
        after = conn.execute(
            "select (select count(*) from payments), (select count(*) from bookings),"
            " (select count(*) from dashboard.events), (select count(*) from dashboard.payment_facts)"
        ).fetchone()
        assert after == before, "the upgrade lost or made rows"
        assert conn.execute("select count(*) from cdc.change_log").fetchone() == waiting
        assert conn.execute("select to_regclass('cdc.wake_state')").fetchone() == (None,)
        assert conn.execute(
            "select to_regprocedure('dashboard.consume_changes_v1(integer,text,bigint)')"
        ).fetchone() == (None,)
        consume(conn)  # today's listener batch (consume_changes_v2)
        assert conn.execute("select count(*) from cdc.change_log").fetchone() == (0,)
        businesses = conn.execute(
            "select count(distinct business_id) from dashboard.events where id > %s", (before[2],)
        ).fetchone()
        assert businesses == (len(BUSINESSES),)
    asyncio.run(check_exact(url))


def test_upgrade_keeps_ids_of_rows(at_0009: str) -> None:
    """The same rows, by id, before and after (not only the same counts)."""
    with psycopg.connect(at_0009, autocommit=True) as conn:
        run_history(conn, HISTORY, consume_all=False)
        ids: list[uuid.UUID] = [r[0] for r in conn.execute("select id from payments order by id").fetchall()]
    apply(at_0009)
    with psycopg.connect(at_0009, autocommit=True) as conn:
        assert [r[0] for r in conn.execute("select id from payments order by id").fetchall()] == ids
        assert conn.execute("select count(*) from payments where refunded_minor <> 0").fetchone() == (0,)
