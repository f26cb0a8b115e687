"""The chaos run (bench/chaos.py) in under a minute: every failure at once, and still nothing lost, nothing twice,
nothing foreign, every figure exact.

It runs the script as `make chaos` does, on a shorter schedule: the same real processes (2 listeners, 2 gateways,
one of them behind a freezing proxy), the same faults (listener backends terminated every few seconds, the
active listener SIGKILLed, a PostgreSQL restart, gateway SIGTERM and SIGKILL, a frozen database path, slow
clients that stop reading until the gateway cuts them) and the same verification. The script owns its
PostgreSQL (an embedded server in a temporary directory), so it can restart it without disturbing the suite's
server.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAULTS = [
    "listener backends terminated: 1 main",
    "gateway 1 <-> database path restored",
    "SIGKILLed (standby present)",
    "PostgreSQL back",
    "gateway 0 ready again",
    "gateway 1 ready again",
]


@pytest.mark.slow
def test_chaos_for_a_minute_loses_nothing() -> None:
    # The script starts its own embedded PostgreSQL: it must not be pointed at the suite's server.
    env = {k: v for k, v in os.environ.items() if k not in ("CDC_BENCH_ADMIN_URL", "CDC_DATABASE_URL")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    args = ["--seconds", "45", "--businesses", "4", "--kill-every", "3", "--freeze", "4", "--slow-pause", "25"]
    args += ["--drain", "40"]  # (only a failing run waits that long)
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "chaos.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    summary = result.stdout[result.stdout.find("== chaos summary") :]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "RESULT: PASS" in summary
    for fault in FAULTS:  # every scheduled fault was injected, none skipped
        assert fault in summary, f"{fault!r} missing from:\n{summary}"
    # The slow clients stopped reading long enough to be cut (the script fails a run whose pauses cut none;
    # this one always has a full pause: the first starts 3-8 s in and lasts 20-30 s of the 45).
    cuts = re.search(r"the gateways cut (\d+) slow clients", summary)
    assert cuts and int(cuts.group(1)) >= 1, summary
