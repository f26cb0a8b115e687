"""A scratch database with the schema applied, dropped afterwards: what each benchmark runs against.

The server is CDC_BENCH_ADMIN_URL (default: this machine's PostgreSQL, postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from cdc_dashboard.db import with_database
from cdc_dashboard.migrations import apply

__all__ = ["scratch_database"]


@contextmanager
def scratch_database() -> Iterator[str]:
    """Yields the URL of a fresh database that received `db apply`."""
    admin = os.environ.get("CDC_BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"cdc_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    try:
        url = with_database(admin, name)
        apply(url)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')
