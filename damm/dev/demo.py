"""The demo `damm up` shows as root: a gateway and a device, each in its own network namespace.

It goes through the same doors as production: the admin API defines a tier and a token; the
orchestrator plans and applies a one-gateway topology on the `netns` provider, so the gateway
host (a namespace on the provider bridge, front doors fd1 and fd2 as two bridge addresses) runs
`damm gateway run`, which makes its wireguard-go interface, registers and heartbeats; the device
generates its key, enrolls over NATS, writes the state dir `damm device enroll` writes
(``device.json`` with the catalog trust pinned from the reply, ``wg0.conf``), brings its tunnel
up through fd1 and pings the gateway's tunnel address. Then fd1 goes dark (its address is
removed) and is marked inactive; the device runs the real failover (signed catalog, verified
against its pinned trust, live interface updated) and pings again, now through fd2.
``close()`` removes everything it created (namespaces, daemons).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS

from damm import log, private_files
from damm import netns as netlab
from damm.device import files
from damm.device.failover import (
    FailoverResult,
    device_trust,
    failover,
    fetch_catalog,
    verify_for_device,
)
from damm.device.profile import save_enrollment
from damm.device.standing import check_in
from damm.errors import Code, DammError
from damm.orchestrator import actions as a
from damm.orchestrator import topology as topo
from damm.orchestrator.apply import gateway_token, load_secret
from damm.orchestrator.loop import Orchestrator, build_providers
from damm.orchestrator.providers.base import HostSpec
from damm.orchestrator.providers.netns import NetnsProvider
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.reports import report
from damm.wireguard.peer_diff import Peer, PeerDiff
from damm.wireguard.uapi import UapiBackend

_log = log.get("damm.dev.demo")

PORT = 51820
REGION = "demo"
# The provider bridge's subnet: the gateway's fd1 and fd2 take its first two addresses.
SUBNET = "172.30.0.0/24"
FD1_ADDR, FD2_ADDR = "172.30.0.1", "172.30.0.2"
FD1, FD2 = f"{FD1_ADDR}:{PORT}", f"{FD2_ADDR}:{PORT}"
FD1_PRIORITY, FD2_PRIORITY = 10, 20
CATALOG_WAIT_S = 20.0
HEALTHY_WAIT_S = 20.0
_RTT = re.compile(r"= [\d.]+/([\d.]+)/")


TOPOLOGY = topo.Topology(
    providers={"demo": topo.Provider(kind="netns", subnet=SUBNET, heartbeat_s=2.0)},
    regions={REGION: topo.Region(provider="demo", gateways=1, front_doors=("fd1", "fd2"))},
    guardrails=topo.Guardrails(cooldown_s=0),
)


def demo_possible() -> tuple[bool, str]:
    return netlab.can_run_netns()


@dataclass
class DemoHandle:
    lab: netlab.Lab
    gateway_id: str = ""
    device_id: str = ""
    device_address: str = ""
    gateway_address: str = ""
    state_dir: Path | None = None  # the device's, as `damm device enroll` writes it
    config_path: Path | None = None
    gw_ns: str = ""
    dev_ns: str = ""
    dev_ifname: str = ""
    enroll_ms: float = 0.0
    gateway_restarted: bool = False  # the host the last demo on this data stopped, booted again
    reused: bool = False  # the device of the last demo on the same data
    # Step 1: tunnel through fd1.
    first_door: str = ""
    first_endpoint: str = ""
    tunnel_ms: float = 0.0
    ping_ok: bool = False
    ping_rtt_ms: float | None = None
    # Step 2: the signed catalog lists both front doors.
    catalog_version: int = 0
    catalog_doors: tuple[str, ...] = ()
    catalog_wait_ms: float = 0.0
    # Step 3: fd1 cut, failover to fd2.
    cut_confirmed: bool = False  # the ping through fd1 stopped answering
    failover_result: FailoverResult | None = None
    failover_ms: float = 0.0
    failover_ping_ok: bool = False
    failover_ping_rtt_ms: float | None = None
    recovery_ms: float = 0.0  # failover start to the first answered ping through fd2
    failover_error: str = ""
    plan_lines: tuple[str, ...] = ()  # what the orchestrator planned, with its reasons
    _admin: tuple[str, str] = ("", "")  # NATS URL and admin password, to retire the gateway
    _provider: NetnsProvider | None = None

    @property
    def ok(self) -> bool:
        return self.ping_ok and self.failover_ping_ok

    def summary(self) -> list[str]:
        lines = [
            *self.plan_lines,
            f"gateway {self.gateway_id} in netns {self.gw_ns} (wireguard-go, tunnel "
            f"{self.gateway_address})"
            + ("; its host restarted from the last demo" if self.gateway_restarted else ""),
            f"front doors fd1 {FD1} (priority {FD1_PRIORITY}), fd2 {FD2} (priority {FD2_PRIORITY})",
            f"device {self.device_id} in netns {self.dev_ns} with {self.device_address}, "
            + (
                "reused from the last demo"
                if self.reused
                else f"enrolled in {self.enroll_ms:.0f} ms"
            ),
            f"device state {self.state_dir} (device.json, wg0.conf)",
        ]
        if self.ping_ok:
            lines.append(
                f"tunnel up via {self.first_door} {self.first_endpoint} in "
                f"{self.tunnel_ms:.0f} ms, ping {self.gateway_address} {_rtt(self.ping_rtt_ms)}"
            )
        else:
            lines.append(
                f"tunnel via {self.first_door} {self.first_endpoint}: "
                f"ping {self.gateway_address} did NOT answer"
            )
        if self.catalog_version:
            lines.append(
                f"catalog v{self.catalog_version} (signature verified with the enrolled trust) "
                f"lists {', '.join(self.catalog_doors)}; waited {self.catalog_wait_ms:.0f} ms"
            )
        res = self.failover_result
        if res is not None:
            cut = "ping lost" if self.cut_confirmed else "ping still answered (not cut?)"
            after = (
                f"ping ok {_rtt(self.failover_ping_rtt_ms)}, tunnel back "
                f"{self.recovery_ms:.0f} ms after failover began"
                if self.failover_ping_ok
                else f"ping {self.gateway_address} did NOT answer"
            )
            lines.append(f"fd1 cut: address removed, marked inactive; {cut}")
            lines.append(
                f"failover to {res.front_door_id} {res.new_endpoint} in {self.failover_ms:.0f} ms "
                f"(catalog v{res.catalog_version}, {res.live_interface} updated); {after}"
            )
        elif self.failover_error:
            lines.append(f"failover did NOT happen: {self.failover_error}")
        lines.append(
            f"try: ip netns exec {self.dev_ns} ping {self.gateway_address}  ·  "
            f"damm device show --state-dir {self.state_dir}"
        )
        return lines

    async def close(self) -> None:
        if self.gateway_id and self._admin[0]:
            # Its heartbeat stays fresh for a while: a demo started right after this one must
            # not place its device on a gateway whose namespace is gone.
            await _retire(*self._admin, [self.gateway_id])
        if self._provider is not None:
            # The host's namespace, processes and the bridge go; its record and key stay, so the
            # next demo on this data boots the same gateway again.
            await self._provider.stop()
        await self.lab.close()


def _rtt(ms: float | None) -> str:
    return f"{ms:.2f} ms" if ms is not None else "ok"


def _ms(since: float) -> float:
    return (time.monotonic() - since) * 1000


async def run_demo(
    nats_url: str, admin_password: str, database_url: str, state_dir: Path
) -> DemoHandle:
    private_files.private_dir(state_dir)
    handle = DemoHandle(netlab.Lab(), _admin=(nats_url, admin_password))
    try:
        await _build(handle, nats_url, admin_password, database_url, state_dir)
    except BaseException:
        await handle.close()
        raise
    return handle


async def _kept_device(nc: NATS, dev_dir: Path, gateway_id: str) -> files.DeviceFile | None:
    """The last demo's device, when the control plane still has it active on this gateway."""
    try:
        dev = files.load(dev_dir)
        if dev.gateway_id != gateway_id:
            return None
        await check_in(nc, dev_dir, dev)
    except DammError as err:
        _log.info("not reusing the demo device", reason=err.line())
        return None
    if dev.front_door_id != "fd1":
        # The last demo failed it over to fd2: a failover back (fd1 is active again) puts it
        # where the demo starts, with the control plane told.
        await _wait_for_door(nc, dev_dir, gateway_id, "fd1")
        await failover(nc, dev_dir)
        dev = files.load(dev_dir)
    return dev


