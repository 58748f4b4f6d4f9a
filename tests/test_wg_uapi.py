"""The UAPI backend: protocol parsing in isolation, then against a real wireguard-go."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from nacl.bindings import crypto_scalarmult_base
from nacl.public import PrivateKey

from damm.netns import Lab, WireGuardGo, can_run_netns, run
from damm.wireguard import WireGuardError, reconcile
from damm.wireguard.peer_diff import Peer, PeerDiff
from damm.wireguard.uapi import UapiBackend, build_set_request, parse_get_reply

CAN_RUN, WHY_NOT = can_run_netns()
needs_netns = [pytest.mark.netns, pytest.mark.skipif(not CAN_RUN, reason=WHY_NOT)]


def new_key() -> str:
    return base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()


def hexkey(b64: str) -> str:
    return base64.b64decode(b64).hex()


# --- protocol, no daemon -------------------------------------------------------------------


def test_parse_get_reply_multiple_peers() -> None:
    private = os.urandom(32)
    k1, k2 = new_key(), new_key()
    reply = (
        f"private_key={private.hex()}\nlisten_port=51820\nfwmark=0\n"
        f"public_key={hexkey(k1)}\npreshared_key={'0' * 64}\nprotocol_version=1\n"
        "endpoint=192.0.2.1:51820\nlast_handshake_time_sec=1700000000\n"
        "last_handshake_time_nsec=250000000\ntx_bytes=10\nrx_bytes=20\n"
        "persistent_keepalive_interval=25\nallowed_ip=10.44.0.10/32\nallowed_ip=fd00::/64\n"
        f"public_key={hexkey(k2)}\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"
        "tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\n"
        "errno=0\n\n"
    ).encode()
    state = parse_get_reply(reply)
    assert state.public_key == base64.b64encode(crypto_scalarmult_base(private)).decode()
    assert state.listen_port == 51820
    p1, p2 = state.peers[k1], state.peers[k2]
    assert p1.allowed_ips == ("10.44.0.10/32", "fd00::/64")
    assert p1.last_handshake == pytest.approx(1700000000.25)
    assert (p1.rx_bytes, p1.tx_bytes, p1.persistent_keepalive) == (20, 10, 25)
    assert p1.endpoint == "192.0.2.1:51820"
    assert p2.allowed_ips == () and p2.last_handshake is None and p2.endpoint is None


def test_parse_get_reply_without_identity() -> None:
    state = parse_get_reply(b"listen_port=0\nerrno=0\n\n")
    assert state.public_key is None and state.peers == {}


@pytest.mark.parametrize(
    "reply", [b"errno=-22\n\n", b"", b"listen_port=1\n\n", b"listen_port=x\nerrno=0\n\n"]
)
def test_parse_get_reply_refuses_errors_and_truncation(reply: bytes) -> None:
    with pytest.raises(WireGuardError):
        parse_get_reply(reply)


def test_private_key_never_in_errors() -> None:
    private = os.urandom(32).hex()
    with pytest.raises(WireGuardError) as info:
        parse_get_reply(f"private_key={private}\nbroken line\nerrno=0\n\n".encode())
    assert private not in str(info.value)


def test_build_set_request_is_one_transaction() -> None:
    k1, k2, k3 = new_key(), new_key(), new_key()
    change = PeerDiff(
        add=(Peer(k1, ("10.44.0.10/32",), 0),),
        remove=(k2,),
        update=(Peer(k3, ("10.44.0.11/32", "fd00::/64"), 25),),
    )
    text = build_set_request(change).decode()
    assert text.startswith("set=1\n") and text.endswith("\n\n") and text.count("\n\n") == 1
    assert text.index(hexkey(k2)) < text.index(hexkey(k3)) < text.index(hexkey(k1))
    assert f"public_key={hexkey(k2)}\nremove=true\n" in text
    assert (
        f"public_key={hexkey(k3)}\nupdate_only=true\nreplace_allowed_ips=true\n"
        "persistent_keepalive_interval=25\nallowed_ip=10.44.0.11/32\nallowed_ip=fd00::/64\n"
    ) in text
    assert f"public_key={hexkey(k1)}\nreplace_allowed_ips=true\nallowed_ip=10.44.0.10/32\n" in text


async def test_missing_socket_is_a_clear_error(tmp_path: object) -> None:
    backend = UapiBackend("wgnope", f"{tmp_path}/wgnope.sock")
    with pytest.raises(WireGuardError, match="no UAPI listener"):
        await backend.read()


# --- against wireguard-go ------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def daemon() -> AsyncIterator[WireGuardGo]:
    async with Lab() as lab:
        ns = await lab.netns("uapi")
        yield await lab.wireguard_go(ns, "u")


def wg_dump(lines: str) -> tuple[list[str], dict[str, Peer], dict[str, str]]:
    """Parse ``wg show IF dump`` into (interface fields, configured peers, endpoints)."""
    rows = [line.split("\t") for line in lines.strip().splitlines()]
    peers: dict[str, Peer] = {}
    endpoints: dict[str, str] = {}
    for key, _psk, endpoint, allowed, _hs, _rx, _tx, keepalive in rows[1:]:
        ips = () if allowed == "(none)" else tuple(sorted(allowed.split(",")))
        peers[key] = Peer(key, ips, 0 if keepalive == "off" else int(keepalive))
        endpoints[key] = endpoint
    return rows[0], peers, endpoints


def desired_set(count: int, start: int = 0) -> dict[str, Peer]:
    out = {}
    for i in range(start, start + count):
        key = new_key()
        out[key] = Peer(key, (f"10.{44 + i // 65536}.{i // 256 % 256}.{i % 256}/32",))
    return out


@pytest.mark.netns
@pytest.mark.skipif(not CAN_RUN, reason=WHY_NOT)
async def test_identity_then_1000_peers_round_trip(daemon: WireGuardGo) -> None:
    backend = UapiBackend(daemon.ifname)
    assert backend.socket_path == daemon.socket_path
    private = new_key()
    await backend.set_identity(private, 51820)
    state = await backend.read()
    expected_pub = base64.b64encode(crypto_scalarmult_base(base64.b64decode(private))).decode()
    assert state.public_key == expected_pub and state.listen_port == 51820
    assert private not in repr(state)

    desired = desired_set(1000)
    change = await reconcile(backend, desired)
    assert len(change.add) == 1000 and not change.remove and not change.update
    assert (await backend.read()).configured_peers() == desired

    head, shown, _ = wg_dump((await run("wg", "show", daemon.ifname, "dump")).stdout)
    assert head[1] == expected_pub and head[2] == "51820"
    assert shown == desired

    # remove 100, update 100 (new IPs / keepalive), add 50; keep the other 800 untouched
    keys = sorted(desired)
    for key in keys[:100]:
        del desired[key]
    for n, key in enumerate(keys[100:200]):
        ips = [f"10.99.{n}.0/24"] + ([f"fd00:{n:x}::/64"] if n % 2 else [])
        desired[key] = Peer(key, tuple(sorted(ips)), 25 if n % 3 else 0)
    desired.update(desired_set(50, start=5000))
    change = await reconcile(backend, desired)
    assert change.summary() == "add=50 remove=100 update=100"
    assert (await backend.read()).configured_peers() == desired
    _, shown, _ = wg_dump((await run("wg", "show", daemon.ifname, "dump")).stdout)
    assert shown == desired
    assert (await reconcile(backend, desired)).is_empty

    # clearing a keepalive must reach the daemon (keepalive=0 is written, not omitted)
    key = keys[150]
    desired[key] = Peer(key, desired[key].allowed_ips, 0)
    assert len((await reconcile(backend, desired)).update) == 1
    assert (await backend.read()).peers[key].persistent_keepalive == 0

    await backend.set_peer_endpoint(key, "192.0.2.44:51999")
    _, _, endpoints = wg_dump((await run("wg", "show", daemon.ifname, "dump")).stdout)
    assert endpoints[key] == "192.0.2.44:51999"
    assert (await backend.read()).peers[key].endpoint == "192.0.2.44:51999"

    assert (await reconcile(backend, {})).summary() == f"add=0 remove={len(desired)} update=0"
    assert (await backend.read()).peers == {}


@pytest.mark.netns
@pytest.mark.skipif(not CAN_RUN, reason=WHY_NOT)
async def test_daemon_errors_raise(daemon: WireGuardGo) -> None:
    backend = UapiBackend(daemon.ifname)
    bad = Peer(new_key(), ("10.0.0.0/33",))  # built raw, bypassing validation
    with pytest.raises(WireGuardError, match="errno=-22"):
        await backend.apply(PeerDiff(add=(bad,)))
    with pytest.raises(WireGuardError, match="errno"):
        await backend.set_peer_endpoint(new_key(), "not-an-endpoint:x")
    # an unknown operation makes wireguard-go hang up without any errno line
    with pytest.raises(WireGuardError, match="without a reply"):
        await backend._transact(b"bogus=1\n\n")
    # and the daemon is still fine afterwards
    await backend.read()
