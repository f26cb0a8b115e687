"""Every advisory-lock key of the product's range written in sql/ or src/ is one the registry names."""

from __future__ import annotations

import re
from pathlib import Path

from cdc_dashboard.db.locks import LockKey

ROOT = Path(__file__).resolve().parents[2]
KEY = re.compile(r"\b42420000\d\d\b")


def test_every_lock_key_in_sql_and_src_is_in_the_registry() -> None:
    found: dict[int, list[str]] = {}
    for folder in ("sql", "src"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in {".sql", ".py"} or path.name == "locks.py":
                continue
            for literal in KEY.findall(path.read_text()):
                found.setdefault(int(literal), []).append(str(path.relative_to(ROOT)))
    unknown = {key: where for key, where in found.items() if key not in set(LockKey)}
    assert not unknown, f"advisory-lock keys missing from cdc_dashboard/db/locks.py: {unknown}"
    # The migrations already installed take these; the registry must go on naming them.
    assert {LockKey.EVENTS_APPEND, LockKey.AGGREGATES} <= found.keys()
