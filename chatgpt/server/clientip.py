"""Client IP resolution: forwarding headers count only when the TCP peer is a trusted proxy.
The result is the client's identity for quotas and limits: an IPv4 address, or an IPv6 /64 network
(one customer line holds a whole /64; counting each of its 2^64 addresses apart would let one client
take as many daily quotas as it likes)."""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

# A real address (with brackets, port and zone id) is far shorter; anything longer is garbage
# and not worth handing to the parser.
_MAX_ADDRESS_LEN = 64
# Proxy chains are a handful of hops; bounding the walk bounds the work a hostile header causes.
_MAX_HOPS = 32
_MAX_REMEMBERED_PEERS = 4096
IPV6_PREFIX = 64  # the customer-assigned part of an IPv6 address (RFC 6177)

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(raw: Any) -> _Address | None:
    """Parse one address as it may appear in a header or peer; None when it is not an IP."""
    if not isinstance(raw, str):
        return None
    text = raw.strip().strip('"')
    if not text or len(text) > _MAX_ADDRESS_LEN:
        return None
    if text.startswith("["):
        # "[v6]" or "[v6]:port"
        end = text.find("]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        # "v4:port"; a bare IPv6 address always has at least two colons
        text = text.partition(":")[0]
    # A zone id ("fe80::1%eth0") names the server's own interface, not the client: the same client
    # written with and without it is one identity.
    text = text.partition("%")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; one client, one identity.
        return address.ipv4_mapped
    return address


def normalise_ip(raw: str | None) -> str | None:
    """Return the canonical text of an address (port, brackets, zone id, v4-mapping removed) or None."""
    address = _parse(raw)
    return None if address is None else str(address)


def identity_of_address(address: _Address) -> str:
    """The identity an address counts as: an IPv4 address itself, an IPv6 address its /64."""
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


def identity_of_text(raw: str) -> str | None:
    """The identity of an address written as text (an operator resetting a quota), or None."""
    address = _parse(raw)
    return None if address is None else identity_of_address(address)


class TrustedProxies:
    """A set of proxy addresses and networks whose forwarding headers are believed."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        """Build from IPs or CIDR networks; raise ValueError naming the first invalid entry."""
        if isinstance(entries, str):
            # A lone string would otherwise be iterated character by character.
            entries = (entries,)
        self._networks: list[_Network] = []
        for entry in entries:
            self._networks.append(self._network(entry))
        self._peers: dict[str, tuple[str, bool]] = {}

    @staticmethod
    def _network(entry: Any) -> _Network:
        """Turn one configured entry into a network (a single IP becomes a /32 or /128)."""
        if not isinstance(entry, str):
            raise ValueError(f"trusted proxy {entry!r} is not a string")
        text = entry.strip()
        address = _parse(text) if "/" not in text else None
        try:
            if address is not None:
                return ipaddress.ip_network(address)
            # strict=False: "10.1.2.3/8" means the network 10.0.0.0/8, as nginx reads it.
            return ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"trusted proxy {entry!r} is not an IP address or CIDR network") from None

    def __contains__(self, ip: object) -> bool:
        """Tell whether an address (in any accepted spelling) is a trusted proxy."""
        address = _parse(ip)
        return address is not None and self._holds(address)

    def _holds(self, address: _Address) -> bool:
        """Membership test on a parsed address; versions are compared to never mix v4 and v6."""
        return any(
            network.version == address.version and address in network for network in self._networks
        )

    def peer(self, peer: str) -> tuple[str, bool]:
        """A TCP peer as (its identity, trusted?), remembered per peer string:
        the same addresses connect again and again, and parsing costs more than the rest of a lookup.
        The memory is bounded: peers are not chosen by headers, yet a scan of many hosts could grow it."""
        known = self._peers.get(peer)
        if known is None:
            if len(self._peers) >= _MAX_REMEMBERED_PEERS:
                self._peers.clear()
            address = _parse(peer)
            text = identity_of_address(address) if address is not None else (peer.strip() or "unknown")
            known = self._peers[peer] = (text, address is not None and self._holds(address))
        return known

    def __len__(self) -> int:
        """Number of configured networks."""
        return len(self._networks)

    def __repr__(self) -> str:
        """Show the configured networks."""
        return f"TrustedProxies({[str(n) for n in self._networks]!r})"


def _header(headers: Mapping[str, str], name: str) -> str:
    """Read a header as one string, joining repeated ones (RFC 9110: same as a comma list)."""
    try:
        getall = getattr(headers, "getall", None)
        if getall is not None:
            values = getall(name, [])
        else:
            value = headers.get(name)
            if value is None:
                value = headers.get(name.lower())
            values = [] if value is None else [value]
        return ",".join(v for v in values if isinstance(v, str))
    except Exception:
        # A hostile or odd mapping must not turn IP resolution into a 500.
        return ""


def client_ip(peer: str | None, headers: Mapping[str, str], trusted: TrustedProxies) -> str:
    """Return the client's identity: the peer, or what a trusted proxy peer forwarded (IPv6 as its /64)."""
    if not isinstance(peer, str):
        return "unknown"
    peer_text, peer_trusted = trusted.peer(peer)
    if not peer_trusted:
        # An untrusted peer can write any header it likes; only the socket tells the truth.
        # (Not an IP at all, e.g. a unix socket name: cannot be trusted, reported as given.)
        return peer_text

    real = _parse(_header(headers, "X-Real-IP"))
    if real is not None:
        return identity_of_address(real)

    # Each proxy appends the address it saw, so the rightmost untrusted hop is the client;
    # everything further left was written by that client and may be forged.
    hops = _header(headers, "X-Forwarded-For").rsplit(",", _MAX_HOPS)[-_MAX_HOPS:]
    for hop in reversed(hops):
        address = _parse(hop)
        if address is not None and not trusted._holds(address):
            return identity_of_address(address)
    return peer_text
