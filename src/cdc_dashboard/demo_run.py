"""`cdc-dashboard run`: the zero-setup demo.

Embedded PostgreSQL when CDC_DATABASE_URL is unset, `db apply`, demo data, then the gateway and the listener
in this process; prints the dashboard URL with a token, and stops everything cleanly on Ctrl-C.
"""

from __future__ import annotations

import secrets
import signal
import threading
from pathlib import Path

from .config import Settings
from .demo import load_demo
from .embedded import start_embedded
from .migrations import apply

__all__ = ["ensure_secret", "run_demo"]


def ensure_secret(settings: Settings) -> str:
    """CDC_SECRET, else one generated once and kept in the state directory (readable by its owner only)."""
    if settings.secret:
        return settings.secret
    path = Path(settings.state_dir) / "secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(48))
    return path.read_text().strip()


def run_demo(settings: Settings, *, seed: int) -> int:
    server = None
    url = settings.database_url
    if url is None:
        print(
            f"starting the embedded PostgreSQL (data in {Path(settings.state_dir).resolve()}/pgdata) ...",
            flush=True,
        )
        server = start_embedded(settings.state_dir)
        url = server.get_uri()
    try:
        for line in apply(url):
            print(line, flush=True)
        businesses = load_demo(url, seed=seed)
        print(f"database ready: {len(businesses)} demo businesses", flush=True)
        for business_id, name in businesses:
            print(f"  {business_id}  {name}", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        print(f"PostgreSQL: {url}\nPress Ctrl-C to stop.", flush=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            print("stopping the embedded PostgreSQL ...", flush=True)
            server.cleanup()
    return 0
