"""The capture SQL as a DBA uses it: `psql -f` install/uninstall on their own database, cdc.track/untrack."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import psycopg
import pytest

from cdc_dashboard.sqlfiles import sql_dir

pytestmark = pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")


def psql_file(url: str, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-v", "ON_ERROR_STOP=1", "-q", "-f", str(sql_dir() / "triggers" / name), url],
        capture_output=True,
        text=True,
        timeout=60,
    )


def triggers(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute("select tgname from pg_trigger where tgrelid = 'shop_sales'::regclass order by 1")
    return [r[0] for r in rows.fetchall()]


def test_install_track_capture_untrack_uninstall_with_psql_alone(empty_db_url: str) -> None:
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute("create table shop_sales (sale_id bigint primary key, shop text, total bigint)")
        for _ in range(2):  # idempotent
            result = psql_file(empty_db_url, "install.sql")
            assert result.returncode == 0, result.stderr
        conn.execute("select cdc.track('shop_sales', business_column => 'shop', id_column => 'sale_id')")
        assert triggers(conn) == ["cdc_capture_truncate_v1", "cdc_capture_v1"]
        conn.execute("insert into shop_sales values (1, 'nairobi-1', 500), (2, 'lagos-2', 700)")
        conn.execute("update shop_sales set shop = 'lagos-2' where sale_id = 1")
        conn.execute("delete from shop_sales where sale_id = 2")
        rows = conn.execute("select table_name, op, business_id, row_id from cdc.change_log order by id").fetchall()
        assert rows == [
            ("public.shop_sales", "INSERT", "nairobi-1", "1"),
            ("public.shop_sales", "INSERT", "lagos-2", "2"),
            ("public.shop_sales", "UPDATE", "lagos-2", "1"),
            ("public.shop_sales", "UPDATE", "nairobi-1", "1"),  # the business the row left is informed too
            ("public.shop_sales", "DELETE", "lagos-2", "2"),
        ]
        conn.execute("select cdc.untrack('shop_sales')")
        assert triggers(conn) == []
        conn.execute("select cdc.track('shop_sales', business_column => 'shop', id_column => 'sale_id')")
        for _ in range(2):
            result = psql_file(empty_db_url, "uninstall.sql")
            assert result.returncode == 0, result.stderr
        assert triggers(conn) == []
        assert conn.execute("select to_regnamespace('cdc')").fetchone() == (None,)
        conn.execute("insert into shop_sales values (3, 'x', 1)")  # the application keeps working


def test_tracking_a_table_without_the_column_says_so(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("create table notes (id int primary key, body text)")
        with pytest.raises(psycopg.errors.UndefinedColumn, match=r'public.notes has no column "business_id"'):
            conn.execute("select cdc.track('notes')")


def test_payload_stays_small_for_wide_rows(db_url: str) -> None:
    """Keys only, never whole rows: a huge row still makes a tiny change record."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        business = conn.execute("insert into businesses (name) values ('Wide') returning id").fetchone()
        assert business is not None
        conn.execute(
            "insert into payment_transactions (business_id, provider, amount_minor, currency, raw)"
            " values (%s, 'paystack', 1, 'KES', jsonb_build_object('blob', repeat('x', 100000)))",
            (business[0],),
        )
        size = conn.execute(
            "select max(pg_column_size(c.*)) from cdc.change_log c where table_name = 'public.payment_transactions'"
        ).fetchone()
        assert size is not None and size[0] < 500
