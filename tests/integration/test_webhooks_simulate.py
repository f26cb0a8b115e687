"""`cdc-dashboard simulate`: its traffic lands in the tables, consistently, by webhooks and with --direct."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time

from cdc_dashboard.config import Settings
from cdc_dashboard.demo.traffic import SimulateOptions, SimulationThread, simulate

from .webhook_server import MPESA_TOKEN, PAYSTACK_SECRET, assert_consistent, serve_webhooks


def test_simulate_webhooks_against_a_gateway(db_url: str) -> None:
    with serve_webhooks(db_url) as server:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, database_url=db_url, paystack_secret_key=PAYSTACK_SECRET, mpesa_callback_token=MPESA_TOKEN
        )
        options = SimulateOptions(rate=30, duration=2, businesses=3, url=server.base_url, seed=7)
        out = io.StringIO()
        tally = asyncio.run(simulate(settings, options, out=out))
        assert tally.errors == 0 and tally.rejected == 0, (tally, out.getvalue())
        assert tally.sent >= 20
        assert "simulate" in out.getvalue() and "recorded" in out.getvalue()
        assert server.one("select count(*) from businesses") == 3
        assert server.one("select count(*) from payments where status = 'completed'") >= 10
        assert set(server.one("select array_agg(distinct method) from payments")) == {"mpesa", "paystack"}
        # Nothing the simulator sends is unattributed: every business it pays exists.
        assert server.one("select count(*) from payment_transactions where business_id is null") == 0
        assert_consistent(server)


def test_simulate_direct_command(db_url: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    result = subprocess.run(
        [sys.executable, "-m", "cdc_dashboard.cli", "simulate", "--direct", "--rate", "30", "--duration", "2"],
        env={**clean, "CDC_DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("simulate") and "errors 0" in last, result.stderr
    with serve_webhooks(db_url) as server:
        assert server.one("select count(*) from payments where status = 'completed'") >= 10
        assert_consistent(server)


def test_simulate_without_secrets_says_what_to_do(db_url: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    result = subprocess.run(
        [sys.executable, "-m", "cdc_dashboard.cli", "simulate", "--duration", "1"],
        env={**clean, "CDC_DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "CDC_PAYSTACK_SECRET_KEY" in result.stderr and "--direct" in result.stderr


def test_simulation_thread_stops_on_request(db_url: str) -> None:
    settings = Settings(_env_file=None, database_url=db_url)  # type: ignore[call-arg]
    options = SimulateOptions(rate=20, direct=True, seed=3, progress=False)
    thread = SimulationThread(settings, options).start()
    with serve_webhooks(db_url) as server:
        deadline = time.monotonic() + 20
        while server.one("select count(*) from payments where status = 'completed'") < 5:
            assert time.monotonic() < deadline and thread.error is None, thread.error
            time.sleep(0.2)
    tally = thread.stop()
    assert thread.error is None and tally is not None
    assert tally.sent >= 5 and tally.errors == 0
