"""The device's WireGuard configuration file, in the wg-quick format every official app imports.

Every value is validated before it is written: wg-quick runs `PreUp`/`PostUp` lines through a
shell, so a newline smuggled into a DNS server or an endpoint would be a command run as root on
the next `wg-quick up`. Edits (failover) touch only the Peer's Endpoint line, so anything a user
added by hand survives.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re

from damm.catalog.document import ENDPOINT_PATTERN
from damm.errors import Code, DammError

_endpoint = re.compile(ENDPOINT_PATTERN)
# A DNS search domain, which wg-quick also accepts on the DNS line.
_search_domain = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_section = re.compile(r"^\s*\[\s*([A-Za-z]+)\s*\]\s*$")
# wg and wg-quick match keys case-insensitively and strip comments starting at "#".
_endpoint_line = re.compile(
    r"^(?P<prefix>\s*endpoint\s*=\s*)(?P<value>[^#\r\n]*?)(?P<rest>\s*(?:#.*)?)$", re.I
)


def render_wg_quick(
    private_key_b64: str,
    address_v4_cidr: str,
    address_v6_cidr: str | None,
    dns: tuple[str, ...],
    peer_public_key: str,
    endpoint: str,
    allowed_ips: tuple[str, ...],
    persistent_keepalive: int = 25,
) -> str:
    _check_key(private_key_b64, "private key")
    _check_key(peer_public_key, "peer public key")
    addresses = [_interface(address_v4_cidr, 4)]
    if address_v6_cidr is not None:
        addresses.append(_interface(address_v6_cidr, 6))
    servers = [_dns_entry(entry) for entry in dns]
    networks = [_network(entry) for entry in allowed_ips]
    if not networks:
        raise DammError(Code.INVALID_ARGUMENT, "allowed IPs must not be empty")
    if not 0 <= persistent_keepalive <= 65535:
        raise DammError(Code.INVALID_ARGUMENT, f"keepalive {persistent_keepalive} is out of range")

    lines = [
        "[Interface]",
        f"PrivateKey = {private_key_b64}",
        f"Address = {', '.join(addresses)}",
    ]
    if servers:
        lines.append(f"DNS = {', '.join(servers)}")
    lines += [
        "",
        "[Peer]",
        f"PublicKey = {peer_public_key}",
        f"Endpoint = {check_endpoint(endpoint)}",
        f"AllowedIPs = {', '.join(networks)}",
    ]
    if persistent_keepalive:
        lines.append(f"PersistentKeepalive = {persistent_keepalive}")
    return "\n".join(lines) + "\n"


def parse_endpoint(config_text: str) -> str:
    _, match = _find_endpoint(config_text)
    return match.group("value")


def replace_endpoint(config_text: str, new_endpoint: str) -> str:
    """The same text, byte for byte, except the value on the Peer's Endpoint line."""
    new_endpoint = check_endpoint(new_endpoint)
    lines = config_text.splitlines(keepends=True)
    index, match = _find_endpoint(config_text)
    body = lines[index].rstrip("\r\n")
    ending = lines[index][len(body) :]
    lines[index] = f"{match.group('prefix')}{new_endpoint}{match.group('rest')}{ending}"
    return "".join(lines)


def check_endpoint(endpoint: str) -> str:
    if _endpoint.fullmatch(endpoint) is None:
        raise DammError(Code.INVALID_ARGUMENT, f"endpoint {endpoint[:80]!r} is not host:port")
    return endpoint


def _find_endpoint(config_text: str) -> tuple[int, re.Match[str]]:
    section = ""
    found: list[tuple[int, re.Match[str]]] = []
    peers = 0
    for index, line in enumerate(config_text.splitlines()):
        header = _section.match(line)
        if header:
            section = header.group(1).lower()
            peers += section == "peer"
            continue
        if section == "peer":
            match = _endpoint_line.match(line)
            if match:
                found.append((index, match))
    if peers != 1:
        # Failover rewrites "the" gateway; with several peers, which one is ambiguous.
        raise DammError(Code.INVALID_ARGUMENT, f"config has {peers} [Peer] sections, expected 1")
    if len(found) != 1:
        raise DammError(
            Code.INVALID_ARGUMENT, f"the [Peer] section has {len(found)} Endpoint lines, expected 1"
        )
    return found[0]


def _check_key(value: str, what: str) -> None:
    # Never echo the value: it may be the private key.
    try:
        ok = len(base64.b64decode(value, validate=True)) == 32 and len(value) == 44
    except (binascii.Error, ValueError):
        ok = False
    if not ok:
        raise DammError(Code.INVALID_ARGUMENT, f"{what} is not a base64 WireGuard key")


def _interface(value: str, version: int) -> str:
    try:
        interface = ipaddress.ip_interface(value.strip())
    except ValueError:
        raise DammError(Code.INVALID_ARGUMENT, f"address {value!r} is not an IP/prefix") from None
    if interface.version != version or "/" not in value:
        raise DammError(Code.INVALID_ARGUMENT, f"address {value!r} is not an IPv{version}/prefix")
    return str(interface)


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise DammError(Code.INVALID_ARGUMENT, f"allowed IP {value!r} is not a network") from None


def _dns_entry(value: str) -> str:
    value = value.strip()
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if _search_domain.fullmatch(value) is None:
        raise DammError(Code.INVALID_ARGUMENT, f"DNS entry {value!r} is neither an IP nor a domain")
    return value
