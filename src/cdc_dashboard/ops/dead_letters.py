"""`cdc-dashboard dead-letters`: the changes the listener set aside, and what an operator does with them.

The listener puts a change it cannot turn into an event in `dashboard.dead_letters` with the reason (and, for a
SQL error, its SQLSTATE), and goes on with everything else (DESIGN, guarantee 6). Here an operator lists them,
retries them once the cause is fixed, or discards them:

- retry: in one transaction, each change goes back into `cdc.change_log` (a fresh id, captured now), its dead
  letter is deleted, and the listener is woken as a capture trigger wakes it. The listener then consumes it as
  any change: figures are recomputed from the rows as they are now, so a retry after the fix brings them back
  to exact. A change the listener would set aside again at once (no business key, an unknown operation) is
  refused: fix the stored change (`update dashboard.dead_letters set change = ...`) or discard it.
- discard: deletes them, printing each one whole (the printed change is the only record left of it).

Both are all-or-nothing: one unknown id (or one refused change) and nothing changes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row

from ..db import connect_sync
from ..errors import UserError
from ..sqlfiles import queries
from .durations import duration_text

__all__ = ["DeadLetter", "discard", "list_dead_letters", "parse_ids", "retry", "run_discard", "run_list", "run_retry"]

MAX_ID = 2**63 - 1
LIST_COMMAND = "cdc-dashboard dead-letters list"


@dataclass(frozen=True)
class DeadLetter:
    id: int
    created_at: datetime
    table: str | None
    op: str | None
    business_id: str | None
    row_id: str | None
    reason: str
    sqlstate: str | None
    change: Any
    age_seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        """One element of `dead-letters list --json` (docs/OPERATIONS.md, "Dead letters")."""
        return {
            "id": self.id,
            "created_at": self.created_at.isoformat(),
            "age_seconds": round(self.age_seconds, 3),
            "table": self.table,
            "op": self.op,
            "business_id": self.business_id,
            "row_id": self.row_id,
            "reason": self.reason,
            "sqlstate": self.sqlstate,
            "change": self.change,
        }

    def describe(self) -> str:
        """`INSERT on public.payments, business B, row R`, for the lines retry and discard print."""
        return f"{self.op or '?'} on {self.table or '?'}, business {self.business_id or '-'}, row {self.row_id or '-'}"


@dataclass(frozen=True)
class Retried:
    letter: DeadLetter
    change_id: int


def parse_ids(values: Sequence[str]) -> list[int]:
    """Dead-letter ids from the command line, in order, each once; a UserError names the first bad one."""
    ids: list[int] = []
    for value in values:
        try:
            parsed = int(value.strip())
        except ValueError:
            raise UserError(f"{value!r} is not a dead letter id (the integers `{LIST_COMMAND}` shows)") from None
        if not 1 <= parsed <= MAX_ID:
            raise UserError(f"{value!r} is not a dead letter id (ids are positive integers)")
        if parsed not in ids:
            ids.append(parsed)
    return ids


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _sql_failed(action: str, exc: psycopg.Error) -> UserError:
    if isinstance(exc, pg_errors.UndefinedTable | pg_errors.UndefinedColumn | pg_errors.UndefinedFunction):
        return UserError(
            f"{action} failed: the database's schema is older than this cdc-dashboard: run cdc-dashboard db apply"
        )
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"{action} failed, nothing changed: {first}")


def _letter(row: dict[str, Any]) -> DeadLetter:
    return DeadLetter(
        id=row["id"],
        created_at=row["created_at"],
        table=row["table_name"],
        op=row["op"],
        business_id=row["business_id"],
        row_id=row["row_id"],
        reason=row["reason"],
        sqlstate=row["sqlstate"],
        change=row["change"],
        age_seconds=row.get("age_seconds") or 0.0,
    )


def list_dead_letters(url: str) -> list[DeadLetter]:
    """Every dead letter, oldest first."""
    with connect_sync(url) as conn, conn.cursor(row_factory=dict_row) as cur:
        try:
            return [_letter(row) for row in cur.execute(queries("dead_letters")["list"]).fetchall()]
        except psycopg.Error as exc:
            raise _sql_failed("reading dashboard.dead_letters", exc) from None


def _locked(cur: psycopg.Cursor[dict[str, Any]], ids: list[int] | None, action: str) -> list[dict[str, Any]]:
    """Lock the dead letters named (all when ids is None); a UserError when any id is unknown."""
    rows = cur.execute(queries("dead_letters")["lock"], {"all": ids is None, "ids": ids or []}).fetchall()
    if ids is not None:
        found = {row["id"] for row in rows}
        unknown = [str(i) for i in ids if i not in found]
        if unknown:
            raise UserError(
                f"no dead letter with id {', '.join(unknown)}: nothing {action} (`{LIST_COMMAND}` shows them)"
            )
    return rows


def retry(url: str, ids: list[int] | None) -> list[Retried]:
    """Put these dead letters (every one when ids is None) back in the change log, in one transaction."""
    q = queries("dead_letters")
    with connect_sync(url, autocommit=False) as conn, conn.cursor(row_factory=dict_row) as cur:
        try:
            with conn.transaction():
                rows = _locked(cur, ids, "retried")
                refused = [row for row in rows if row["problem"] is not None]
                if refused:
                    first = refused[0]
                    more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
                    raise UserError(
                        f"dead letter {first['id']} would be set aside again ({first['problem']}){more}: "
                        "nothing retried; correct its change in dashboard.dead_letters or discard it"
                    )
                if not rows:
                    return []
                letters = {row["id"]: _letter(row) for row in rows}
                pairs = cur.execute(q["retry"], {"ids": list(letters)}).fetchall()
                if len(pairs) != len(letters) or any(p["inserted"] != len(letters) for p in pairs):
                    raise UserError("dead letters changed during the retry: nothing retried, run it again")
                cur.execute(q["wake"])
                return [Retried(letters[p["dead_letter_id"]], p["change_id"]) for p in pairs]
        except psycopg.Error as exc:
            raise _sql_failed("retry", exc) from None


def discard(url: str, ids: list[int]) -> list[DeadLetter]:
    """Delete these dead letters, in one transaction; returns them as they were."""
    q = queries("dead_letters")
    with connect_sync(url, autocommit=False) as conn, conn.cursor(row_factory=dict_row) as cur:
        try:
            with conn.transaction():
                letters = [_letter(row) for row in _locked(cur, ids, "discarded")]
                deleted = cur.execute(q["discard"], {"ids": [d.id for d in letters]}).fetchall()
                if len(deleted) != len(letters):
                    raise UserError("dead letters changed during the discard: nothing discarded, run it again")
                return letters
        except psycopg.Error as exc:
            raise _sql_failed("discard", exc) from None


# -- the commands ----------------------------------------------------------------------------------------------


def _reason(letter: DeadLetter) -> str:
    reason = _one_line(letter.reason)
    return f"{reason} (SQLSTATE {letter.sqlstate})" if letter.sqlstate else reason


def table_lines(letters: list[DeadLetter]) -> list[str]:
    """The human table of `dead-letters list`."""
    if not letters:
        return ["no dead letters waiting"]
    header = ("id", "age", "table", "op", "business", "row id", "reason")
    rows = [
        (
            str(d.id),
            duration_text(d.age_seconds, decimals=0),
            d.table or "-",
            d.op or "-",
            d.business_id or "-",
            d.row_id or "-",
            _reason(d),
        )
        for d in letters
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].rjust(widths[0])
        middle = [cell.ljust(width) for cell, width in zip(cells[1:-1], widths[1:], strict=True)]
        return "  ".join([first, *middle, cells[-1]])

    return [
        line(header),
        *(line(r) for r in rows),
        "",
        f"{len(letters)} dead letter(s). Fix the cause, then: cdc-dashboard dead-letters retry ID... (or --all), "
        "or cdc-dashboard dead-letters discard ID...",
    ]


def run_list(url: str, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    letters = list_dead_letters(url)
    if as_json:
        out.write(json.dumps([d.as_json() for d in letters], indent=2) + "\n")
    else:
        out.write("\n".join(table_lines(letters)) + "\n")
    return 0


def run_retry(url: str, ids: list[int] | None, *, out: TextIO = sys.stdout) -> int:
    retried = retry(url, ids)
    if not retried:
        out.write("no dead letters waiting: nothing to retry\n")
        return 0
    for r in retried:
        d = r.letter
        out.write(
            f"retried dead letter {d.id} as change {r.change_id}: {d.describe()} "
            f"(set aside {d.created_at:%Y-%m-%d %H:%M:%S%z}: {_reason(d)})\n"
        )
    out.write(
        f"retried {len(retried)} dead letter(s): the listener consumes them now; one that fails again is set aside "
        f"again under a new id (`{LIST_COMMAND}`)\n"
    )
    return 0


def run_discard(url: str, ids: list[int], *, out: TextIO = sys.stdout) -> int:
    letters = discard(url, ids)
    for d in letters:
        change = json.dumps(d.change, separators=(",", ":"), sort_keys=True)
        out.write(f"discarded dead letter {d.id}: {d.describe()} ({_reason(d)}); change: {change}\n")
    out.write(f"discarded {len(letters)} dead letter(s)\n")
    return 0