async def _device_connection(nats_url: str, dev_dir: Path) -> NATS:
    """The demo device on the bus under its own identity, kept in its state dir beside
    device.json as `damm device enroll` keeps it, so the CLI can carry on with that dir."""
    identity = files.identity_seed(dev_dir, create=True)
    return await connect(nats_url, name="damm-demo-device", identity_seed=identity)


async def _build(
    h: DemoHandle, nats_url: str, admin_password: str, database_url: str, state_dir: Path
) -> None:
    lab = h.lab
    h.dev_ns = await lab.netns("dev")
    devd = await lab.wireguard_go(h.dev_ns, "d")
    h.dev_ifname = devd.ifname
    admin = await connect(nats_url, user="admin", password=admin_password, name="damm-demo")
    dev_dir = h.state_dir = state_dir / "device"
    device_nc = await _device_connection(nats_url, dev_dir)
    try:
        orch_dir = state_dir / "orchestrator"
        providers = build_providers(TOPOLOGY, orch_dir)
        provider = providers["demo"]
        assert isinstance(provider, NetnsProvider)
        h._provider = provider
        await _retire_stale(admin, state_dir)
        await call(admin, "admin.tier.define", p.DefineTier(tier="demo", regions=(REGION,)), p.Done)
        orch = Orchestrator(admin, database_url, TOPOLOGY, providers, orch_dir, nats_url)
        h.gateway_restarted = await _restart_hosts(admin, orch, provider)
        plan = await orch.plan()
        h.plan_lines = tuple(
            f"orchestrator: {a.kind_of(x)} {a.target_of(x)}: {x.reason}" for x in plan.actions
        ) or ("orchestrator: nothing to do, the topology holds",)
        for step in await orch.apply(plan):
            if step.outcome == "failed":
                raise DammError(Code.PROVIDER_FAILED, step.error)
        running = [x for x in await provider.list() if x.state == "running"]
        if len(running) != 1:
            raise DammError(
                Code.INTERNAL,
                f"the demo wants one gateway host, {len(running)} run: {h.plan_lines}",
            )
        h.gateway_id, h.gw_ns = running[0].gateway_id, running[0].provider_ref
        gw_ifname, h.gateway_address = await _tunnel_address(h.gw_ns)
        await provider.attach_client(h.dev_ns, f"dev-{lab.tag}")

        # The device: the last demo's if the control plane still has it, else a new one with its
        # key made locally, enrolled, the state dir `damm device enroll` writes.
        started = time.monotonic()
        kept = await _kept_device(device_nc, dev_dir, h.gateway_id)
        if kept is not None:
            dev, h.config_path, h.reused = kept, dev_dir / files.CONFIG, True
        else:
            await device_nc.close()
            await asyncio.to_thread(shutil.rmtree, dev_dir, ignore_errors=True)
            public = files.generate_key(dev_dir)
            device_nc = await _device_connection(nats_url, dev_dir)
            token = (
                await call(
                    admin, "admin.token.create", p.CreateToken(tier="demo", uses=1), p.TokenCreated
                )
            ).token
            enrolled = await _enroll(device_nc, token, public)
            dev, h.config_path = save_enrollment(dev_dir, enrolled, public, nats_url)
            # The callout placed this connection while its key was not enrolled yet (enroll
            # and catalog only); connecting again lands it in the device account.
            await device_nc.close()
            device_nc = await _device_connection(nats_url, dev_dir)
        h.enroll_ms = _ms(started)
        h.device_id, h.device_address = dev.device_id, dev.address
        h.first_door, h.first_endpoint = dev.front_door_id, dev.endpoint

        started = time.monotonic()
        await _device_up(
            UapiBackend(devd.ifname), h.dev_ns, devd.ifname, files.private_key(dev_dir), dev
        )
        # A handshake the gateway drops (the peer not applied yet) is retried only after 5 s
        # (WireGuard's rekey timeout): the ping's budget covers one such retry.
        await _gateway_has_peer(UapiBackend(gw_ifname), dev.public_key)
        h.ping_ok, h.ping_rtt_ms = await _ping(h.dev_ns, h.gateway_address, count=3, wait=12)
        h.tunnel_ms = _ms(started)
        _log.info("demo tunnel up", ping_ok=h.ping_ok, device_id=h.device_id)
        if not h.ping_ok:
            return
        if dev.gateway_id != h.gateway_id or dev.front_door_id != "fd1":
            h.failover_error = (
                f"enrolled via {dev.gateway_id}/{dev.front_door_id}, not {h.gateway_id}/fd1"
            )
            return
        try:
            await _failover_step(h, admin, device_nc)
        except (DammError, TimeoutError, netlab.LabError) as exc:
            h.failover_error = exc.line() if isinstance(exc, DammError) else str(exc) or "timeout"
            _log.warning("demo failover failed", error=h.failover_error)
        _log.info("demo ready", ping_ok=h.ping_ok, failover_ok=h.failover_ping_ok)
    finally:
        await admin.close()
        await device_nc.close()


