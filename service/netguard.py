"""Where webhooks may connect: public addresses only, unless an operator allow-lists a range.

A webhook URL is chosen by a team, and the worker that sends it sits inside the pool's network
(beside the API, the database and a cloud's metadata service). So a target is checked after DNS
resolution, every address of the answer, and the connection then goes to a checked address
(service/webhook_delivery.py puts the IP in the URL), never to a second lookup of the name that
could answer differently (DNS rebinding).

Refused unless `TUNEPOOL_WEBHOOK_ALLOW_CIDRS` admits it: every address that is not global
(loopback, private, link-local, unique-local, unspecified, CGNAT, documentation, reserved...),
multicast, and IPv6 forms that carry such an IPv4 address (mapped, compatible, NAT64, 6to4).
A host is read the way the system's resolver reads it: `2130706433`, `0x7f.1`, `0177.0.0.1` and
`127.1` are the IPv4 address they spell. Names reserved for internal use (`localhost`, `*.internal`,
`*.local`, single labels such as `metadata`...) are refused when they do not resolve, as any name
is whose addresses are all refused.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host name -> the addresses it resolves to (strings, as getaddrinfo gives them); raises OSError
# when it does not resolve. Tests pass their own to feed DNS answers.
Resolver = Callable[[str], list[str]]

_INTERNAL_NAMES = ("localhost", "localhost.localdomain")
_INTERNAL_SUFFIXES = (".localhost", ".local", ".localdomain", ".internal", ".intranet", ".home.arpa", ".lan")
# IPv6 ranges that embed an IPv4 address in their last 32 bits (NAT64: RFC 6052 and RFC 8215).
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
# Not global whatever a Python version's tables say (site-local is deprecated, never routed).
_REFUSED = (ipaddress.IPv6Network("fec0::/10"), ipaddress.IPv4Network("100.64.0.0/10"))


class TargetRefused(Exception):
    """The host resolves only to addresses webhooks may not reach. The message is safe to show the
    team: it names the host they gave, never the addresses nor anything learnt by connecting."""


class TargetUnresolved(Exception):
    """The host does not resolve (no answer, or no answer in time)."""


def parse_allow_cidrs(text: str) -> tuple[IPNetwork, ...]:
    """TUNEPOOL_WEBHOOK_ALLOW_CIDRS: comma-separated networks (a bare address is a /32 or /128)."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(
                f"TUNEPOOL_WEBHOOK_ALLOW_CIDRS: {part!r} is not a network "
                "(expected e.g. 10.0.0.0/8 or fd00::/8)"
            ) from None
    return tuple(networks)


def _ipv4_number(part: str) -> int | None:
    """One part of an inet_aton-style address: decimal, 0x hexadecimal or 0-prefixed octal."""
    try:
        if part[:2].lower() == "0x":
            return int(part[2:], 16) if part[2:] else 0
        if len(part) > 1 and part.startswith("0"):
            return int(part[1:], 8)
        return int(part, 10) if part.isdigit() else None
    except ValueError:
        return None


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """`127.1`, `0x7f000001`, `017700000001`, `2130706433`...: what inet_aton (and so getaddrinfo
    and every HTTP client that calls it) reads as an IPv4 address. The last part fills the rest."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(parts):
        return None
    numbers = [_ipv4_number(p) for p in parts]
    if any(n is None for n in numbers):
        return None
    *head, last = [n for n in numbers if n is not None]
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        return None
    value = 0
    for n in head:
        value = value * 256 + n
    return ipaddress.IPv4Address(value * 256 ** (4 - len(head)) + last)


def literal_address(host: str) -> IPAddress | None:
    """The address a host literally is (any spelling, IPv6 with or without brackets), else None."""
    text = host.strip().removeprefix("[").removesuffix("]").removesuffix(".")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return _legacy_ipv4(text) if text else None


def is_internal_name(host: str) -> bool:
    """Names that only mean something inside a network: reserved suffixes and single labels (which
    the resolver completes with the machine's search domains)."""
    name = host.strip().lower().removesuffix(".")
    return name in _INTERNAL_NAMES or name.endswith(_INTERNAL_SUFFIXES) or "." not in name


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in net for net in _NAT64) or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True)
class TargetPolicy:
    allow: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_text(cls, allow_cidrs: str) -> TargetPolicy:
        return cls(parse_allow_cidrs(allow_cidrs))

    def _allow_listed(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.allow)

    def admits(self, address: IPAddress) -> bool:
        """Whether a webhook may connect to this address."""
        embedded = _embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
        if self._allow_listed(address) or (embedded is not None and self._allow_listed(embedded)):
            return True
        if embedded is not None and not self.admits(embedded):
            return False
        if address.is_multicast or any(address.version == n.version and address in n for n in _REFUSED):
            return False
        return address.is_global

    def check(self, host: str, resolver: Resolver) -> list[IPAddress]:
        """The addresses of `host` a webhook may connect to, in the resolver's order (at least one).

        TargetRefused when the answer holds none; TargetUnresolved when there is no answer."""
        literal = literal_address(host)
        if literal is not None:
            if not self.admits(literal):
                raise TargetRefused(f"the address {host} is not one webhooks may reach")
            return [literal]
        try:
            answers = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolver(host)]
        except (OSError, UnicodeError, ValueError) as err:
            raise TargetUnresolved(f"the host {host} does not resolve") from err
        if not answers:
            raise TargetUnresolved(f"the host {host} does not resolve")
        admitted = [a for a in answers if self.admits(a)]
        if not admitted:
            raise TargetRefused(f"the host {host} resolves only to addresses webhooks may not reach")
        return admitted


def system_resolver(host: str) -> list[str]:
    """The system's answer for `host` (getaddrinfo, as any client would ask), duplicates removed."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_lookups = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tunepool-dns")


def check_registration(host: str, policy: TargetPolicy, resolver: Resolver, timeout_s: float = 3.0) -> None:
    """Whether an endpoint may be registered for `host`: TargetRefused if not.

    A name that does not resolve (yet) is accepted, unless it is an internal name: DNS may be set up
    after the endpoint, and every delivery checks again. The lookup is bounded so that a slow DNS
    server cannot hold the request."""
    future = _lookups.submit(policy.check, host, resolver)
    try:
        future.result(timeout=timeout_s)
    except (TargetUnresolved, FutureTimeout):
        if is_internal_name(host):
            raise TargetRefused(f"the host {host} is a name internal to a network") from None
