"""The orchestrator end to end: the real CLI, the netns provider, real gateways on wireguard-go.

Bounds stated here: gateways made by `apply` turn healthy within HEALTHY_BOUND_S; a killed host
is replaced by `run` and the replacement registers within REPLACE_BOUND_S.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS

from damm import netns as netlab
from damm.control.process import ControlPlane
from damm.dev.demo import _device_up
from damm.device import files
from damm.device.failover import device_trust, fetch_catalog, verify_for_device
from damm.device.profile import save_enrollment
from damm.errors import Code
from damm.events import model as m
from damm.orchestrator import topology as topo
from damm.orchestrator.providers.netns import NetnsProvider
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.reports.audit import AuditFilter, collect
from damm.reports.report import generate
from damm.stack.nats_server import NatsServer
from damm.wireguard.uapi import UapiBackend

pytestmark = pytest.mark.netns

HEALTHY_BOUND_S = 25.0
REPLACE_BOUND_S = 30.0

_ok, _why = netlab.can_run_netns()
if not _ok:
    pytest.skip(f"network-namespace tests skipped: {_why}", allow_module_level=True)


@pytest.fixture
def nats_server(callout_nats_server: NatsServer) -> NatsServer:
    """Gateways run under their identity here, decided by the auth callout, as `damm up` runs."""
    return callout_nats_server


@pytest.fixture
def control(callout_control: ControlPlane) -> ControlPlane:
    return callout_control


def topology_text(gateways: str, *, extra_region: str = "", rails: str = "") -> str:
    return f"""
[guardrails]
cooldown_s = 0
dead_after_s = 30
{rails}

[providers.lab]
kind = "netns"
subnet = "172.31.0.0/24"
heartbeat_s = 1
capacity = 2

