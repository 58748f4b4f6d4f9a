"""End to end over real WireGuard: control plane, `damm gateway run` on wireguard-go, a device.

Each test builds two network namespaces joined by a veth (gateway 172.30.0.1, device
172.30.0.2), a wireguard-go daemon in each, and runs the agent as a real subprocess
(`python -m damm.cli.gateway run --wg uapi ...`) so it can be SIGKILLed.
Bounds stated here: a revoked peer is gone from the gateway, and ping fails, within 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from damm import netns as netlab
from damm.control.process import ControlPlane
from damm.device.wgconfig import render_wg_quick
from damm.private_files import write_atomic
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.stack.nats_server import NatsServer
from damm.wireguard.peer_diff import Peer, PeerDiff
from damm.wireguard.uapi import UapiBackend
from tests.fleet import enroll, keypair

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent
GW_ADDR, DEV_ADDR, PORT = "172.30.0.1", "172.30.0.2", 51820
REVOKE_BOUND_S = 2.0

_ok, _why = netlab.can_run_netns()
if not _ok:
    pytest.skip(f"network-namespace tests skipped: {_why}", allow_module_level=True)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll until ``check`` is true; return the seconds it took."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def parse_wg_quick(text: str) -> dict[str, dict[str, str]]:
    """The two sections of the file DAMM writes, as {section: {key: value}}."""
    out: dict[str, dict[str, str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].lower()
            out[section] = {}
        elif "=" in line:
            key, _, value = line.partition("=")
            out[section][key.strip().lower()] = value.strip()
    return out


@dataclass
class Site:
    lab: netlab.Lab
    tmp: Path
    nats_server: NatsServer
    gw_ns: str = ""
    dev_ns: str = ""
    gw_if: str = ""
    dev_if: str = ""
    token: str = ""
    gw_token: str = ""
    agent: subprocess.Popen[bytes] | None = None
    agent_args: tuple[str, ...] = ()
    gw: UapiBackend = field(init=False)
    dev: UapiBackend = field(init=False)

    async def build(self, admin: NATS) -> None:
        self.gw_ns = await self.lab.netns("gw")
        self.dev_ns = await self.lab.netns("dev")
        await self.lab.veth(self.gw_ns, self.dev_ns, f"{GW_ADDR}/24", f"{DEV_ADDR}/24")
        gwd = await self.lab.wireguard_go(self.gw_ns, "g")
        devd = await self.lab.wireguard_go(self.dev_ns, "d")
        self.gw_if, self.dev_if = gwd.ifname, devd.ifname
        self.gw, self.dev = UapiBackend(gwd.ifname), UapiBackend(devd.ifname)
        await netlab.configure_interface(self.gw_ns, self.gw_if, "10.44.0.1/24")
        await call(admin, "admin.tier.define", p.DefineTier(tier="gold", regions=("eu",)), p.Done)
        added = await call(
            admin,
            "admin.gateway.add",
            p.AddGateway(gateway_id="gw1", region="eu", front_door=f"udp://{GW_ADDR}:{PORT}"),
            p.GatewayAdded,
        )
        self.gw_token = added.token
        created = await call(
            admin, "admin.token.create", p.CreateToken(tier="gold"), p.TokenCreated
        )
        self.token = created.token

    def start_agent(self) -> None:
        env = dict(
            os.environ,
            DAMM_GATEWAY_TOKEN=self.gw_token,
            PYTHONPATH=str(ROOT),
            DAMM_LOG_FORMAT="json",
            DAMM_LOG_LEVEL="info",
        )
        log = open(self.tmp / "agent.log", "ab")  # noqa: SIM115 - handed to the child
        self.agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "damm.cli.gateway",
                "run",
                "--id",
                "gw1",
                "--wg",
                "uapi",
                "--interface",
                self.gw_if,
                "--listen-port",
                str(PORT),
                "--state-dir",
                str(self.tmp / "gw-state"),
                "--nats",
                self.nats_server.url,
                "--heartbeat-interval",
                "1",
                "--usage-interval",
                "0.5",
                *self.agent_args,
            ],
            env=env,
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
        log.close()

    def stop_agent(self, sig: int = signal.SIGTERM) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(sig)
            try:
                self.agent.wait(10)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        self.agent = None

    def agent_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.tmp / "agent.log").read_text()[-3000:]
        return ""

    async def gw_keys(self) -> dict[str, Peer]:
        return (await self.gw.read()).configured_peers()

    async def bring_up_device(self, enrolled: p.Enrolled, private: str) -> None:
        """Write the wg-quick file DAMM would write, read it back, and configure from it."""
        text = render_wg_quick(
            private,
            enrolled.address,
            enrolled.address6,
            enrolled.dns,
            enrolled.gateway_public_key,
            enrolled.endpoint,
            enrolled.allowed_ips,
        )
        path = self.tmp / "device.conf"
        write_atomic(path, text, 0o600)
        conf = parse_wg_quick(path.read_text())
        iface, peer = conf["interface"], conf["peer"]
        await self.dev.set_identity(iface["privatekey"], 0)
        allowed = peer["allowedips"].split(",")
        # wireguard-go quirk (see tests/test_netlab.py): endpoint first, keepalive after it.
        await self.dev.apply(PeerDiff(add=(Peer.build(peer["publickey"], allowed),)))
        await self.dev.set_peer_endpoint(peer["publickey"], peer["endpoint"])
        keepalive = int(peer.get("persistentkeepalive", "0"))
        await self.dev.apply(PeerDiff(update=(Peer.build(peer["publickey"], allowed, keepalive),)))
        for address in iface["address"].split(","):
            await netlab.add_address(self.dev_ns, self.dev_if, address.strip())
        await netlab.link_up(self.dev_ns, self.dev_if)


@pytest.fixture
async def site(
    control: ControlPlane, admin_nc: NATS, nats_server: NatsServer, tmp_path: Path
) -> AsyncIterator[Site]:
    assert control.leadership is not None
    await asyncio.wait_for(control.leadership.gained.wait(), 5)
    async with netlab.Lab() as lab:
        s = Site(lab, tmp_path, nats_server)
        try:
            await s.build(admin_nc)
            s.start_agent()
            state = control.ctx.state  # type: ignore[union-attr]

            async def healthy() -> bool:
                gw = state.gateways.get("gw1")
                return bool(gw and gw.registered and gw.last_heartbeat)

            try:
                await eventually(healthy, 15, "gateway registered and heartbeating")
            except AssertionError:
                raise AssertionError(s.agent_log()) from None
            yield s
        finally:
            s.stop_agent()


async def usage_of(dsn: str, device_id: str) -> tuple[int, int]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
    try:
        row = await conn.fetchrow(
            "SELECT coalesce(sum(rx_bytes),0) rx, coalesce(sum(tx_bytes),0)"
            " tx FROM usage_totals WHERE device_id=$1",
            device_id,
        )
    finally:
        await conn.close()
    return int(row["rx"]), int(row["tx"])


async def usage_matches_gateway(
    site: Site,
    control: ControlPlane,
    dsn: str,
    device_id: str,
    public_key: str,
    timeout: float = 15,
) -> tuple[int, int]:
    """Wait until the read model holds exactly what the gateway counted for that peer."""
    seen: list[tuple[int, int]] = []

    async def check() -> bool:
        stats = (await site.gw.read()).peers.get(public_key)
        if stats is None:
            return False
        got = await usage_of(dsn, device_id)
        seen[:] = [got, (stats.rx_bytes, stats.tx_bytes)]
        return got == (stats.rx_bytes, stats.tx_bytes)

    await control.wait_projected(timeout)
    try:
        await eventually(check, timeout, "usage totals equal gateway counters")
    except AssertionError:
        applied = [pr.applied_seq for pr in control.projectors]
        applied += [repr(t.exception()) for t in control._tasks if t.done()]
        raise AssertionError(
            f"usage vs gateway {seen}; projectors at {applied}\n{site.agent_log()}"
        ) from None
    return seen[0]


async def test_enroll_ping_usage_revoke(
    site: Site, control: ControlPlane, admin_nc: NATS, device_nc: NATS, dsn: str
) -> None:
    private, public = keypair()
    enrolled = await enroll(device_nc, site.token, public_key=public)
    assert enrolled.endpoint == f"{GW_ADDR}:{PORT}"
    gw_state = await site.gw.read()
    assert enrolled.gateway_public_key == gw_state.public_key
    took = await eventually(lambda: _has(site, public), 2, "peer on the gateway")
    assert (await site.gw_keys())[public].allowed_ips == ("10.44.0.10/32",)
    await site.bring_up_device(enrolled, private)
    if not await netlab.ping(site.dev_ns, "10.44.0.1", count=5, wait=5):
        dbg = []
        for ns in (site.gw_ns, site.dev_ns):
            for cmd in (("wg", "show"), ("ip", "addr"), ("ip", "route")):
                r = await netlab.exec_in(ns, *cmd, check=False)
                dbg.append(f"{ns} {cmd}: {r.stdout} {r.stderr}")
        raise AssertionError("\n".join(dbg))
    sent_tx = (await site.dev.read()).peers[enrolled.gateway_public_key].tx_bytes
    rx, _ = await usage_matches_gateway(site, control, dsn, enrolled.device_id, public)
    assert rx >= sent_tx > 5 * 84  # every byte the device sent was metered
    await call(
        admin_nc, "admin.device.revoke", p.DeviceAction(device_id=enrolled.device_id), p.Done
    )
    gone = await eventually(lambda: _gone(site, public), REVOKE_BOUND_S, "revoked peer removed")
    assert not await netlab.ping(site.dev_ns, "10.44.0.1", count=1, wait=1)
    print(
        f"peer applied {took * 1000:.0f} ms after enroll; removed {gone * 1000:.0f} ms after revoke"
    )


async def _has(site: Site, key: str) -> bool:
    return key in await site.gw_keys()


async def _gone(site: Site, key: str) -> bool:
    return key not in await site.gw_keys()


def desired(control: ControlPlane) -> dict[str, tuple[str, ...]]:
    return dict(control.ctx.state.peer_set("gw1"))  # type: ignore[union-attr]


async def test_sigkill_while_peers_change_converges(
    site: Site, control: ControlPlane, admin_nc: NATS, device_nc: NATS
) -> None:
    devices: list[str] = []
    stop = asyncio.Event()

    async def churn() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            dev = await enroll(device_nc, site.token, request_id=uuid.uuid4().hex)
            devices.append(dev.device_id)
            if n % 3 == 0:
                await call(
                    admin_nc,
                    "admin.device.revoke",
                    p.DeviceAction(device_id=devices[n // 3]),
                    p.Done,
                )
            if n % 4 == 0:
                await call(
                    admin_nc, "admin.device.suspend", p.DeviceAction(device_id=devices[-2]), p.Done
                )
            await asyncio.sleep(0.02)

    task = asyncio.create_task(churn())
    await asyncio.sleep(1.0)
    assert site.agent is not None
    site.agent.send_signal(signal.SIGKILL)
    site.agent.wait()
    site.agent = None
    await asyncio.sleep(1.0)  # changes keep coming while no agent listens
    _, stranger = keypair()  # and someone adds a peer by hand
    await site.gw.apply(PeerDiff(add=(Peer(stranger, ("10.99.0.1/32",)),)))
    site.start_agent()
    await asyncio.sleep(1.0)
    stop.set()
    await task

    async def converged() -> bool:
        want = desired(control)
        have = await site.gw_keys()
        return {k: v.allowed_ips for k, v in have.items()} == want

    try:
        await eventually(converged, 10, "interface equals the desired set")
    except AssertionError:
        raise AssertionError(site.agent_log()) from None
    assert len(desired(control)) >= 10 and stranger not in await site.gw_keys()


async def test_nats_outage_keeps_tunnel_and_usage(
    site: Site, control: ControlPlane, device_nc: NATS, nats_server: NatsServer, dsn: str
) -> None:
    private, public = keypair()
    enrolled = await enroll(device_nc, site.token, public_key=public)
    await eventually(lambda: _has(site, public), 2, "peer on the gateway")
    await site.bring_up_device(enrolled, private)
    assert await netlab.ping(site.dev_ns, "10.44.0.1", count=3, wait=5)
    port = int(nats_server.url.rsplit(":", 1)[1])
    nats_server.stop()
    try:
        # The packet path does not need the control plane: 20 pings across the outage.
        result = await netlab.exec_in(
            site.dev_ns,
            "ping",
            "-n",
            "-q",
            "-c",
            "20",
            "-i",
            "0.1",
            "-s",
            "1000",
            "10.44.0.1",
            check=False,
            time_limit=20,
        )
        assert result.ok, result.stdout
        await asyncio.sleep(1.5)  # several usage intervals pass with the bus down
    finally:
        nats_server.port = port
        nats_server.start()
    sent_tx = (await site.dev.read()).peers[enrolled.gateway_public_key].tx_bytes
    rx, _ = await usage_matches_gateway(site, control, dsn, enrolled.device_id, public, 30)
    assert rx >= sent_tx > 20 * 1000
