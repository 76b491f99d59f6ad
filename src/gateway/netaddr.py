"""IP addresses and CIDR ranges as the gateway compares them.

An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) is its IPv4 address, and a
range written in that form is the IPv4 range, so a dual-stack listener and an
IPv4 allow list agree. Used by the ban list, the allow/deny ranges and the
trusted proxies.
"""

from __future__ import annotations

import ipaddress

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ip(address: str) -> Address:
    """The address, IPv4-mapped IPv6 as IPv4; ValueError if it is not one."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:192.0.2.1 is 192.0.2.1
    return ip


def networks(ranges: list[str], name: str) -> tuple[Network, ...]:
    """Parse CIDR ranges (or single addresses); ValueError naming `name` and the bad entry."""
    parsed = []
    for text in ranges:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not an IP address or CIDR range") from None
        if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
            # ::ffff:10.0.0.0/104 is 10.0.0.0/8: addresses are compared in their IPv4 form.
            net = ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
        parsed.append(net)
    return tuple(parsed)


def within(address: str, ranges: tuple[Network, ...]) -> bool:
    """Whether `address` is an IP in one of `ranges` (anything that is not an IP is in none)."""
    try:
        ip = parse_ip(address)
    except ValueError:
        return False
    return any(ip in net for net in ranges)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
