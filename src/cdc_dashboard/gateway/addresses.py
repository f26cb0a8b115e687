"""The client address of a request: the TCP peer, or the forwarded address when the peer is a trusted proxy.

One place for everything that cares who is calling (the M-Pesa allow-list, the per-address rate limits, the
log line of a rejection), so they cannot disagree. Every `X-Forwarded-For` line is read, as one list
(ingest/sources.py `caller_ip` says how the caller is picked from it).
"""

from __future__ import annotations

import functools
import ipaddress

from starlette.requests import HTTPConnection

from ..ingest.sources import IPAddress, IPNetwork, caller_ip, networks
from .state import gateway_state

__all__ = ["client_address", "nets", "rate_limit_key"]


@functools.lru_cache(maxsize=8)
def nets(entries: tuple[str, ...]) -> list[IPNetwork]:
    """Parsed once per distinct setting (the settings of a process do not change)."""
    return networks(entries)


def client_address(request: HTTPConnection) -> IPAddress | None:
    """Who is calling; None when it cannot be told (no peer, or a trusted proxy forwarded a garbled hop)."""
    peer = request.client.host if request.client else None
    trusted = nets(tuple(gateway_state(request).settings.trusted_proxies))
    return caller_ip(peer, request.headers.getlist("x-forwarded-for"), trusted)


def rate_limit_key(address: IPAddress | None) -> str:
    """The bucket an address draws from. An IPv6 host usually holds a whole /64, so the /64 is one client
    (else one host could take 2^64 fresh buckets); callers that cannot be told apart share one bucket."""
    if address is None:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
