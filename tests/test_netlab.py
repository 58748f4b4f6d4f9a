"""The lab itself: a real two-namespace wireguard-go tunnel, and teardown that always happens."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from damm.netns import Lab, LabError, can_run_netns, configure_interface, exec_in, ping, run
from damm.wireguard import reconcile
from damm.wireguard.peer_diff import Peer
from damm.wireguard.uapi import UapiBackend

CAN_RUN, WHY_NOT = can_run_netns()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not CAN_RUN, reason=WHY_NOT)]


def keypair() -> tuple[str, str]:
    from nacl.bindings import crypto_scalarmult_base

    private = os.urandom(32)
    return (
        base64.b64encode(private).decode(),
        base64.b64encode(crypto_scalarmult_base(private)).decode(),
    )


async def test_two_namespace_tunnel_pings_across() -> None:
    async with Lab() as lab:
        gw_ns, dev_ns = await lab.netns("gw"), await lab.netns("dev")
        await lab.veth(gw_ns, dev_ns, "192.168.77.1/24", "192.168.77.2/24")
        assert await ping(dev_ns, "192.168.77.1")

        gw_wg, dev_wg = await lab.wireguard_go(gw_ns, "g"), await lab.wireguard_go(dev_ns, "d")
        gw, dev = UapiBackend(gw_wg.ifname), UapiBackend(dev_wg.ifname)
        gw_priv, gw_pub = keypair()
        dev_priv, dev_pub = keypair()
        await gw.set_identity(gw_priv, 51820)
        await dev.set_identity(dev_priv, 0)
        await reconcile(gw, {dev_pub: Peer.build(dev_pub, ["10.44.0.10/32"])})
        # wireguard-go quirk: a keepalive set before the peer has an endpoint fires a
        # handshake that fails and holds off the next attempt for ~5 s. Endpoint first.
        await reconcile(dev, {gw_pub: Peer.build(gw_pub, ["10.44.0.0/24"])})
        await dev.set_peer_endpoint(gw_pub, "192.168.77.1:51820")
        await reconcile(dev, {gw_pub: Peer.build(gw_pub, ["10.44.0.0/24"], 25)})

        await configure_interface(gw_ns, gw_wg.ifname, "10.44.0.1/24")
        await configure_interface(dev_ns, dev_wg.ifname, "10.44.0.10/24")

        assert await ping(dev_ns, "10.44.0.1", count=3, wait=5)
        assert await ping(gw_ns, "10.44.0.10", count=1, wait=3)
        seen = (await gw.read()).peers[dev_pub]
        assert seen.last_handshake is not None
        assert seen.rx_bytes > 0 and seen.tx_bytes > 0
        assert seen.endpoint is not None and seen.endpoint.startswith("192.168.77.2:")

        # removing the device from the gateway's peer set cuts the tunnel: enforcement works
        await reconcile(gw, {})
        assert not await ping(dev_ns, "10.44.0.1", count=1, wait=1)

        sockets = [gw_wg.socket_path, dev_wg.socket_path]
        names = [gw_ns, dev_ns]
    listed = (await run("ip", "netns", "list")).stdout
    assert not any(name in listed for name in names)
    assert not any(sock.exists() for sock in sockets)


async def test_lab_tears_down_after_an_error() -> None:
    created: list[str] = []
    socket: Path | None = None
    pid = 0
    with pytest.raises(RuntimeError, match="boom"):
        async with Lab() as lab:
            ns = await lab.netns("err")
            created.append(ns)
            daemon = await lab.wireguard_go(ns, "e")
            socket, pid = daemon.socket_path, daemon.pid
            assert (await exec_in(ns, "ip", "link", "show", daemon.ifname)).ok
            raise RuntimeError("boom")
    assert socket is not None and not socket.exists()
    assert daemon.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # stopped and reaped, not merely signalled
    assert created[0] not in (await run("ip", "netns", "list")).stdout


async def test_duplicate_interface_name_is_refused() -> None:
    async with Lab() as lab:
        a, b = await lab.netns("a"), await lab.netns("b")
        await lab.wireguard_go(a, "x")
        with pytest.raises(LabError, match="already exists"):
            await lab.wireguard_go(b, "x")


def test_can_run_netns_gives_a_reason() -> None:
    ok, reason = can_run_netns()
    assert ok and reason