[regions.eu]
provider = "lab"
{gateways}
front_doors = ["fd1"]
{extra_region}
"""


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.2)
    return time.monotonic() - start


@dataclass
class Fleet:
    tmp: Path
    nats: NatsServer
    dsn: str
    admin: NATS
    topology: Path
    state: Path
    lab: netlab.Lab

    def provider(self) -> NetnsProvider:
        spec = topo.Provider(kind="netns", subnet="172.31.0.0/24", heartbeat_s=1, capacity=2)
        return NetnsProvider("lab", spec, self.state / "providers" / "lab")

    def write_topology(self, text: str) -> None:
        self.topology.write_text(text)

    def command(self, *args: str) -> list[str]:
        return [
            sys.executable, "-m", "damm.cli.main", "--nats", self.nats.url,
            "--database-url", self.dsn, "orchestrate", *args,
            "--topology", str(self.topology), "--state-dir", str(self.state),
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            DAMM_ADMIN_PASSWORD=self.nats.passwords["admin"],
            DAMM_HOME=str(self.tmp / "home"),
        )

    async def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        proc = await asyncio.create_subprocess_exec(
            *self.command(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(),
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())

    async def plan(self, *extra: str) -> dict[str, Any]:
        done = await self.cli("plan", "--json", *extra)
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = msgspec.json.decode(done.stdout)
        return result

    async def gateways(self) -> dict[str, str]:
        rep = await generate(self.dsn, ttl_s=10.0, now=datetime.now(UTC))
        return {g.gateway_id: g.status for g in rep.gateways}

    async def healthy(self, *ids: str) -> bool:
        status = await self.gateways()
        return all(status.get(i) == "healthy" for i in ids)


@pytest.fixture
async def fleet(
    control: ControlPlane, admin_nc: NATS, nats_server: NatsServer, dsn: str, tmp_path: Path
) -> AsyncIterator[Fleet]:
    await call(admin_nc, "admin.tier.define", p.DefineTier(tier="gold", regions=("eu",)), p.Done)
    f = Fleet(
        tmp=tmp_path,
        nats=nats_server,
        dsn=dsn,
        admin=admin_nc,
        topology=tmp_path / "fleet.toml",
        state=tmp_path / "orchestrator",
        lab=netlab.Lab(),
    )
    f.write_topology(topology_text("gateways = 2"))
    try:
        yield f
    finally:
        await f.provider().teardown()
        await f.lab.close()


async def enroll_and_ping(f: Fleet, role: str) -> tuple[p.Enrolled, Path]:
    """A device namespace on the provider's bridge enrolls and pings its gateway's tunnel end."""
    provider = f.provider()
    dev_ns = await f.lab.netns(role)
    await provider.attach_client(dev_ns, role)
    daemon = await f.lab.wireguard_go(dev_ns, role[:2])
    created = await call(
        f.admin, "admin.token.create", p.CreateToken(tier="gold", uses=1), p.TokenCreated
    )
    state_dir = f.tmp / f"device-{role}"
    public = files.generate_key(state_dir)
    enrolled = await call(
        f.admin,
        "enroll",
        p.Enroll(token=created.token, public_key=public, region="eu", request_id=uuid.uuid4().hex),
        p.Enrolled,
    )
    dev, _ = save_enrollment(state_dir, enrolled, public, f.nats.url)
    await _device_up(
        UapiBackend(daemon.ifname), dev_ns, daemon.ifname, files.private_key(state_dir), dev
    )
    assert await netlab.ping(dev_ns, "10.44.0.1", count=3, wait=8), "no ping through the tunnel"
    return enrolled, state_dir


async def test_two_gateways_planned_applied_healthy_in_catalog_and_carrying_a_device(
    fleet: Fleet,
) -> None:
    planned = await fleet.plan("--out", str(fleet.tmp / "plan.json"))
    actions = planned["actions"]
    assert [(x["kind"], x["gateway_id"]) for x in actions] == [
        ("add_gateway", "eu-1"),
        ("add_gateway", "eu-2"),
    ]
    assert all("topology asks for 2 gateway(s) in eu" in x["reason"] for x in actions)

    started = time.monotonic()
    applied = await fleet.cli("apply", "--plan", str(fleet.tmp / "plan.json"))
    assert applied.returncode == 0, applied.stderr
    assert "0. add_gateway eu-1: succeeded" in applied.stdout
    took = await eventually(
        lambda: fleet.healthy("eu-1", "eu-2"), HEALTHY_BOUND_S, "both gateways healthy"
    )
    print(f"apply to two healthy gateways: {time.monotonic() - started:.1f}s ({took:.1f}s wait)")

    enrolled, state_dir = await enroll_and_ping(fleet, "dev")
    assert enrolled.gateway_id in ("eu-1", "eu-2")
    trust = device_trust(files.load(state_dir))

    async def both_in_catalog() -> bool:
        signed = await fetch_catalog(fleet.admin, "eu")
        checked = verify_for_device(signed, trust, now=int(time.time()))
        return {g.id for g in checked.catalog.gateways} >= {"eu-1", "eu-2"}

    await eventually(both_in_catalog, 15, "both gateways in the signed catalog")

    again = await fleet.plan()
    assert again["actions"] == [] and again["refusals"] == []

    # Every step is evidence, with the orchestrator as actor.
    steps = await collect(fleet.admin, AuditFilter(actor="orchestrator"))
    kinds = [e.type for e in steps if e.type.startswith("orchestrator.step")]
    assert kinds.count("orchestrator.step_succeeded") == 2
    assert kinds.count("orchestrator.step_planned") == 2
    assert any(isinstance(e.event, m.GatewayAdded) for e in steps)
    succeeded = [e.event for e in steps if isinstance(e.event, m.OrchestratorStepSucceeded)]
    assert {s.provider_ref for s in succeeded} == {
        h.provider_ref for h in await fleet.provider().list()
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "damm.cli.main", "--nats", fleet.nats.url, "admin", "audit",
        "--actor", "orchestrator", "--json", env=fleet.env(), stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    text = out.decode()
    assert text.count('"type":"orchestrator.step_succeeded","aggregate"') == 2
    assert "add_gateway eu-2 succeeded (lab)" in text


async def test_saved_plan_goes_stale_and_is_refused(fleet: Fleet) -> None:
    await fleet.plan("--out", str(fleet.tmp / "plan.json"))
    await call(
        fleet.admin,
        "admin.gateway.add",
        p.AddGateway(gateway_id="manual-1", region="eu", front_door="192.0.2.1:51820"),
        p.GatewayAdded,
    )

    async def refused() -> bool:
        done = await fleet.cli("apply", "--plan", str(fleet.tmp / "plan.json"))
        return done.returncode != 0 and Code.PLAN_STALE.slug in done.stderr

    await eventually(refused, 10, "stale plan refused")
    assert await fleet.provider().list() == []


async def test_killed_apply_run_again_finishes_without_duplicates(fleet: Fleet) -> None:
    fleet.write_topology(topology_text("gateways = 3"))
    await fleet.plan("--out", str(fleet.tmp / "plan.json"))
    proc = await asyncio.create_subprocess_exec(
        *fleet.command("apply", "--plan", str(fleet.tmp / "plan.json")),
        env=fleet.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    records = fleet.state / "providers" / "lab" / "hosts"
    try:
        # Half-way: the second host is being made (its inventory record is written first).
        deadline = time.monotonic() + 30
        while len(list(records.glob("*.json"))) < 2:
            assert time.monotonic() < deadline, "the first apply never reached the second host"
            await asyncio.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    steps = await collect(fleet.admin, AuditFilter(actor="orchestrator"))
    finished = [e for e in steps if isinstance(e.event, m.OrchestratorStepSucceeded)]
    assert len(finished) < 3, "the kill came after the plan was done"
    again = await fleet.cli("apply", "--plan", str(fleet.tmp / "plan.json"))
    assert again.returncode == 0, again.stderr
    assert "0. add_gateway eu-1: skipped" in again.stdout
    assert "2. add_gateway eu-3: succeeded" in again.stdout
    await eventually(
        lambda: fleet.healthy("eu-1", "eu-2", "eu-3"), HEALTHY_BOUND_S, "three healthy"
    )
    status = await fleet.gateways()
    assert sorted(status) == ["eu-1", "eu-2", "eu-3"]
    hosts = await fleet.provider().list()
    assert sorted(h.gateway_id for h in hosts) == ["eu-1", "eu-2", "eu-3"]
    assert all(h.state == "running" for h in hosts)
    assert (await fleet.plan())["actions"] == []


async def test_run_replaces_a_killed_host_and_scale_out_is_capped(fleet: Fleet) -> None:
    fleet.write_topology(topology_text("gateways = 1"))
    applied = await fleet.cli("apply")
    assert applied.returncode == 0, applied.stderr
    await eventually(lambda: fleet.healthy("eu-1"), HEALTHY_BOUND_S, "eu-1 healthy")

    # Kill the host behind the provider's back: its processes, then its namespace.
    (host,) = await fleet.provider().list()
    pids = (await netlab.run("ip", "netns", "pids", host.provider_ref)).stdout.split()
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    await netlab.run("ip", "netns", "del", host.provider_ref)

    runner = await asyncio.create_subprocess_exec(
        *fleet.command("run", "--interval", "1"),
        env=fleet.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        took = await eventually(
            lambda: fleet.healthy("eu-2"), REPLACE_BOUND_S, "replacement eu-2 healthy"
        )
        print(f"killed host replaced and healthy in {took:.1f}s")
        assert (await fleet.gateways())["eu-1"] == "disabled"
    finally:
        runner.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(runner.wait(), 20) == 0

    # Load: two devices on a gateway of capacity 2 reads load 1.0, over the 0.6 target.
    fleet.write_topology(topology_text("min_gateways = 1\nmax_gateways = 1\ntarget_load = 0.6"))
    await enroll_and_ping(fleet, "d1")
    await enroll_and_ping(fleet, "d2")

    async def capped() -> bool:
        planned = await fleet.plan()
        return any(r["code"] == Code.GUARDRAIL_REGION_CAP.slug for r in planned["refusals"])

    await eventually(capped, 15, "scale-out proposed and capped")
    planned = await fleet.plan()
    (refusal,) = planned["refusals"]
    assert refusal["action"]["kind"] == "add_gateway"
    assert "eu load 1.00 over target 0.60" in refusal["action"]["reason"]
    assert "maximum is 1" in refusal["detail"]
    text = (await fleet.cli("plan")).stdout
    assert "refused by guardrails: 1" in text
    assert "guardrail_region_cap: add_gateway eu-3: eu has 1 gateway(s), its maximum is 1" in text


EXEC_TOPOLOGY = """
[guardrails]
cooldown_s = 0

