"""The schema files and the migrations describe the same database (issue 15).

A new database gets sql/schema/*.sql (`db apply`'s baseline); an existing one reaches the current version through
sql/schema/migrations/. Both must end with the same catalog: the same tables and columns (in order, with types,
defaults, nullability), constraints, indexes, views, functions (bodies, settings, signatures, volatility),
triggers, sequences, comments and privileges, in the product's schemas.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from cdc_dashboard.db import with_database
from cdc_dashboard.migrations import apply

from ..pg import clone_database, drop_database

SCHEMAS = ("dashboard", "cdc", "public")

# Each query returns (kind, object name, definition) rows; the catalog is their set.
CATALOG: dict[str, str] = {
    "schema": """
        select nspname, 'acl=' || coalesce(nspacl::text, '') || ' comment='
                        || coalesce(obj_description(oid, 'pg_namespace'), '')
          from pg_namespace where nspname = any(%(schemas)s)
    """,
    "relation": """
        select n.nspname || '.' || c.relname,
               c.relkind::text || ' persistence=' || c.relpersistence::text || ' acl=' || coalesce(c.relacl::text, '')
               || ' comment=' || coalesce(obj_description(c.oid, 'pg_class'), '')
               || ' options=' || coalesce(c.reloptions::text, '')
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = any(%(schemas)s) and c.relkind in ('r', 'p', 'v', 'm', 'S', 'f')
    """,
    "column": """
        select n.nspname || '.' || c.relname || ' #' || row_number() over (partition by c.oid order by a.attnum),
               a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
               || case when a.attnotnull then ' not null' else '' end
               || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
               || case when a.attidentity <> '' then ' identity ' || a.attidentity::text else '' end
               || case when a.attgenerated <> '' then ' generated' else '' end
               || coalesce(' collate ' || nullif(a.attcollation, 0)::regcollation::text, '')
               || coalesce(' comment ' || col_description(c.oid, a.attnum), '')
          from pg_attribute a
          join pg_class c on c.oid = a.attrelid
          join pg_namespace n on n.oid = c.relnamespace
          left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
         where n.nspname = any(%(schemas)s) and c.relkind in ('r', 'p', 'v', 'm', 'f')
           and a.attnum > 0 and not a.attisdropped
    """,
    "constraint": """
        select n.nspname || '.' || c.relname || ' ' || k.conname,
               pg_get_constraintdef(k.oid) || ' deferrable=' || k.condeferrable::text
          from pg_constraint k
          join pg_class c on c.oid = k.conrelid
          join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = any(%(schemas)s)
    """,
    "index": """
        select schemaname || '.' || indexname, indexdef from pg_indexes where schemaname = any(%(schemas)s)
    """,
    "view": """
        select schemaname || '.' || viewname, pg_get_viewdef((schemaname || '.' || viewname)::regclass)
          from pg_views where schemaname = any(%(schemas)s)
    """,
    "function": """
        select n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
               'kind=' || p.prokind::text || ' returns ' || coalesce(pg_get_function_result(p.oid), '')
               || ' language=' || l.lanname || ' volatility=' || p.provolatile::text
               || ' parallel=' || p.proparallel::text || ' strict=' || p.proisstrict::text
               || ' secdef=' || p.prosecdef::text || ' leakproof=' || p.proleakproof::text
               || ' cost=' || p.procost::text || ' rows=' || p.prorows::text
               || ' args=' || pg_get_function_arguments(p.oid)
               || ' config=' || coalesce(p.proconfig::text, '') || ' acl=' || coalesce(p.proacl::text, '')
               || ' comment=' || coalesce(obj_description(p.oid, 'pg_proc'), '')
               || E'\nbody:\n' || p.prosrc
          from pg_proc p
          join pg_namespace n on n.oid = p.pronamespace
          join pg_language l on l.oid = p.prolang
         where n.nspname = any(%(schemas)s)
    """,
    "trigger": """
        select n.nspname || '.' || c.relname || ' ' || t.tgname, pg_get_triggerdef(t.oid)
          from pg_trigger t
          join pg_class c on c.oid = t.tgrelid
          join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = any(%(schemas)s) and not t.tgisinternal
    """,
    "sequence": """
        select schemaname || '.' || sequencename,
               data_type::text || ' start=' || start_value || ' min=' || min_value || ' max=' || max_value
               || ' increment=' || increment_by || ' cycle=' || cycle || ' cache=' || cache_size
          from pg_sequences where schemaname = any(%(schemas)s)
    """,
}


def catalog(url: str) -> dict[str, dict[str, str]]:
    with psycopg.connect(url, autocommit=True) as conn:
        out: dict[str, dict[str, str]] = {}
        for kind, query in CATALOG.items():
            rows = conn.execute(query, {"schemas": list(SCHEMAS)}).fetchall()
            entries: dict[str, str] = {}
            for name, definition in rows:
                assert name not in entries, f"{kind} {name} twice"
                entries[name] = definition
            out[kind] = entries
        return out


def differences(left: dict[str, dict[str, str]], right: dict[str, dict[str, str]]) -> list[str]:
    found: list[str] = []
    for kind in CATALOG:
        a, b = left[kind], right[kind]
        for name in sorted(a.keys() | b.keys()):
            if a.get(name) != b.get(name):
                diff = difflib.unified_diff(
                    b.get(name, "(missing)").splitlines(),
                    a.get(name, "(missing)").splitlines(),
                    "migrations",
                    "schema files",
                    lineterm="",
                )
                found.append(f"{kind} {name}:\n" + "\n".join(diff))
    return found


@pytest.fixture
def second_empty_db_url(admin_url: str) -> Iterator[str]:
    name = clone_database(admin_url, "template0")
    yield with_database(admin_url, name)
    drop_database(admin_url, name)


def test_schema_files_and_migrations_build_the_same_catalog(empty_db_url: str, second_empty_db_url: str) -> None:
    from_files = apply(empty_db_url)  # a new database: sql/schema/*.sql, migrations recorded as the baseline
    from_migrations = apply(second_empty_db_url, baseline=False)  # every migration in order, then the capture
    assert from_files[0].startswith("created the schema") and from_migrations[0] == "applied 0001_base.sql"
    left, right = catalog(empty_db_url), catalog(second_empty_db_url)
    assert sum(len(v) for v in left.values()) > 100  # (the queries see the schema at all)
    found = differences(left, right)
    assert not found, "the schema files and the migrations disagree:\n" + "\n".join(found)
    # And both recorded the same migrations.
    recorded: list[Any] = []
    for url in (empty_db_url, second_empty_db_url):
        with psycopg.connect(url) as conn:
            recorded.append(
                conn.execute("select version, checksum from dashboard.schema_migrations order by 1").fetchall()
            )
    assert recorded[0] == recorded[1]
