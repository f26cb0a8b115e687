"""Migrations are immutable: sql/schema/migrations/checksums.sha256 (`sha256sum -c` format) lists every one.

A database that applied a migration recorded its checksum, and `db apply` refuses to run on once the file
differs; this fails first, in CI, on the change that would cause it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cdc_dashboard.migrations import schema_files
from cdc_dashboard.sqlfiles import sql_dir

HISTORY = (
    "migrations are history: restore the file and add a new migration (sql/schema/migrations/NNNN_*.sql, "
    "with the change also made in the schema files of sql/schema/), then add its line to checksums.sha256 "
    "with `sha256sum NNNN_*.sql >> checksums.sha256`"
)


def manifest() -> dict[str, str]:
    path = sql_dir() / "schema" / "migrations" / "checksums.sha256"
    entries: dict[str, str] = {}
    for line in path.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        entries[name.lstrip("*")] = digest
    return entries


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_migration_matches_the_manifest() -> None:
    listed = manifest()
    changed = [p.name for p in schema_files() if p.name in listed and listed[p.name] != digest(p)]
    assert not changed, f"{', '.join(changed)} changed after landing; {HISTORY}"
    missing = [p.name for p in schema_files() if p.name not in listed]
    assert not missing, f"{', '.join(missing)} missing from sql/schema/migrations/checksums.sha256; {HISTORY}"
    gone = sorted(set(listed) - {p.name for p in schema_files()})
    assert not gone, f"{', '.join(gone)} listed in checksums.sha256 but removed; {HISTORY}"
