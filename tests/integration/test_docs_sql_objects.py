"""Every SQL object the docs name exists after `db apply`.

The docs (docs/*.md, README.md) name the product's objects schema-qualified: `dashboard.events`,
`cdc.change_log`, `dashboard.consume_changes_v2(...)`. When a migration drops or renames one, a doc that still
names it describes code that is gone; this test finds it. A name counts when it exists in the migrated database
as a table, view, sequence, index or function.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[2]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

# `schema.name` in the product's two schemas (`cdc_dashboard.x`, the Python package, does not match).
QUALIFIED = re.compile(r"\b(dashboard|cdc)\.([a-z_][a-z0-9_]*)")

# Strings that match the pattern but are not SQL objects. Keep it small: each entry says why.
NOT_OBJECTS = {
    "dashboard.js": "a file: the bundled page's script (src/cdc_dashboard/static/)",
    "dashboard.css": "a file: the bundled page's stylesheet",
    "dashboard.png": "a file: the screenshot in docs/",
    "cdc.capture_": "the pattern cdc.capture_<hash>_v1: one trigger function per tracked table, made by cdc.track",
}


def all_names() -> dict[str, list[str]]:
    """Each qualified name the docs use -> where (file:line), the allow-listed ones included."""
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
            for schema, name in QUALIFIED.findall(line):
                found.setdefault(f"{schema}.{name}", []).append(f"{doc.relative_to(ROOT)}:{number}")
    return found


def named_objects() -> dict[str, list[str]]:
    return {name: places for name, places in all_names().items() if name not in NOT_OBJECTS}


EXISTS = """
select to_regclass(%(name)s) is not null  -- table, view, sequence, index
    or exists (select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                where n.nspname = %(schema)s and p.proname = %(object)s)
"""


def missing_objects(conn: psycopg.Connection[Any], names: dict[str, list[str]]) -> dict[str, list[str]]:
    missing = {}
    for qualified, places in names.items():
        schema, _, obj = qualified.partition(".")
        row = conn.execute(EXISTS, {"name": qualified, "schema": schema, "object": obj}).fetchone()
        if not (row and row[0]):
            missing[qualified] = places
    return missing


def test_the_scan_finds_names_in_the_docs() -> None:
    names = named_objects()
    # A few the architecture cannot be described without: if these vanish the pattern broke, not the docs.
    assert {"cdc.change_log", "dashboard.events", "dashboard.listener_state"} <= names.keys(), names
    # The allow-list stays small: an entry no doc needs any more goes.
    assert NOT_OBJECTS.keys() <= all_names().keys(), NOT_OBJECTS.keys() - all_names().keys()


def test_every_sql_object_the_docs_name_exists_after_db_apply(db_url: str) -> None:
    names = named_objects()
    with psycopg.connect(db_url, autocommit=True) as conn:
        missing = missing_objects(conn, names)
    assert not missing, "docs name SQL objects that `db apply` does not create:\n" + "\n".join(
        f"  {name}: {', '.join(places)}" for name, places in sorted(missing.items())
    )


def test_a_name_that_does_not_exist_is_reported(db_url: str) -> None:
    """The check itself: a bogus name fails it, a real one of each kind passes."""
    names = {
        "dashboard.no_such_table_v9": ["x"],
        "cdc.no_such_function_v9": ["x"],
        "dashboard.events": ["x"],  # table
        "dashboard.revenue_hourly": ["x"],  # view
        "dashboard.event_id_seq": ["x"],  # sequence
        "dashboard.events_business_idx": ["x"],  # index
        "cdc.track": ["x"],  # function
    }
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert missing_objects(conn, names).keys() == {"dashboard.no_such_table_v9", "cdc.no_such_function_v9"}
