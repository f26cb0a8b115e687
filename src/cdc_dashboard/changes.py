"""Turning a batch of captured changes into per-business invalidation events (pure: no I/O).

The listener consumes a batch from cdc.change_log, plans it here, looks up what the plan asks for (payment
details for toasts), and appends the events - all in one transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .events import ChangeRef, ToastPayment, invalidate_payload, short_table_name

__all__ = ["BatchPlan", "Change", "plan_batch"]

_OPS = {"INSERT", "UPDATE", "DELETE", "TRUNCATE"}
MAX_BUSINESS_KEY = 200


@dataclass(frozen=True)
class Change:
    """One row of cdc.change_log."""

    id: int
    table_name: str
    op: str
    business_id: str | None
    row_id: str | None
    old_values: dict[str, Any] | None
    new_values: dict[str, Any] | None
    captured_at: datetime

    @classmethod
    def from_record(cls, record: Any) -> Change:
        return cls(
            id=record["id"],
            table_name=record["table_name"],
            op=record["op"],
            business_id=record["business_id"],
            row_id=record["row_id"],
            old_values=_json(record["old_values"]),
            new_values=_json(record["new_values"]),
            captured_at=record["captured_at"],
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "table": self.table_name,
            "op": self.op,
            "business_id": self.business_id,
            "row_id": self.row_id,
            "old": self.old_values,
            "new": self.new_values,
            "captured_at": self.captured_at.isoformat(),
        }

    def became_completed_payment(self) -> bool:
        """A payment that is completed now and was not before: the owner gets a toast."""
        if short_table_name(self.table_name) != "payments" or self.row_id is None:
            return False
        new_status = (self.new_values or {}).get("status")
        old_status = (self.old_values or {}).get("status")
        return new_status == "completed" and (self.op == "INSERT" or old_status != "completed")


@dataclass
class BusinessChanges:
    business_id: str
    changes: list[ChangeRef] = field(default_factory=list)
    toast_ids: list[str] = field(default_factory=list)
    committed_at: datetime | None = None


@dataclass
class BatchPlan:
    businesses: dict[str, BusinessChanges] = field(default_factory=dict)  # in order of first change
    resync_tables: list[str] = field(default_factory=list)  # TRUNCATEd tables: every dashboard resyncs
    dead_letters: list[tuple[Change, str]] = field(default_factory=list)
    changed_tables: list[str] = field(default_factory=list)  # with changed_rows: every usable row change,
    changed_rows: list[str | None] = field(default_factory=list)  # for the aggregates (apply_changes_v2)
    last_change_id: int = 0
    last_captured_at: datetime | None = None

    def toast_ids(self) -> list[str]:
        return [i for b in self.businesses.values() for i in b.toast_ids]

    def events(self, toasts: dict[str, ToastPayment]) -> tuple[list[str | None], list[str], list[str]]:
        """(business ids, kinds, JSON payloads) for dashboard.append_events_v1, resyncs first."""
        business_ids: list[str | None] = []
        kinds: list[str] = []
        payloads: list[str] = []
        if self.resync_tables:
            business_ids.append(None)
            kinds.append("resync")
            payloads.append(json.dumps({"reason": "truncate", "tables": sorted(set(self.resync_tables))}))
        for b in self.businesses.values():
            payments = [toasts[i] for i in b.toast_ids if i in toasts]
            committed_at = b.committed_at.isoformat() if b.committed_at else ""
            business_ids.append(b.business_id)
            kinds.append("invalidate")
            payloads.append(json.dumps(invalidate_payload(b.business_id, b.changes, payments, committed_at)))
        return business_ids, kinds, payloads


def _json(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        loaded = json.loads(value)
        return loaded if isinstance(loaded, dict) else None
    return dict(value)


def _problem(change: Change) -> str | None:
    """Why a change cannot become an event, or None."""
    if change.op not in _OPS:
        return f"unknown operation {change.op!r}"
    if not change.table_name:
        return "change names no table"
    if change.op == "TRUNCATE":
        return None
    if not change.business_id:
        return f"{change.op} on {change.table_name} carries no business key"
    if len(change.business_id) > MAX_BUSINESS_KEY or not change.business_id.isprintable():
        return "business key is not a printable key of at most 200 characters"
    return None


def plan_batch(changes: list[Change]) -> BatchPlan:
    plan = BatchPlan()
    for change in sorted(changes, key=lambda c: c.id):
        plan.last_change_id = max(plan.last_change_id, change.id)
        if plan.last_captured_at is None or change.captured_at > plan.last_captured_at:
            plan.last_captured_at = change.captured_at
        problem = _problem(change)
        if problem:
            plan.dead_letters.append((change, problem))
            continue
        if change.op == "TRUNCATE":
            plan.resync_tables.append(change.table_name)
            continue
        assert change.business_id is not None
        plan.changed_tables.append(change.table_name)
        plan.changed_rows.append(change.row_id)
        entry = plan.businesses.setdefault(change.business_id, BusinessChanges(change.business_id))
        entry.changes.append({"table": short_table_name(change.table_name), "op": change.op, "id": change.row_id})
        if change.became_completed_payment() and change.row_id not in entry.toast_ids:
            assert change.row_id is not None
            entry.toast_ids.append(change.row_id)
        if entry.committed_at is None or change.captured_at > entry.committed_at:
            entry.committed_at = change.captured_at
    return plan
