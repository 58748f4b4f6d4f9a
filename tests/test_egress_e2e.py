"""Egress end to end: two devices with different exit countries, one gateway, an "internet".

Namespaces (all created here): a gateway on wireguard-go with `damm gateway run --egress
nftables`, two devices each on its own veth, and an "internet" namespace behind the gateway where
a UDP echo server records the source address of every datagram. Each device's traffic must
arrive from an address of its own exit country's pool, and never from the other's; revoking a
device removes its NAT element; an agent restart after tampering converges the table exactly.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from damm import netns as netlab
from damm.agent import egress as nat
from damm.control.process import ControlPlane
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.stack.nats_server import NatsServer
from damm.wireguard.uapi import UapiBackend
from tests.fleet import enroll, keypair
from tests.test_e2e_tunnel import Site, eventually

pytestmark = pytest.mark.netns

if shutil.which("nft") is None:
    pytest.skip("nftables (nft) is not installed", allow_module_level=True)

PORT = 51820
INTERNET = "192.0.2.10"
OVERLAY = "10.44.0.0/24"
POOLS = {"DE": ("eu-de", "198.51.100.0/30"), "NL": ("eu-nl", "203.0.113.0/30")}
ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
with open(sys.argv[3], "a", buffering=1) as out:
    out.write("ready\\n")
    while True:
        data, peer = s.recvfrom(2048)
        out.write(f"{peer[0]} {data.decode(errors='replace')}\\n")
        s.sendto(data, peer)
"""
SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
s.recvfrom(2048)
"""


class World:
    def __init__(self, lab: netlab.Lab, tmp: Path, nats_server: NatsServer) -> None:
        self.lab = lab
        self.tmp = tmp
        self.gateway = Site(lab, tmp, nats_server)
        self.devices: dict[str, Site] = {}
        self.inet_ns = ""
        self.echoes: list[asyncio.subprocess.Process] = []
        self.seen = tmp / "seen.txt"

    async def build(self, admin: NATS) -> str:
        g = self.gateway
        g.gw_ns = await self.lab.netns("gw")
        self.inet_ns = await self.lab.netns("inet")
        await netlab.exec_in(g.gw_ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        await self.lab.veth(g.gw_ns, self.inet_ns, "192.0.2.1/24", f"{INTERNET}/24")
        for _, cidr in POOLS.values():  # the internet routes the pools back to the gateway
            await netlab.run("ip", "-n", self.inet_ns, "route", "add", cidr, "via", "192.0.2.1")
        gwd = await self.lab.wireguard_go(g.gw_ns, "g")
        g.gw_if, g.gw = gwd.ifname, UapiBackend(gwd.ifname)
        await netlab.configure_interface(g.gw_ns, g.gw_if, "10.44.0.1/24")
        for n, role in enumerate(("a", "b")):
            dev = Site(self.lab, self.tmp / role, g.nats_server)
            dev.tmp.mkdir()
            dev.dev_ns = await self.lab.netns(f"d{role}")
            await self.lab.veth(g.gw_ns, dev.dev_ns, f"172.30.{n}.1/24", f"172.30.{n}.2/24")
            if n:  # the front door lives on the first link
                await netlab.run(
                    "ip", "-n", dev.dev_ns, "route", "add", "172.30.0.0/24", "via", f"172.30.{n}.1"
                )
            daemon = await self.lab.wireguard_go(dev.dev_ns, role)
            dev.dev_if, dev.dev = daemon.ifname, UapiBackend(daemon.ifname)
            self.devices[role] = dev
        await call(
            admin,
            "admin.tier.define",
            p.DefineTier(tier="gold", regions=("eu",), exit_countries=tuple(POOLS)),
            p.Done,
        )
        for country, (pool_id, cidr) in POOLS.items():
            await call(
                admin,
                "admin.egress.define",
                p.DefineEgress(pool_id=pool_id, region="eu", countries=(country,), ips=(cidr,)),
                p.Done,
            )
        added = await call(
            admin,
            "admin.gateway.add",
            p.AddGateway(gateway_id="gw1", region="eu", front_door=f"udp://172.30.0.1:{PORT}"),
            p.GatewayAdded,
        )
        g.gw_token = added.token
        g.agent_args = ("--egress", "nftables", "--egress-netns", g.gw_ns)
        created = await call(
            admin, "admin.token.create", p.CreateToken(tier="gold"), p.TokenCreated
        )
        await self.start_echo(self.inet_ns, INTERNET, 9999, self.seen)
        return created.token

    async def start_echo(self, ns: str, bind: str, port: int, record: Path) -> None:
        """A UDP echo server in ``ns`` that writes the source of every datagram to ``record``."""
        script = self.tmp / "echo.py"
        script.write_text(ECHO)
        self.echoes.append(
            await asyncio.create_subprocess_exec(
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                str(script),
                bind,
                str(port),
                str(record),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

        async def ready() -> bool:
            return _listening(record)

        await eventually(ready, 10, f"echo server listening in {ns}")

    async def send(self, role: str, tag: str, to: str = INTERNET, port: int = 9999) -> bool:
        """One datagram from a device (to the internet by default); True when echoed back."""
        dev = self.devices[role]
        result = await netlab.exec_in(
            dev.dev_ns, sys.executable, "-c", SEND, to, str(port), tag, check=False
        )
        return result.ok

    def sources(self, tag_prefix: str, record: Path | None = None) -> set[str]:
        out = set()
        for line in (record or self.seen).read_text().splitlines()[1:]:
            src, _, tag = line.partition(" ")
            if tag.startswith(tag_prefix):
                out.add(src)
        return out

    async def kernel_map(self) -> nat.NatState:
        backend = nat.Nftables(wrapper=("ip", "netns", "exec", self.gateway.gw_ns))
        return nat.parse(await backend.read(), OVERLAY)  # the agent's rule spares the overlay

    async def close(self) -> None:
        self.gateway.stop_agent()
        for echo in self.echoes:
            if echo.returncode is None:
                echo.terminate()
            try:
                await asyncio.wait_for(echo.wait(), 5)
            except TimeoutError:
                echo.kill()
                await echo.wait()


@pytest.fixture
async def egress_lab(
    control: ControlPlane, admin_nc: NATS, nats_server: NatsServer, tmp_path: Path
) -> AsyncIterator[tuple[World, str]]:
    assert control.leadership is not None
    await asyncio.wait_for(control.leadership.gained.wait(), 5)
    async with netlab.Lab() as lab:
        world = World(lab, tmp_path, nats_server)
        try:
            token = await world.build(admin_nc)
            world.gateway.start_agent()
            state = control.ctx.state  # type: ignore[union-attr]

            async def healthy() -> bool:
                gw = state.gateways.get("gw1")
                return bool(gw and gw.registered and gw.last_heartbeat)

            try:
                await eventually(healthy, 15, "gateway registered and heartbeating")
            except AssertionError:
                raise AssertionError(world.gateway.agent_log()) from None
            yield world, token
        finally:
            await world.close()


def wanted(control: ControlPlane) -> dict[str, str]:
    """The NAT map the log asks for: every active device on gw1 with an egress address."""
    state = control.ctx.state  # type: ignore[union-attr]
    return {
        d.address: d.egress_address
        for d in state.on_gateway("gw1")
        if d.status == "active" and d.egress_address
    }


async def test_each_device_leaves_from_its_own_pool(
    egress_lab: tuple[World, str], control: ControlPlane, admin_nc: NATS, device_nc: NATS
) -> None:
    world, token = egress_lab
    enrolled: dict[str, p.Enrolled] = {}
    for role, country in (("a", "DE"), ("b", "NL")):
        private, public = keypair()
        got = await enroll(device_nc, token, public_key=public, exit_country=country)
        assert got.egress_pool_id == POOLS[country][0]
        site = world.devices[role]
        await site.bring_up_device(got, private)
        await netlab.run(
            "ip", "-n", site.dev_ns, "route", "add", f"{INTERNET}/32", "dev", site.dev_if
        )
        enrolled[role] = got
    state = control.ctx.state  # type: ignore[union-attr]
    egress_of = {r: state.devices[e.device_id].egress_address for r, e in enrolled.items()}
    assert egress_of == {"a": "198.51.100.1", "b": "203.0.113.1"}

    async def converged() -> bool:
        have = await world.kernel_map()
        return have.intact and have.elements == wanted(control)

    try:
        await eventually(converged, 5, "NAT map equals the peer set")
    except AssertionError:
        raise AssertionError(world.gateway.agent_log()) from None
    for role in ("a", "b"):
        for i in range(5):
            assert await _send_eventually(world, role, f"{role}-{i}")
    assert world.sources("a-") == {egress_of["a"]}
    assert world.sources("b-") == {egress_of["b"]}

    # Between devices, traffic stays in the overlay and keeps its real source address.
    between = world.tmp / "between.txt"
    await world.start_echo(world.devices["b"].dev_ns, "0.0.0.0", 9998, between)

    async def a_to_b() -> bool:
        return await world.send("a", "peer-1", to="10.44.0.11", port=9998)

    await eventually(a_to_b, 5, "device a reaches device b through the gateway")
    assert world.sources("peer-", between) == {"10.44.0.10"}

    # Revoking b takes its NAT element (and its peer) off the gateway.
    await call(
        admin_nc, "admin.device.revoke", p.DeviceAction(device_id=enrolled["b"].device_id), p.Done
    )

    async def b_gone() -> bool:
        have = await world.kernel_map()
        return "10.44.0.11" not in have.elements and have.elements == wanted(control)

    await eventually(b_gone, 2, "revoked device's NAT element removed")
    assert not await world.send("b", "b-after-revoke")
    assert world.sources("b-after") == set()

    # Agent down; the table is tampered with and the fleet changes; the restart converges.
    world.gateway.stop_agent()
    gw_ns = world.gateway.gw_ns
    await netlab.exec_in(gw_ns, "nft", "add", "rule", "ip", "damm", "egress", "counter")
    await netlab.exec_in(
        gw_ns, "nft", "add", "element", "ip", "damm", "egress", "{ 10.44.0.99 : 203.0.113.2 }"
    )
    late = await enroll(device_nc, token, exit_country="NL")
    assert (
        state.devices[late.device_id].egress_address == "203.0.113.1"
    )  # b's address is free again
    world.gateway.start_agent()

    async def exact() -> bool:
        have = await world.kernel_map()
        return have.intact and have.elements == wanted(control)

    try:
        await eventually(exact, 10, "restarted agent converges the NAT table exactly")
    except AssertionError:
        raise AssertionError(world.gateway.agent_log()) from None
    ruleset = (await netlab.exec_in(gw_ns, "nft", "list", "ruleset")).stdout
    assert "counter" not in ruleset and "10.44.0.99" not in ruleset
    assert await _send_eventually(world, "a", "a-after-restart")
    assert world.sources("a-") == {egress_of["a"]}


def _listening(record: Path) -> bool:
    return record.exists() and "ready" in record.read_text()


async def _send_eventually(world: World, role: str, tag: str) -> bool:
    async def echoed() -> bool:
        return await world.send(role, tag)

    # A first handshake initiation sent before the gateway had the peer is retried by WireGuard
    # only after its 5 s rekey timeout: a 5 s wait failed on exactly that under load.
    await eventually(echoed, 12, f"device {role} reaches the internet")
    return True
