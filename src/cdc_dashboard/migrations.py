"""`db apply` and `db status`: the schema, its migrations, the capture SQL, and the default tracking.

- `sql/schema/*.sql` is the current schema, one file per concept. A new database (no migration recorded) gets
  those files, in name order, in one transaction, and every migration of `sql/schema/migrations/` is recorded as
  applied with its checksum: the baseline.
- `sql/schema/migrations/NNNN_*.sql` bring an existing database there: each pending one is applied once, in
  order, in its own transaction, and recorded with a sha256 checksum. A recorded file whose content changed is
  refused: an applied migration is history (sql/schema/migrations/checksums.sha256 guards that in CI).
- `sql/triggers/install.sql` is idempotent (a DBA may run it with psql too); it is re-run whenever it is
  missing from the database or its checksum differs from the one recorded.
- The four payment tables are tracked when they are not already.

Concurrent `db apply` runs (several replicas deploying at once) serialise on an advisory lock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from .db import connect_sync
from .db.locks import LockKey
from .errors import UserError
from .sqlfiles import queries, sql_dir

__all__ = ["DEFAULT_TRACKED", "AppliedMigration", "apply", "concept_files", "schema_files", "status"]

CAPTURE_VERSION = "triggers/install.sql"

# table -> (business column, watched columns): what `db apply` tracks. Payment status is watched so the
# listener can tell when a payment became completed (toasts) without reading the row back.
DEFAULT_TRACKED: dict[str, tuple[str, list[str]]] = {
    "public.payments": ("business_id", ["status"]),
    "public.payment_transactions": ("business_id", []),
    "public.client_business_transactions": ("business_id", []),
    "public.bookings": ("business_id", ["status", "payment_status"]),
}


@dataclass(frozen=True)
class AppliedMigration:
    version: str
    checksum: str
    applied_at: datetime


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def schema_files() -> list[Path]:
    """The migrations, in the order they apply."""
    return sorted((sql_dir() / "schema" / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql"))


def concept_files() -> list[Path]:
    """The current schema, one file per concept, in the order a new database gets them."""
    return sorted((sql_dir() / "schema").glob("*.sql"))


def _applied(conn: psycopg.Connection[Any]) -> dict[str, AppliedMigration]:
    rows = conn.execute(queries("migrations")["applied"]).fetchall()
    return {r[0]: AppliedMigration(r[0], r[1], r[2]) for r in rows}


def _run_files(conn: psycopg.Connection[Any], paths: list[Path], record: dict[str, Path], label: str) -> None:
    """Run `paths` and record the files of `record` (by version) as applied, in one transaction."""
    q = queries("migrations")
    try:
        with conn.transaction():
            for path in paths:
                conn.execute(path.read_text())
            for version, path in record.items():
                conn.execute(q["record"], (version, _checksum(path)))
    except psycopg.Error as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{label} failed and was rolled back: {first_line}") from None


def apply(url: str, *, baseline: bool = True) -> list[str]:
    """Bring the database up to date; return what was done (empty when it already was).

    baseline=False builds a new database by replaying every migration instead of from the current schema
    files (the catalog test and benchmarks of earlier versions do).
    """
    q = queries("migrations")
    done: list[str] = []
    with connect_sync(url) as conn:
        conn.execute(q["lock"], (LockKey.DB_APPLY,))
        try:
            conn.execute(q["create_migrations_table"])
            applied = _applied(conn)
            migrations = schema_files()
            if baseline and not any(v != CAPTURE_VERSION for v in applied):
                concepts = concept_files()
                _run_files(conn, concepts, {p.name: p for p in migrations}, "the schema (sql/schema/*.sql)")
                done.append(f"created the schema ({', '.join(p.name for p in concepts)})")
                done.append(
                    f"recorded {len(migrations)} migrations as applied (baseline, newest {migrations[-1].name})"
                )
                applied = _applied(conn)
            for path in migrations:
                known = applied.get(path.name)
                if known is None:
                    _run_files(conn, [path], {path.name: path}, path.name)
                    done.append(f"applied {path.name}")
                elif known.checksum != _checksum(path):
                    raise UserError(
                        f"sql/schema/migrations/{path.name} changed after it was applied (checksum differs); "
                        "applied migrations are history: restore the file and add a new migration instead"
                    )
            install = sql_dir() / "triggers" / "install.sql"
            installed = conn.execute(q["capture_installed"]).fetchone()
            recorded = applied.get(CAPTURE_VERSION)
            if not (installed and installed[0]) or recorded is None or recorded.checksum != _checksum(install):
                _run_files(conn, [install], {CAPTURE_VERSION: install}, CAPTURE_VERSION)
                done.append("installed capture (triggers/install.sql)")
            for table, (business_column, watched) in DEFAULT_TRACKED.items():
                tracked = conn.execute(q["is_tracked"], (table, table)).fetchone()
                if not (tracked and tracked[0]):
                    conn.execute(q["track"], (table, business_column, watched))
                    done.append(f"tracking {table}")
        finally:
            conn.execute(q["unlock"], (LockKey.DB_APPLY,))
    return done


def status(url: str) -> tuple[list[AppliedMigration], list[str]]:
    """Applied migrations, and the migrations of sql/schema/migrations/ not applied yet."""
    with connect_sync(url) as conn:
        exists = conn.execute(queries("migrations")["migrations_table_exists"]).fetchone()
        applied = _applied(conn) if exists and exists[0] else {}
    pending = [p.name for p in schema_files() if p.name not in applied]
    return sorted(applied.values(), key=lambda m: m.version), pending
