"""Which caller may speak for M-Pesa: the source-IP allow-list, and whom to believe about the source IP.

`X-Forwarded-For` is believed only when the TCP peer is one of the configured trusted proxies, and then it
is read from the right: each hop appended by a trusted proxy is skipped, and the first address that is not a
trusted proxy is the caller. Anything further left was written by the caller and proves nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["IPNetwork", "caller_ip", "is_allowed", "networks"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def networks(entries: Iterable[str]) -> list[IPNetwork]:
    """Addresses or CIDR blocks; a bare address is a /32 (or /128)."""
    return [ipaddress.ip_network(e.strip(), strict=False) for e in entries if e.strip()]


def _address(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: IPAddress, nets: Sequence[IPNetwork]) -> bool:
    return any(address.version == n.version and address in n for n in nets)


def caller_ip(
    peer: str | None, forwarded_for: str | Sequence[str] | None, trusted_proxies: Sequence[IPNetwork]
) -> IPAddress | None:
    """The caller's address, or None when it cannot be told (no peer, or a garbled forwarded hop).

    `forwarded_for` is the X-Forwarded-For header, or every line of it in order when it came as several lines:
    HTTP makes repeated lines one comma-separated list, and a proxy may append its hop as a line of its own.
    Reading only the first line would believe a hop the caller wrote (the allow-list bypass of issue 16).
    """
    address = _address(peer) if peer else None
    lines = [forwarded_for] if isinstance(forwarded_for, str) else list(forwarded_for or [])
    hops = [hop for line in lines if line.strip() for hop in line.split(",")]
    if address is None or not hops or not _within(address, trusted_proxies):
        return address
    for hop in reversed(hops):
        hop_address = _address(hop)
        if hop_address is None:
            return None
        if not _within(hop_address, trusted_proxies):
            return hop_address
    # Every hop is a proxy of ours: the request started inside.
    return address


def is_allowed(address: IPAddress | None, allowed: Sequence[IPNetwork]) -> bool:
    """An empty allow-list allows everyone; otherwise the caller must be known and inside it."""
    if not allowed:
        return True
    return address is not None and _within(address, allowed)