async def _tunnel_address(ns: str, timeout: float = 20.0) -> tuple[str, str]:
    """The gateway's interface and tunnel address, once its agent registered and set it."""
    deadline = time.monotonic() + timeout
    while True:
        shown = await netlab.exec_in(ns, "ip", "-o", "-4", "addr", "show", check=False)
        for line in shown.stdout.splitlines():
            fields = line.split()
            if len(fields) > 3 and fields[1].startswith("wgo"):
                return fields[1], fields[3].split("/")[0]
        if time.monotonic() > deadline:
            raise DammError(Code.UNAVAILABLE, f"the demo gateway in {ns} set no tunnel address")
        await asyncio.sleep(0.1)


async def _gateway_has_peer(gateway: UapiBackend, public_key: str, timeout: float = 10.0) -> None:
    """Wait (bounded) until the gateway's agent applied the device from its peer set."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if public_key in (await gateway.read()).peers:
            return
        await asyncio.sleep(0.05)


async def _retire(nats_url: str, admin_password: str, gateway_ids: list[str]) -> None:
    """Mark demo gateways inactive (best effort, bounded): nothing may be placed on them."""
    with contextlib.suppress(Exception):
        admin = await connect(nats_url, user="admin", password=admin_password, name="damm-demo")
        try:
            await _retire_with(admin, gateway_ids)
        finally:
            await admin.close()


async def _retire_with(admin: NATS, gateway_ids: list[str]) -> None:
    for gateway_id in gateway_ids:
        request = p.SetGatewayStatus(gateway_id=gateway_id, active=False, reason="demo closed")
        with contextlib.suppress(DammError, TimeoutError):
            await call(admin, "admin.gateway.status", request, p.Done, timeout=3.0)


async def _restart_hosts(admin: NATS, orch: Orchestrator, provider: NetnsProvider) -> bool:
    """Boot again, under its own id and key, the gateway host the last demo on this data stopped.

    A stopped host is not a dead one: left to the plan, it would be replaced by a new gateway at
    every restart, and the old ones would pile up in the control plane. Returns whether one was.
    """
    hosts = await provider.list()
    if not hosts:
        return False
    secret = await asyncio.to_thread(load_secret, orch.state_dir)
    doors = TOPOLOGY.regions[REGION].front_doors
    back = set()
    for host in hosts:
        try:  # the last demo's close disabled it
            enable = p.SetGatewayStatus(gateway_id=host.gateway_id, active=True)
            await call(admin, "admin.gateway.status", enable, p.Done)
        except DammError as err:
            if err.code is not Code.NOT_FOUND:
                raise
            _log.info("the demo host's gateway is gone from this log", gateway_id=host.gateway_id)
            await provider.destroy(host.gateway_id)
            continue
        if host.state != "running":
            await provider.create(
                HostSpec(
                    gateway_id=host.gateway_id,
                    region=REGION,
                    token=gateway_token(secret, host.gateway_id),
                    nats_url=orch.agent_nats_url,
                    front_doors=doors,
                )
            )
            back.add(host.gateway_id)
    # Its last heartbeat may be old enough for the plan to call it dead: wait for a fresh one.
    await _wait_healthy(orch, back)
    return bool(back)


async def _wait_healthy(orch: Orchestrator, gateway_ids: set[str]) -> None:
    deadline = time.monotonic() + HEALTHY_WAIT_S
    while gateway_ids:
        rep = await report.generate(orch.database_url, ttl_s=orch.heartbeat_ttl_s)
        if gateway_ids <= {g.gateway_id for g in rep.gateways if g.status == "healthy"}:
            return
        if time.monotonic() > deadline:
            _log.warning("restarted demo gateway not healthy yet", gateway_ids=sorted(gateway_ids))
            return  # the plan then says what it makes of it
        await asyncio.sleep(0.25)


async def _retire_stale(admin: NATS, state_dir: Path) -> None:
    """Retire the gateways demos made themselves, before the orchestrator did, and drop their
    files: one per run (``gateway-TAG``), then one kept in ``gateway.json`` and ``gateway/``."""
    stale = await asyncio.to_thread(_earlier_runs, state_dir)
    gateways = [
        "demo-" + d.name.removeprefix("gateway-") for d in stale if d.name.startswith("gateway-")
    ]
    kept = state_dir / "gateway.json"
    with contextlib.suppress(OSError, msgspec.DecodeError, msgspec.ValidationError):
        gateways.append(msgspec.json.decode(kept.read_bytes(), type=_KeptGateway).gateway_id)
    await _retire_with(admin, gateways)
    kept.unlink(missing_ok=True)
    for old in stale:
        await asyncio.to_thread(shutil.rmtree, old, ignore_errors=True)


class _KeptGateway(msgspec.Struct):
    gateway_id: str


def _earlier_runs(state_dir: Path) -> list[Path]:
    """Files of earlier demos' own gateways and devices (``device`` is the current device's)."""
    runs = [*state_dir.glob("gateway-*"), *state_dir.glob("device-*"), state_dir / "gateway"]
    return sorted(d for d in runs if d.is_dir())


async def _failover_step(h: DemoHandle, admin: NATS, device_nc: NATS) -> None:
    assert h.state_dir is not None
    # The signed catalog must list both doors before fd1 goes: the device needs somewhere to go.
    started = time.monotonic()
    h.catalog_version, h.catalog_doors = await _wait_for_door(
        device_nc, h.state_dir, h.gateway_id, "fd2"
    )
    h.catalog_wait_ms = _ms(started)

    # fd1 goes dark, and the operator marks it inactive.
    assert h._provider is not None
    await h._provider.remove_front_door(h.gateway_id, "fd1")
    await call(admin, "admin.gateway.front_door", p.SetFrontDoor(
        gateway_id=h.gateway_id, front_door_id="fd1", endpoint=FD1, priority=FD1_PRIORITY,
        active=False), p.Done)  # fmt: skip
    h.cut_confirmed = not (await _ping(h.dev_ns, h.gateway_address, count=1, wait=1))[0]

    started = time.monotonic()
    h.failover_result = await failover(device_nc, h.state_dir, live_interface=h.dev_ifname)
    h.failover_ms = _ms(started)
    for _ in range(8):  # the first answer after the move tells how long the tunnel was gone
        ok, _rtt_ms = await _ping(h.dev_ns, h.gateway_address, count=1, wait=1)
        if ok:
            h.recovery_ms = _ms(started)
            break
    h.failover_ping_ok, h.failover_ping_rtt_ms = await _ping(
        h.dev_ns, h.gateway_address, count=3, wait=5
    )


async def _wait_for_door(
    nc: NATS, state_dir: Path, gateway_id: str, door: str
) -> tuple[int, tuple[str, ...]]:
    """Poll `catalog.get` until a catalog, verified with the device's trust, lists ``door``."""
    trust = device_trust(files.load(state_dir))
    deadline = time.monotonic() + CATALOG_WAIT_S
    while True:
        try:
            checked = verify_for_device(
                await fetch_catalog(nc, trust.region), trust, now=int(time.time())
            )
        except DammError as exc:
            if exc.code is not Code.NOT_FOUND:
                raise
        else:
            gw = next((g for g in checked.catalog.gateways if g.id == gateway_id), None)
            doors = tuple(fd.id for fd in gw.front_doors) if gw is not None else ()
            if door in doors:
                return checked.catalog.version, doors
        if time.monotonic() > deadline:
            raise DammError(
                Code.UNAVAILABLE,
                f"no catalog listed {door} of {gateway_id} within {CATALOG_WAIT_S:.0f}s",
            )
        await asyncio.sleep(0.2)


