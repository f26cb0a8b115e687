"""Fixtures: a real PostgreSQL per session, a fresh database per test cloned from a migrated template."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cdc_dashboard.db import with_database

from .pg import admin_server, clone_database, drop_database, make_template

# Nothing a test runs may pick up the developer's own configuration.
for _name in [n for n in os.environ if n.startswith("CDC_") and n != "CDC_TEST_DATABASE_URL"]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def admin_url() -> Iterator[str]:
    with admin_server() as url:
        yield url


@pytest.fixture(scope="session")
def template_db(admin_url: str) -> Iterator[str]:
    name = make_template(admin_url)
    yield name
    drop_database(admin_url, name)


@pytest.fixture
def empty_db_url(admin_url: str) -> Iterator[str]:
    """A fresh database with nothing in it."""
    name = clone_database(admin_url, "template0")
    yield with_database(admin_url, name)
    drop_database(admin_url, name)


@pytest.fixture
def db_url(admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh database with the whole schema applied."""
    name = clone_database(admin_url, template_db)
    yield with_database(admin_url, name)
    drop_database(admin_url, name)
