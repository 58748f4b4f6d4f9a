"""End to end in namespaces: the front door a device uses goes dark, the device fails over on a
signed catalog, and the ping comes back.

The gateway runs one wireguard-go listening on one port, reachable on two front-door addresses
(one veth pair each). Both WireGuard sides are configured by hand over the UAPI so the test does
not depend on the gateway agent.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nacl.bindings import crypto_scalarmult_base
from nats.aio.client import Client as NATS

from damm.catalog.canonical import decode
from damm.catalog.verify import initial_trust
from damm.cli.device import write_config
from damm.control.process import ControlPlane
from damm.control.publishers.catalogs import CatalogPublisher
from damm.device import files
from damm.device.failover import failover
from damm.device.wgconfig import parse_endpoint
from damm.netns import Lab, can_run_netns, configure_interface, run
from damm.netns import ping as lab_ping
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.protocol.router import Service
from damm.wireguard import reconcile
from damm.wireguard.peer_diff import Peer
from damm.wireguard.uapi import UapiBackend
from tests.fleet import heartbeat

CAN_RUN, WHY_NOT = can_run_netns()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not CAN_RUN, reason=WHY_NOT)]

FD1_ADDR, FD2_ADDR = "192.168.81.1", "192.168.82.1"
PORT = 51820


@pytest.fixture
async def publisher(control: ControlPlane) -> AsyncIterator[CatalogPublisher]:
    assert control.ctx is not None and control.nc is not None
    pub = CatalogPublisher(control.ctx, interval_s=0.2)
    service = Service(control.nc, pub.routes(), queue="catalog-e2e")
    await service.start()
    pub.start()
    yield pub
    await pub.stop()
    await service.stop()


async def test_failover_restores_the_tunnel(
    control: ControlPlane,
    publisher: CatalogPublisher,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    tmp_path: Path,
) -> None:
    assert control.ctx is not None
    gw_private = bytes(range(1, 33))
    gw_pub = base64.b64encode(crypto_scalarmult_base(gw_private)).decode()

    # Control plane: a gateway with two front doors, registered and heartbeating.
    await call(admin_nc, "admin.tier.define", p.DefineTier(tier="gold", regions=("eu",)), p.Done)
    added = await call(admin_nc, "admin.gateway.add",
                       p.AddGateway(gateway_id="gw1", region="eu",
                                    front_door=f"{FD1_ADDR}:{PORT}", priority=10),
                       p.GatewayAdded)  # fmt: skip
    await call(admin_nc, "admin.gateway.front_door",
               p.SetFrontDoor(gateway_id="gw1", front_door_id="fd2",
                              endpoint=f"{FD2_ADDR}:{PORT}", priority=20), p.Done)  # fmt: skip
    await call(gateway_nc, "gateway.register",
               p.RegisterGateway(gateway_id="gw1", token=added.token, public_key=gw_pub,
                                 listen_port=PORT), p.Registered)  # fmt: skip
    await heartbeat(gateway_nc, "gw1", added.token)
    token = await call(admin_nc, "admin.token.create", p.CreateToken(tier="gold"),
                       p.TokenCreated)  # fmt: skip

    # Device: key made locally, enrolled, config written (what `damm device enroll` does).
    state_dir = tmp_path / "device"
    dev_pub = files.generate_key(state_dir)
    res = await call(device_nc, "enroll",
                     p.Enroll(token=token.token, public_key=dev_pub, request_id=uuid.uuid4().hex),
                     p.Enrolled)  # fmt: skip
    assert res.endpoint == f"{FD1_ADDR}:{PORT}" and res.catalog is not None
    dev = files.DeviceFile(
        device_id=res.device_id, public_key=dev_pub, gateway_id=res.gateway_id,
        gateway_public_key=res.gateway_public_key, front_door_id=res.front_door_id,
        endpoint=res.endpoint, address=res.address, address6=res.address6,
        allowed_ips=res.allowed_ips, dns=res.dns, nats_url="nats://unused",
        rotation_key=res.rotation_key,
        trust=initial_trust(res.catalog.region, res.catalog.key_id, res.catalog.public_key,
                            res.catalog.min_version),
    )  # fmt: skip
    write_config(state_dir, dev)
    host = res.address.split("/")[0]
    files.save(state_dir, dev)

    async with Lab() as lab:
        gw_ns, dev_ns = await lab.netns("gw"), await lab.netns("dev")
        if1_gw, _ = await lab.veth(gw_ns, dev_ns, f"{FD1_ADDR}/24", "192.168.81.2/24")
        await lab.veth(gw_ns, dev_ns, f"{FD2_ADDR}/24", "192.168.82.2/24")
        gw_wg, dev_wg = await lab.wireguard_go(gw_ns, "g"), await lab.wireguard_go(dev_ns, "d")
        gw, device = UapiBackend(gw_wg.ifname), UapiBackend(dev_wg.ifname)

        await gw.set_identity(base64.b64encode(gw_private).decode(), PORT)
        await reconcile(gw, {dev_pub: Peer.build(dev_pub, [f"{host}/32"])})
        await device.set_identity(files.private_key(state_dir), 0)
        # Endpoint before keepalive (wireguard-go quirk, see test_netlab).
        await reconcile(device, {gw_pub: Peer.build(gw_pub, ["10.44.0.0/24"])})
        await device.set_peer_endpoint(
            gw_pub, parse_endpoint((state_dir / files.CONFIG).read_text())
        )
        await reconcile(device, {gw_pub: Peer.build(gw_pub, ["10.44.0.0/24"], 1)})
        await configure_interface(gw_ns, gw_wg.ifname, "10.44.0.1/24")
        await configure_interface(dev_ns, dev_wg.ifname, f"{host}/24")

        assert await lab_ping(dev_ns, "10.44.0.1", count=3, wait=5), "tunnel via front door 1"
        peer = (await device.read()).peers[gw_pub]
        assert peer.endpoint == f"{FD1_ADDR}:{PORT}"

        # Front door 1 goes dark, and the operator marks it inactive.
        await run("ip", "-n", gw_ns, "addr", "del", f"{FD1_ADDR}/24", "dev", if1_gw)
        await call(admin_nc, "admin.gateway.front_door",
                   p.SetFrontDoor(gateway_id="gw1", front_door_id="fd1",
                                  endpoint=f"{FD1_ADDR}:{PORT}", priority=10, active=False),
                   p.Done)  # fmt: skip
        await heartbeat(gateway_nc, "gw1", added.token)
        assert not await lab_ping(dev_ns, "10.44.0.1", count=1, wait=2)

        # Wait for the publisher (running on its own loop) to sign a catalog without fd1.
        deadline = time.monotonic() + 10
        while True:
            await control.ctx.follower.sync()
            latest = publisher.latest.get("eu")
            if latest is not None and latest.signed is not None:
                doors = [fd.id for g in decode(latest.signed.payload).gateways
                         for fd in g.front_doors]  # fmt: skip
                if doors == ["fd2"]:
                    break
            assert time.monotonic() < deadline, "publisher never dropped fd1"
            await publisher.tick()

        result = await failover(device_nc, state_dir, live_interface=dev_wg.ifname)
        assert result.new_endpoint == f"{FD2_ADDR}:{PORT}" and result.front_door_id == "fd2"
        assert result.live_updated
        assert parse_endpoint((state_dir / files.CONFIG).read_text()) == f"{FD2_ADDR}:{PORT}"
        assert (await device.read()).peers[gw_pub].endpoint == f"{FD2_ADDR}:{PORT}"

        assert await lab_ping(dev_ns, "10.44.0.1", count=3, wait=8), "tunnel via front door 2"
        saved = files.load(state_dir)
        assert saved.front_door_id == "fd2"
        assert saved.trust is not None and saved.trust.min_version == result.catalog_version