async def _ping(ns: str, addr: str, *, count: int, wait: float) -> tuple[bool, float | None]:
    """Like `netlab.ping`, also returning the average round trip in ms when one came back."""
    result = await netlab.exec_in(
        ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-w", str(max(1, round(wait))),
        addr, check=False, time_limit=wait + 5,
    )  # fmt: skip
    if not result.ok:
        return False, None
    match = _RTT.search(result.stdout)
    return True, float(match.group(1)) if match else None


async def _enroll(nc: NATS, token: str, public: str) -> p.Enrolled:
    request = p.Enroll(token=token, public_key=public, region=REGION, request_id=uuid.uuid4().hex)
    for attempt in range(20):  # until the gateway's first heartbeat is folded
        try:
            return await call(nc, "enroll", request, p.Enrolled)
        except DammError as err:
            if err.code is not Code.NO_HEALTHY_GATEWAY:
                raise
            await asyncio.sleep(0.1 * (attempt + 1))
    return await call(nc, "enroll", request, p.Enrolled)


async def _device_up(
    dev: UapiBackend, ns: str, ifname: str, private: str, state: files.DeviceFile
) -> None:
    await dev.set_identity(private, 0)
    gw = state.gateway_public_key
    # wireguard-go: set the endpoint before the keepalive, or the first handshake stalls ~5 s.
    await dev.apply(PeerDiff(add=(Peer.build(gw, state.allowed_ips),)))
    await dev.set_peer_endpoint(gw, state.endpoint)
    await dev.apply(PeerDiff(update=(Peer.build(gw, state.allowed_ips, 25),)))
    await netlab.add_address(ns, ifname, str(ipaddress.ip_interface(state.address)))
    await netlab.link_up(ns, ifname)
