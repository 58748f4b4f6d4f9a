"""Batched ``WG_CMD_SET_DEVICE`` messages, checked against the WireGuard netlink layout.

No kernel module here, so the bytes are decoded by pyroute2's own ``wgmsg`` (an independent
implementation of ``include/uapi/linux/wireguard.h``) and the peers read back must be the diff.
"""

from __future__ import annotations

import base64
import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.generic.wireguard import wgmsg

from damm.wireguard.netlink_batch import (
    NLA_F_NESTED,
    WG_CMD_SET_DEVICE,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    set_device_messages,
)
from damm.wireguard.peer_diff import Peer, PeerDiff

FAMILY = 0x1F

keys = st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode())
v4 = st.tuples(st.integers(0, 2**32 - 1), st.integers(8, 32)).map(
    lambda t: str(ipaddress.ip_network((t[0], t[1]), strict=False))
)
v6 = st.tuples(st.integers(0, 2**128 - 1), st.integers(16, 128)).map(
    lambda t: str(ipaddress.ip_network((t[0], t[1]), strict=False))
)
peers = st.builds(
    lambda k, ips, ka: Peer(k, tuple(sorted(set(ips))), ka),
    keys,
    st.lists(v4 | v6, max_size=30),
    st.sampled_from([0, 25]),
)
diffs = st.builds(
    lambda rm, up, add: PeerDiff(
        add=tuple({p.public_key: p for p in add}.values()),
        remove=tuple(dict.fromkeys(rm)),
        update=tuple({p.public_key: p for p in up}.values()),
    ),
    st.lists(keys, max_size=10),
    st.lists(peers, max_size=6),
    st.lists(peers, max_size=12),
)


def read_back(
    messages: list[bytes], limit: int
) -> list[tuple[str, int | None, int | None, list[str]]]:
    """Every peer entry of every message, in order: key, flags, keepalive, allowed IPs."""
    out = []
    for data in messages:
        length, kind, flags, got_seq, _ = struct.unpack_from("=IHHII", data)
        assert length == len(data) <= limit and kind == FAMILY and got_seq == 7 and flags == 5
        msg = wgmsg(data)
        msg.decode()
        assert msg["cmd"] == WG_CMD_SET_DEVICE and msg["version"] == 1
        assert msg.get_attr("WGDEVICE_A_IFNAME") == "wg-test0"
        (group,) = msg.get_attrs("WGDEVICE_A_PEERS")  # one nested array per message
        for peer in group:
            ips = [
                str(ipaddress.ip_network(ip["addr"]))
                for ip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or []
            ]
            key = peer.get_attr("WGPEER_A_PUBLIC_KEY")
            out.append(
                (
                    key.decode() if isinstance(key, bytes) else key,
                    peer.get_attr("WGPEER_A_FLAGS"),
                    peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL"),
                    ips,
                )
            )
    return out


@settings(max_examples=40, deadline=None)
@given(change=diffs, limit=st.sampled_from([300, 600, 1500, 8192]))
def test_a_diff_goes_out_in_few_messages_that_carry_it_exactly(
    change: PeerDiff, limit: int
) -> None:
    messages = set_device_messages("wg-test0", change, family_id=FAMILY, seq=7, limit=limit)
    entries = read_back(messages, limit)
    merged: list[tuple[str, int | None, int | None, list[str]]] = []
    for key, flags, keepalive, ips in entries:
        if flags is None:  # a continuation: same peer, more IPs
            assert merged and merged[-1][0] == key and keepalive is None
            merged[-1][3].extend(ips)
        else:
            merged.append((key, flags, keepalive, ips))
    want = [(k, WGPEER_F_REMOVE_ME, None, []) for k in change.remove]
    want += [
        (
            p.public_key,
            WGPEER_F_UPDATE_ONLY | WGPEER_F_REPLACE_ALLOWEDIPS,
            p.persistent_keepalive,
            list(p.allowed_ips),
        )
        for p in change.update
    ]
    want += [
        (p.public_key, WGPEER_F_REPLACE_ALLOWEDIPS, p.persistent_keepalive, list(p.allowed_ips))
        for p in change.add
    ]
    assert merged == want
    if limit == 8192 and len(change) > 0:
        # batching: a message holds as many whole entries as fit, so none could take the next one
        assert len(messages) <= 1 + sum(len(m) for m in messages) // (8192 // 2)


def test_ten_thousand_peers_take_a_few_hundred_messages_not_ten_thousand() -> None:
    add = tuple(
        Peer(
            base64.b64encode(n.to_bytes(32, "big")).decode(),
            (f"10.{n // 65536}.{n // 256 % 256}.{n % 256}/32",),
        )
        for n in range(10_000)
    )
    messages = set_device_messages("wg0", PeerDiff(add=add), family_id=FAMILY)
    assert 100 <= len(messages) <= 200 and all(len(m) <= 8192 for m in messages)
    # after the headers (16 + 4) and IFNAME ("wg0\\0", 8): the nested peer array, type 8
    assert all(struct.unpack_from("=HH", m, 16 + 4 + 8)[1] == 8 | NLA_F_NESTED for m in messages)
