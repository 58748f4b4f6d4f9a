"""Kernel backend: multi-message dump merging (pure) and, where the module exists, a live run."""

from __future__ import annotations

import base64
import os
import subprocess
from socket import AF_INET, AF_INET6, inet_pton
from typing import Any

import pytest
from nacl.public import PrivateKey

from damm.netns import can_run_netns, run, unique_tag
from damm.wireguard import WireGuardError, reconcile
from damm.wireguard.kernel import (
    NLM_F_DUMP_INTR,
    DumpPart,
    KernelBackend,
    merge_dump,
    part_from_message,
    split_endpoint,
)
from damm.wireguard.peer_diff import Peer

K1, K2, K3 = (base64.b64encode(bytes([i]) * 32).decode() for i in (1, 2, 3))


def test_merge_joins_a_peer_split_across_messages() -> None:
    parts: list[DumpPart] = [
        {
            "flags": 2,
            "ifindex": 7,
            "public_key": K3,
            "listen_port": 51820,
            "peers": [
                {"public_key": K1, "allowed_ips": ["10.44.0.10/32"], "rx_bytes": 5,
                 "tx_bytes": 6, "persistent_keepalive": 25, "endpoint": "192.0.2.1:1",
                 "last_handshake": (1700000000, 500_000_000)},
                {"public_key": K2, "allowed_ips": ["10.1.0.0/24"], "rx_bytes": 1,
                 "tx_bytes": 1, "persistent_keepalive": 0, "last_handshake": (0, 0)},
            ],
        },
        # continuation: same key as the last peer, only the remaining allowed IPs, no stats
        {"flags": 2, "peers": [{"public_key": K2, "allowed_ips": ["10.0.0.0/24"]}]},
        {"flags": 2, "peers": [{"public_key": K2, "allowed_ips": ["fd00::/64"]}]},
    ]  # fmt: skip
    state = merge_dump(parts)
    assert state.public_key == K3 and state.listen_port == 51820
    assert set(state.peers) == {K1, K2}
    assert state.peers[K2].allowed_ips == ("10.0.0.0/24", "10.1.0.0/24", "fd00::/64")
    assert state.peers[K2].rx_bytes == 1 and state.peers[K2].last_handshake is None
    assert state.peers[K1].last_handshake == pytest.approx(1700000000.5)
    assert state.configured_peers()[K1] == Peer(K1, ("10.44.0.10/32",), 25)


def test_merge_keeps_peers_from_every_message() -> None:
    parts: list[DumpPart] = [{"ifindex": 3, "peers": [{"public_key": K1, "allowed_ips": []}]}]
    parts += [{"peers": [{"public_key": k, "allowed_ips": []}]} for k in (K2, K3)]
    assert set(merge_dump(parts).peers) == {K1, K2, K3}


@pytest.mark.parametrize(
    "parts",
    [
        [],
        [{"peers": [{"public_key": K1}]}],  # no device part: we lost the first message
        [{"ifindex": 3, "flags": NLM_F_DUMP_INTR, "peers": []}],
        [{"ifindex": 3, "error": -5, "peers": []}],
        [{"ifindex": 3, "peers": [{"public_key": K1}, {"public_key": K2}, {"public_key": K1}]}],
        [{"ifindex": 3, "peers": [{"allowed_ips": []}]}],
    ],
    ids=["empty", "no-device", "interrupted", "error", "non-adjacent-repeat", "keyless"],
)
def test_merge_refuses_incomplete_or_inconsistent_dumps(parts: list[DumpPart]) -> None:
    with pytest.raises(WireGuardError):
        merge_dump(parts)


