"""Gateway routes: webhooks (filled in by its own change; the app mounts `routes`)."""

from __future__ import annotations

from starlette.routing import BaseRoute

__all__ = ["routes"]

routes: list[BaseRoute] = []
