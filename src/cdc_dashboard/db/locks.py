"""Every advisory-lock key the product takes, and what the lock guards.

Advisory-lock keys are one space per database, shared with every application on it, so the product takes keys
from its own range (42420000NN) and names each one here. Some are taken inside SQL that migrations have already
installed (sql/schema), where a key can no longer change: they are listed all the same, so that no new use
takes one of them for something else. Named queries take their key as a parameter from here. A unit test checks
that every 42420000NN written in sql/ and src/ is one of these.
"""

from __future__ import annotations

from enum import IntEnum, unique

__all__ = ["LockKey"]


@unique  # two names for one key would be two locks that block each other
class LockKey(IntEnum):
    # Transaction lock around every append to dashboard.events: ids then commit in id order, so a reader that
    # reads by id never skips an event that commits late (sql/schema, append_events).
    EVENTS_APPEND = 4242000002
    # Session lock of `db apply`: two deploys that apply at once take turns (sql/queries/migrations.sql).
    DB_APPLY = 4242000003
    # Session lock the active listener holds for the life of its dedicated connection; standbys wait for it,
    # and doctor looks for its holder (sql/queries/listener.sql, doctor.sql).
    LISTENER_LEADERSHIP = 4242000004
    # Transaction lock of every writer of the aggregates (the listener's batch, a refresh, a rebuild's chunk),
    # taken before EVENTS_APPEND by all of them so the two never deadlock (sql/schema).
    AGGREGATES = 4242000005
    # Session lock of doctor's end-to-end probe: two doctors at once take turns (sql/queries/doctor.sql).
    DOCTOR_PROBE = 4242000006
    # Seed of the per-payment-key transaction locks of ingestion (hashtextextended(key, seed)): two deliveries
    # of the same webhook record it once (sql/queries/ingest.sql).
    INGEST_PAYMENT_KEY = 4242000007