[providers.cloud]
kind = "exec"
command = ["{python}", "{script}"]
timeout_s = 60

[regions.eu]
provider = "cloud"
gateways = {n}
front_doors = ["fd1"]
egress = [{{ country = "DE" }}]
"""


EXEC_SCRIPT = Path(__file__).resolve().parent / "orchestrator_exec_provider.py"


async def test_exec_provider_drives_hosts_through_its_json_contract(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = EXEC_SCRIPT
    exec_state = fleet.tmp / "exec-state"
    monkeypatch.setenv("DAMM_EXEC_STATE", str(exec_state))  # the CLI's children inherit it
    spec = topo.Provider(kind="netns", subnet="172.31.9.0/24")
    lab = NetnsProvider("exec-lab", spec, exec_state)
    try:
        for n in (2, 1):
            fleet.write_topology(EXEC_TOPOLOGY.format(python=sys.executable, script=script, n=n))
            done = await fleet.cli("apply")
            assert done.returncode == 0, done.stderr
        assert "retire_gateway eu-2: succeeded" in done.stdout
        await eventually(lambda: fleet.healthy("eu-1"), HEALTHY_BOUND_S, "eu-1 healthy")
        assert [(h.gateway_id, h.state) for h in await lab.list()] == [("eu-1", "running")]
        status = await fleet.gateways()
        assert status["eu-2"] == "disabled"
        rep = await generate(fleet.dsn, ttl_s=10.0, now=datetime.now(UTC))
        (pool,) = rep.egress_pools
        assert (pool.pool_id, pool.countries, pool.provider) == ("eu-de-1", ["DE"], "cloud")
        assert (await fleet.plan())["actions"] == []

        fleet.write_topology(EXEC_TOPOLOGY.format(python="false", script="", n=1))
        failed = await fleet.cli("plan")
        assert failed.returncode == 1
        assert failed.stderr.startswith(f"error: {Code.PROVIDER_FAILED.slug}: ")
        assert "cloud list: exit 1" in failed.stderr
    finally:
        await lab.teardown()


async def test_front_doors_follow_the_topology(fleet: Fleet) -> None:
    fleet.write_topology(topology_text("gateways = 1"))
    assert (await fleet.cli("apply")).returncode == 0

    async def doors() -> dict[str, bool]:
        rep = await generate(fleet.dsn, ttl_s=10.0, now=datetime.now(UTC))
        return {d.front_door_id: d.active for d in rep.front_doors if d.gateway_id == "eu-1"}

    async def doors_are(want: dict[str, bool]) -> bool:
        return await doors() == want

    await eventually(lambda: doors_are({"fd1": True}), 10, "fd1 recorded")
    fleet.write_topology(
        topology_text("gateways = 1").replace('front_doors = ["fd1"]', 'front_doors = ["fd2"]')
    )
    text = await fleet.cli("plan")
    assert "add_front_door eu-1/fd2" in text.stdout
    assert "deactivate_front_door eu-1/fd1 (eu, lab): front door fd1 of eu-1 is no longer" in (
        text.stdout
    )
    assert (await fleet.cli("apply")).returncode == 0
    await eventually(lambda: doors_are({"fd1": False, "fd2": True}), 10, "fd2 replaced fd1")
    (host,) = await fleet.provider().list()
    assert list(host.front_doors) == ["fd2"]
    assert (await fleet.plan())["actions"] == []
