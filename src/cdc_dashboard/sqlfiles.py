"""Where the SQL lives, and the named queries of `sql/queries/*.sql`.

The SQL files are the product's source of truth for the database. In a checkout they sit in `sql/` at the
repository root; an installed wheel carries them as `cdc_dashboard/sql` (hatch force-include).

A query file holds named blocks, each introduced by a header line `-- name --`:

    -- fetch_stats --
    select ...
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

__all__ = ["queries", "sql_dir"]

_HEADER = re.compile(r"^-- ([a-z0-9_]+) --$", re.MULTILINE)


@functools.cache
def sql_dir() -> Path:
    """The directory holding schema/, triggers/ and queries/."""
    packaged = Path(__file__).parent / "sql"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "sql"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("cdc-dashboard's SQL files are missing from this installation")


@functools.cache
def queries(name: str) -> dict[str, str]:
    """The named queries of sql/queries/<name>.sql."""
    text = (sql_dir() / "queries" / f"{name}.sql").read_text()
    parts = _HEADER.split(text)
    # parts: [preamble, name1, body1, name2, body2, ...]
    return {parts[i]: parts[i + 1].strip() for i in range(1, len(parts), 2)}
