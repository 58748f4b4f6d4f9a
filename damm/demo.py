"""The demo `damm up` shows as root: a gateway and a device, each in its own network namespace.

It goes through the same doors as production: the admin API defines a tier, a gateway (front
door on the gateway namespace's veth address) and a token; the gateway agent registers and
follows its peer set on a real wireguard-go interface; the device generates its key, enrolls
over NATS, writes the wg-quick file DAMM writes, brings its tunnel up from it, and pings the
gateway's tunnel address. ``close()`` removes everything it created (namespaces, daemons).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from nacl.public import PrivateKey
from nats.aio.client import Client as NATS

from damm import log, netlab
from damm.agent.peers import Peer, PeerDiff
from damm.agent.runner import AgentConfig, GatewayAgent
from damm.agent.wg.uapi import UapiBackend
from damm.bus import connect
from damm.device.wgconfig import render_wg_quick, write_atomic
from damm.errors import Code, DammError
from damm.handlers import protocol as p
from damm.rpc import call

_log = log.get("damm.demo")

GW_ADDR, DEV_ADDR, PORT = "172.30.0.1", "172.30.0.2", 51820


def demo_possible() -> tuple[bool, str]:
    return netlab.can_run_netns()


@dataclass
class DemoHandle:
    lab: netlab.Lab
    gateway_id: str = ""
    device_id: str = ""
    device_address: str = ""
    gateway_address: str = ""
    config_path: Path | None = None
    ping_ok: bool = False
    gw_ns: str = ""
    dev_ns: str = ""
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _agent_task: asyncio.Task[None] | None = None

    def summary(self) -> list[str]:
        state = "works" if self.ping_ok else "did NOT answer"
        return [
            f"gateway {self.gateway_id} in netns {self.gw_ns} (wireguard-go, "
            f"front door {GW_ADDR}:{PORT}, tunnel {self.gateway_address})",
            f"device {self.device_id} in netns {self.dev_ns} with {self.device_address}, "
            f"config {self.config_path}",
            f"ping {self.gateway_address} across the tunnel: {state}",
            f"try: ip netns exec {self.dev_ns} ping {self.gateway_address}",
        ]

    async def close(self) -> None:
        self._stop.set()
        if self._agent_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._agent_task, 5)
        await self.lab.close()


async def run_demo(nats_url: str, gateway_password: str, admin_password: str,
                   state_dir: Path) -> DemoHandle:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # noqa: ASYNC240 - once, tiny
    handle = DemoHandle(netlab.Lab())
    try:
        await _build(handle, nats_url, gateway_password, admin_password, state_dir)
    except BaseException:
        await handle.close()
        raise
    return handle


async def _build(h: DemoHandle, nats_url: str, gateway_password: str, admin_password: str,
                 state_dir: Path) -> None:
    lab = h.lab
    h.gw_ns, h.dev_ns = await lab.netns("gw"), await lab.netns("dev")
    await lab.veth(h.gw_ns, h.dev_ns, f"{GW_ADDR}/24", f"{DEV_ADDR}/24")
    gwd, devd = await lab.wireguard_go(h.gw_ns, "g"), await lab.wireguard_go(h.dev_ns, "d")
    admin = await connect(nats_url, user="admin", password=admin_password, name="damm-demo")
    device_nc = await connect(nats_url, name="damm-demo-device")
    try:
        h.gateway_id = f"demo-{lab.tag}"
        await call(admin, "admin.tier.define", p.DefineTier(tier="demo", regions=("demo",)), p.Done)
        added = await call(admin, "admin.gateway.add", p.AddGateway(
            gateway_id=h.gateway_id, region="demo", front_door=f"{GW_ADDR}:{PORT}"),
            p.GatewayAdded)
        token = (await call(admin, "admin.token.create", p.CreateToken(tier="demo", uses=1),
                            p.TokenCreated)).token
        agent = GatewayAgent(AgentConfig(
            gateway_id=h.gateway_id, token=added.token, nats_url=nats_url,
            state_dir=state_dir / f"gateway-{lab.tag}", nats_password=gateway_password,
            listen_port=PORT, heartbeat_s=5, usage_s=10), UapiBackend(gwd.ifname))
        h._agent_task = asyncio.create_task(agent.run(h._stop))
        await asyncio.wait_for(agent.synced.wait(), 15)
        assert agent.registration is not None
        await netlab.configure_interface(h.gw_ns, gwd.ifname, agent.registration.gateway_address)
        h.gateway_address = agent.registration.gateway_address.split("/")[0]
        await asyncio.sleep(0.3)  # the first heartbeat makes the gateway placeable
        key = PrivateKey.generate()
        private = base64.b64encode(bytes(key)).decode()
        public = base64.b64encode(bytes(key.public_key)).decode()
        enrolled = await _enroll(device_nc, token, public)
        h.device_id, h.device_address = enrolled.device_id, enrolled.address
        text = render_wg_quick(private, enrolled.address, enrolled.address6, enrolled.dns,
                               enrolled.gateway_public_key, enrolled.endpoint,
                               enrolled.allowed_ips)
        h.config_path = state_dir / f"device-{lab.tag}.conf"
        write_atomic(h.config_path, text, 0o600)
        await _device_up(UapiBackend(devd.ifname), h.dev_ns, devd.ifname, private, enrolled)
        for _ in range(50):  # the peer reaches the gateway within milliseconds; bound it anyway
            if public in (await UapiBackend(gwd.ifname).read()).peers:
                break
            await asyncio.sleep(0.05)
        h.ping_ok = await netlab.ping(h.dev_ns, h.gateway_address, count=3, wait=5)
        _log.info("demo ready", ping_ok=h.ping_ok, device_id=h.device_id)
    finally:
        await admin.close()
        await device_nc.close()


async def _enroll(nc: NATS, token: str, public: str) -> p.Enrolled:
    request = p.Enroll(token=token, public_key=public, region="demo",
                       request_id=uuid.uuid4().hex)
    for attempt in range(20):  # until the gateway's first heartbeat is folded
        try:
            return await call(nc, "enroll", request, p.Enrolled)
        except DammError as err:
            if err.code is not Code.NO_HEALTHY_GATEWAY:
                raise
            await asyncio.sleep(0.1 * (attempt + 1))
    return await call(nc, "enroll", request, p.Enrolled)


async def _device_up(dev: UapiBackend, ns: str, ifname: str, private: str,
                     enrolled: p.Enrolled) -> None:
    await dev.set_identity(private, 0)
    gw = enrolled.gateway_public_key
    # wireguard-go: set the endpoint before the keepalive, or the first handshake stalls ~5 s.
    await dev.apply(PeerDiff(add=(Peer.build(gw, enrolled.allowed_ips),)))
    await dev.set_peer_endpoint(gw, enrolled.endpoint)
    await dev.apply(PeerDiff(update=(Peer.build(gw, enrolled.allowed_ips, 25),)))
    await netlab.add_address(ns, ifname, str(ipaddress.ip_interface(enrolled.address)))
    await netlab.link_up(ns, ifname)
