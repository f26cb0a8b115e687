"""The command line as a user runs it: a subprocess, its exit code and its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

from cdc_dashboard.sqlfiles import sql_dir

CLI = [sys.executable, "-m", "cdc_dashboard.cli"]


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    return subprocess.run([*CLI, *args], env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_db_apply_twice_is_a_noop(empty_db_url: str) -> None:
    first = run_cli("db", "apply", CDC_DATABASE_URL=empty_db_url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("created the schema (10_base_tables.sql"), first.stdout
    # A new database gets the schema files, and every migration is recorded as already applied (the baseline).
    migrations = len(list((sql_dir() / "schema" / "migrations").glob("[0-9]*.sql")))
    assert f"recorded {migrations} migrations as applied" in first.stdout, first.stdout
    second = run_cli("db", "apply", CDC_DATABASE_URL=empty_db_url)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "database is up to date"
    status = run_cli("db", "status", CDC_DATABASE_URL=empty_db_url)
    assert status.returncode == 0
    assert "applied  0001_base.sql" in status.stdout


def test_unreachable_database_is_one_line(tmp_path: object) -> None:
    result = run_cli("db", "apply", CDC_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cdc-dashboard: cannot connect to postgresql://nobody@127.0.0.1:1/none")
    assert "Traceback" not in result.stderr


def test_bad_config_is_one_line() -> None:
    result = run_cli("db", "apply", CDC_HTTP_PORT="nope")
    assert result.returncode == 2
    assert result.stderr.startswith("cdc-dashboard: CDC_HTTP_PORT:")
    assert len(result.stderr.strip().splitlines()) == 1


def test_db_apply_without_url_says_what_to_set() -> None:
    result = run_cli("db", "apply")
    assert result.returncode == 2
    assert "CDC_DATABASE_URL is not set" in result.stderr


def test_status_exit_1_when_pending(empty_db_url: str) -> None:
    result = run_cli("db", "status", CDC_DATABASE_URL=empty_db_url)
    assert result.returncode == 1
    assert "pending  0001_base.sql" in result.stdout


def test_listen_on_a_database_not_brought_up_to_date_says_db_apply(db_url: str) -> None:
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("drop sequence cdc.sleeping_until_v1")  # as if install.sql were an older version
    result = run_cli("listen", CDC_DATABASE_URL=db_url)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "cdc-dashboard: the database's schema is older than this listener: run `cdc-dashboard db apply`"
    )
    assert "Traceback" not in result.stderr


def test_serve_with_listener_on_a_database_not_brought_up_to_date_says_db_apply(db_url: str) -> None:
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("drop sequence cdc.sleeping_until_v1")
    result = run_cli("serve", "--with-listener", CDC_DATABASE_URL=db_url, CDC_SECRET="s" * 40, CDC_HTTP_PORT="0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("run `cdc-dashboard db apply`")
    assert "Traceback" not in result.stderr
