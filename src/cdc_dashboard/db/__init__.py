"""Talking to PostgreSQL: connections (`connections`), the embedded server of `run` (`embedded`), reconnect
delays (`backoff`) and the registry of advisory-lock keys (`locks`). The connection helpers are the package's
everyday use, so they can be imported from `cdc_dashboard.db` itself."""

from __future__ import annotations

from .connections import AsyncConnection, connect_dedicated, connect_sync, describe_url, keepalive_kwargs, with_database

__all__ = ["AsyncConnection", "connect_dedicated", "connect_sync", "describe_url", "keepalive_kwargs", "with_database"]
