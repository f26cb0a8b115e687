"""`cdc-dashboard run`: the zero-setup demo.

Embedded PostgreSQL when CDC_DATABASE_URL is unset, `db apply`, demo data, then the gateway and the listener
in this process; prints the dashboard URL with a token, and stops everything cleanly on Ctrl-C.
"""

from __future__ import annotations

import secrets
import signal
from pathlib import Path
from types import FrameType

from ..config import Settings, signing_secret
from ..db.embedded import start_embedded
from ..gateway.app import serve
from ..logs import configure_logging
from ..migrations import apply
from ..tokens import create_token
from .seed import load_demo
from .traffic import SimulateOptions, SimulationThread

__all__ = ["ensure_secret", "run_demo"]

# The demo's dashboard link stays valid for a week of leaving `make run` open.
DEMO_TOKEN_TTL = 7 * 24 * 3600


def ensure_secret(settings: Settings) -> str:
    """CDC_SECRET, else one generated once and kept in the state directory (readable by its owner only)."""
    existing = signing_secret(settings)
    if existing:
        return existing
    path = Path(settings.state_dir) / "secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(secrets.token_urlsafe(48))
    return path.read_text().strip()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(settings: Settings, *, seed: int, rate: float) -> int:
    server = None
    simulation = None
    url = settings.database_url
    if url is None:
        print(
            f"starting the embedded PostgreSQL (data in {Path(settings.state_dir).resolve()}/pgdata) ...",
            flush=True,
        )
        server = start_embedded(settings.state_dir)
        url = server.get_uri()
    # From here on, every part of the demo connects to this one database.
    settings = settings.model_copy(update={"database_url": url})
    try:
        for line in apply(url):
            print(line, flush=True)
        businesses = load_demo(url, seed=seed)
        print(f"database ready: {len(businesses)} demo businesses", flush=True)
        for business_id, name in businesses:
            print(f"  {business_id}  {name}", flush=True)
        secret = ensure_secret(settings)
        first_business = str(businesses[0][0])
        # A wildcard bind address is not somewhere a browser can go; the machine itself is.
        host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host
        dashboard_url = (
            f"http://{host}:{settings.http_port}/dashboard/{first_business}"
            f"?access_token={create_token(secret, [first_business], DEMO_TOKEN_TTL)}"
        )
        print(f"PostgreSQL: {url}", flush=True)

        def announce() -> None:
            nonlocal simulation
            if rate > 0:
                # Keep the demo dashboard moving: payments through the real write path (ingest), a few a minute.
                options = SimulateOptions(rate=rate, businesses=len(businesses), direct=True, seed=seed, progress=False)
                simulation = SimulationThread(settings, options).start()
                print(f"simulating payments: {rate:g} activities/s (--rate 0 to stop)", flush=True)
            print(f"Press Ctrl-C to stop. Open the live dashboard:\n{dashboard_url}", flush=True)

        # uvicorn handles SIGINT/SIGTERM itself and re-raises them once it has stopped: both end up here as
        # KeyboardInterrupt, so the embedded PostgreSQL is always stopped.
        signal.signal(signal.SIGTERM, _interrupt)
        configure_logging("WARNING")
        code = serve(settings.model_copy(update={"secret": secret}), with_listener=True, on_ready=announce)
        if code != 0:
            return code
    except KeyboardInterrupt:
        pass
    finally:
        if simulation is not None:
            simulation.stop()
        if server is not None:
            print("stopping the embedded PostgreSQL ...", flush=True)
            server.cleanup()
    return 0
