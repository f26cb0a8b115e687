"""`cdc-dashboard aggregates rebuild [--business ID]` as an operator runs it: repairs reported, invalidations
emitted, mistakes as one line."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import psycopg

CLI = [sys.executable, "-m", "cdc_dashboard.cli"]


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    return subprocess.run([*CLI, *args], env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_rebuild_reports_repairs_and_emits_events(db_url: str) -> None:
    b, other = str(uuid.uuid4()), str(uuid.uuid4())
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("insert into businesses (id, name) values (%s, 'Salon'), (%s, 'Other')", (b, other))
        # Nobody consumed these changes: the rollups know nothing of the payments yet.
        conn.execute(
            "insert into payments (business_id, amount_minor, currency, method, status)"
            " values (%s, 1000, 'KES', 'cash', 'completed'), (%s, 5, 'KES', 'cash', 'completed')",
            (b, other),
        )
    first = run_cli("aggregates", "rebuild", "--business", b, CDC_DATABASE_URL=db_url)
    assert first.returncode == 0, first.stderr
    assert f"{b}: repaired" in first.stdout
    assert "payment_facts 1 rows" in first.stdout  # the unseen payment, counted through its fact
    assert "rebuilt 1 businesses; repaired 1 of them; emitted 1 invalidation events" in first.stdout
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("select sum(revenue_minor) from dashboard.revenue_daily").fetchone() == (1000,)
        events = conn.execute("select business_id, payload->>'reason' from dashboard.events").fetchall()
    assert events == [(b, "manual_refresh")]

    everything = run_cli("aggregates", "rebuild", CDC_DATABASE_URL=db_url)
    assert everything.returncode == 0, everything.stderr
    assert f"{other}: repaired" in everything.stdout and f"{b}: repaired" not in everything.stdout
    assert "rebuilt 2 businesses" in everything.stdout

    again = run_cli("aggregates", "rebuild", CDC_DATABASE_URL=db_url)
    assert "nothing needed repair" in again.stdout


def test_rebuild_mistakes_are_one_line(db_url: str) -> None:
    for business, reason in [("nope", "must be a business id"), (str(uuid.uuid4()), "no such business")]:
        result = run_cli("aggregates", "rebuild", "--business", business, CDC_DATABASE_URL=db_url)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and reason in lines[0], result.stderr
