"""`db apply`: a new database gets the schema files and the migrations as its baseline; applies everything once,
is a no-op the second time, refuses a changed applied migration."""

from __future__ import annotations

import psycopg
import pytest

from cdc_dashboard.errors import UserError
from cdc_dashboard.migrations import DEFAULT_TRACKED, apply, concept_files, schema_files, status


def test_apply_on_empty_database_then_noop(empty_db_url: str) -> None:
    first = apply(empty_db_url)
    assert first[0] == f"created the schema ({', '.join(p.name for p in concept_files())})"
    assert first[1].startswith(f"recorded {len(schema_files())} migrations as applied (baseline")
    assert "installed capture (triggers/install.sql)" in first
    assert {f"tracking {t}" for t in DEFAULT_TRACKED} <= set(first)
    assert apply(empty_db_url) == []
    applied, pending = status(empty_db_url)
    assert pending == []
    assert {m.version for m in applied} >= {p.name for p in schema_files()}


def test_changed_applied_migration_is_refused(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("update dashboard.schema_migrations set checksum = 'x' where version = '0001_base.sql'")
    with pytest.raises(UserError, match=r"sql/schema/migrations/0001_base.sql changed after it was applied"):
        apply(db_url)


def test_capture_reinstalled_after_dba_uninstall(db_url: str) -> None:
    from cdc_dashboard.sqlfiles import sql_dir

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute((sql_dir() / "triggers" / "uninstall.sql").read_text())
        assert conn.execute("select to_regclass('cdc.change_log')").fetchone() == (None,)
    done = apply(db_url)
    assert "installed capture (triggers/install.sql)" in done
    assert {f"tracking {t}" for t in DEFAULT_TRACKED} <= set(done)
    with psycopg.connect(db_url, autocommit=True) as conn:
        count = conn.execute(
            "select count(*) from pg_trigger where tgname = 'cdc_capture_v1' and not tgisinternal"
        ).fetchone()
    assert count == (len(DEFAULT_TRACKED),)


def test_status_lists_pending_on_empty_database(empty_db_url: str) -> None:
    applied, pending = status(empty_db_url)
    assert applied == []
    assert pending == [p.name for p in schema_files()]


def test_existing_database_gets_pending_migrations_only(empty_db_url: str) -> None:
    """Without the baseline a new database replays every migration, one transaction each; then nothing is left."""
    first = apply(empty_db_url, baseline=False)
    assert first[: len(schema_files())] == [f"applied {p.name}" for p in schema_files()]
    assert apply(empty_db_url) == []
    assert status(empty_db_url)[1] == []


def test_concept_files_and_migrations_are_apart() -> None:
    assert [p.parent.name for p in concept_files()] == ["schema"] * len(concept_files())
    assert all(p.parent.name == "migrations" for p in schema_files())
    assert schema_files()[0].name == "0001_base.sql"
