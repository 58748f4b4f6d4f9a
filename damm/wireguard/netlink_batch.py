"""``WG_CMD_SET_DEVICE`` messages that carry many peers each, split at the netlink message limit.

pyroute2's ``WireGuard.set`` sends one peer per request, so a 10k-peer resync took 10k round
trips. The WireGuard generic-netlink API takes a whole array of peers per message
(``include/uapi/linux/wireguard.h``); ``wg`` itself fills each message up to its socket buffer
size and continues in the next one, splitting a peer whose allowed IPs do not fit into a
continuation entry (same public key, more IPs, no flags). This module encodes exactly that, as
pure bytes, so the layout can be checked without the kernel module.
"""

from __future__ import annotations

import base64
import ipaddress
import struct
from collections.abc import Iterator

from damm.wireguard.peer_diff import PeerDiff

WG_CMD_SET_DEVICE = 1
WG_GENL_VERSION = 1
WGDEVICE_A_IFNAME = 2
WGDEVICE_A_PEERS = 8
WGPEER_A_PUBLIC_KEY = 1
WGPEER_A_FLAGS = 3
WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL = 5
WGPEER_A_ALLOWEDIPS = 9
WGALLOWEDIP_A_FAMILY = 1
WGALLOWEDIP_A_IPADDR = 2
WGALLOWEDIP_A_CIDR_MASK = 3
WGPEER_F_REMOVE_ME = 0x1
WGPEER_F_REPLACE_ALLOWEDIPS = 0x2
WGPEER_F_UPDATE_ONLY = 0x4
NLA_F_NESTED = 0x8000
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
AF_INET, AF_INET6 = 2, 10
# What ``wg`` uses: min(page size, 8 KiB). The kernel accepts larger, but this is what is proven.
MESSAGE_LIMIT = 8192

_NLMSG = struct.Struct("=IHHII")
_GENL = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")


def _attr(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def _nest(kind: int, parts: list[bytes]) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


def _allowed_ip(cidr: str) -> bytes:
    net = ipaddress.ip_network(cidr, strict=False)
    family = AF_INET if net.version == 4 else AF_INET6
    return _nest(
        0,
        [
            _attr(WGALLOWEDIP_A_FAMILY, struct.pack("=H", family)),
            _attr(WGALLOWEDIP_A_IPADDR, net.network_address.packed),
            _attr(WGALLOWEDIP_A_CIDR_MASK, struct.pack("=B", net.prefixlen)),
        ],
    )


def _peer(key: bytes, flags: int | None, keepalive: int | None, ips: list[bytes]) -> bytes:
    parts = [_attr(WGPEER_A_PUBLIC_KEY, key)]
    if flags is not None:
        parts.append(_attr(WGPEER_A_FLAGS, struct.pack("=I", flags)))
    if keepalive is not None:
        parts.append(_attr(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, struct.pack("=H", keepalive)))
    if ips:
        parts.append(_nest(WGPEER_A_ALLOWEDIPS, ips))
    return _nest(0, parts)


def peer_entries(diff: PeerDiff, room: int) -> Iterator[bytes]:
    """Each change as encoded peer entries of at most ``room`` bytes: removals, updates, adds.

    A peer whose allowed IPs do not fit in one entry continues in more entries (key and IPs
    only), the way ``wg`` splits them; the first one carries the flags, so the replacement of
    the old IPs happens once, before the rest are added.
    """
    for removed in diff.remove:
        yield _peer(base64.b64decode(removed), WGPEER_F_REMOVE_ME, None, [])
    changes = [(p, WGPEER_F_UPDATE_ONLY | WGPEER_F_REPLACE_ALLOWEDIPS) for p in diff.update]
    changes += [(p, WGPEER_F_REPLACE_ALLOWEDIPS) for p in diff.add]
    for peer, flags in changes:
        key = base64.b64decode(peer.public_key)
        ips = [_allowed_ip(cidr) for cidr in peer.allowed_ips]
        head: int | None = flags
        keepalive: int | None = peer.persistent_keepalive
        while True:
            taken: list[bytes] = []
            entry = _peer(key, head, keepalive, taken)
            while ips and len(_peer(key, head, keepalive, [*taken, ips[0]])) <= room:
                taken.append(ips.pop(0))
            if ips and not taken and len(entry) > room:
                raise ValueError(f"message limit {room} cannot hold one peer")
            yield _peer(key, head, keepalive, taken)
            if not ips:
                break
            head = keepalive = None


def set_device_messages(
    ifname: str,
    diff: PeerDiff,
    *,
    family_id: int,
    pid: int = 0,
    seq: int = 0,
    limit: int = MESSAGE_LIMIT,
) -> list[bytes]:
    """The whole diff as ``WG_CMD_SET_DEVICE`` messages, each at most ``limit`` bytes.

    Every message carries ``seq``: the sender waits for each acknowledgement before the next
    message, so the kernel's echo of it is enough to pair them.
    """
    name = _attr(WGDEVICE_A_IFNAME, ifname.encode() + b"\0")
    fixed = _NLMSG.size + _GENL.size + len(name) + _NLA.size
    room = limit - fixed
    messages: list[bytes] = []
    batch: list[bytes] = []
    used = 0

    def close() -> None:
        body = _GENL.pack(WG_CMD_SET_DEVICE, WG_GENL_VERSION, 0) + name
        body += _nest(WGDEVICE_A_PEERS, batch)
        header = _NLMSG.pack(
            _NLMSG.size + len(body),
            family_id,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            pid,
        )
        messages.append(header + body)

    for entry in peer_entries(diff, room):
        if batch and used + len(entry) > room:
            close()
            batch, used = [], 0
        batch.append(entry)
        used += len(entry)
    if batch:
        close()
    return messages