def _encoded_dump_message(ifindex: bool, peers: list[list[list[Any]]]) -> Any:
    """Encode and re-decode a real pyroute2 wgmsg, as the kernel's reply would arrive."""
    from pyroute2.netlink.generic.wireguard import wgmsg

    msg = wgmsg()
    msg["cmd"] = 0
    msg["version"] = 1
    msg["header"]["type"] = 30
    msg["header"]["flags"] = 2
    if ifindex:
        msg["attrs"].append(["WGDEVICE_A_IFINDEX", 9])
        msg["attrs"].append(["WGDEVICE_A_IFNAME", "wg0"])
        msg["attrs"].append(["WGDEVICE_A_PUBLIC_KEY", K3])
        msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", 51820])
    msg["attrs"].append(["WGDEVICE_A_PEERS", [{"attrs": attrs} for attrs in peers]])
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    return decoded


def _allowed(family: int, addr: str, mask: int) -> dict[str, Any]:
    return {"attrs": [["WGALLOWEDIP_A_FAMILY", family],
                      ["WGALLOWEDIP_A_IPADDR", inet_pton(family, addr)],
                      ["WGALLOWEDIP_A_CIDR_MASK", mask]]}  # fmt: skip


def test_part_from_real_pyroute2_messages() -> None:
    first = _encoded_dump_message(True, [[
        ["WGPEER_A_PUBLIC_KEY", K1],
        ["WGPEER_A_ENDPOINT", {"addr": "192.0.2.7", "port": 51820}],
        ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
        ["WGPEER_A_RX_BYTES", 1234],
        ["WGPEER_A_TX_BYTES", 5678],
        ["WGPEER_A_ALLOWEDIPS", [_allowed(AF_INET, "10.44.0.10", 32)]],
    ]])  # fmt: skip
    second = _encoded_dump_message(False, [[
        ["WGPEER_A_PUBLIC_KEY", K1],
        ["WGPEER_A_ALLOWEDIPS", [_allowed(AF_INET6, "fd00::", 64)]],
    ]])  # fmt: skip
    state = merge_dump([part_from_message(first), part_from_message(second)])
    assert state.public_key == K3 and state.listen_port == 51820
    stats = state.peers[K1]
    assert stats.allowed_ips == ("10.44.0.10/32", "fd00::/64")
    assert (stats.rx_bytes, stats.tx_bytes, stats.persistent_keepalive) == (1234, 5678, 25)
    assert stats.endpoint == "192.0.2.7:51820"


def test_split_endpoint() -> None:
    assert split_endpoint("192.0.2.1:51820") == ("192.0.2.1", 51820)
    assert split_endpoint("[fd00::1]:51820") == ("fd00::1", 51820)
    for bad in ("nohost", "example.com:51820", "1.2.3.4:port"):
        with pytest.raises(WireGuardError):
            split_endpoint(bad)


def _kernel_wireguard_available() -> tuple[bool, str]:
    ok, reason = can_run_netns()
    if not ok:
        return False, reason
    ns = f"dmt-{unique_tag()}-kwg"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        made = subprocess.run(
            ["ip", "-n", ns, "link", "add", "wgk0", "type", "wireguard"],
            capture_output=True,
            text=True,
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    if made.returncode != 0:
        return False, f"no kernel WireGuard: ip link add type wireguard: {made.stderr.strip()}"
    return True, ""


@pytest.mark.netns
async def test_kernel_backend_live() -> None:
    ok, reason = _kernel_wireguard_available()
    if not ok:
        pytest.skip(reason)
    # The kernel backend talks netlink in the current namespace; use a uniquely named link
    # in the root namespace and always remove it.
    ifname = f"wgk{unique_tag()}"
    await run("ip", "link", "add", ifname, "type", "wireguard")
    backend = KernelBackend(ifname)
    try:
        await backend.set_identity(base64.b64encode(os.urandom(32)).decode(), 0)
        desired = {
            k: Peer(k, (f"10.44.{i}.0/24", f"fd00:{i}::/64"))
            for i, k in enumerate(
                base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
                for _ in range(300)
            )
        }
        assert len((await reconcile(backend, desired)).add) == 300
        assert (await reconcile(backend, desired)).is_empty
    finally:
        await backend.close()
        await run("ip", "link", "del", ifname, check=False)
