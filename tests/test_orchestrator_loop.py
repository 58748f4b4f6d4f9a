"""The reconcile loop's edges: one acting instance at a time, and the fleet as observed."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from damm.control.process import ControlPlane
from damm.errors import Code, DammError
from damm.orchestrator import history
from damm.orchestrator import topology as t
from damm.orchestrator.loop import Orchestrator
from damm.orchestrator.observe import fleet_from
from damm.orchestrator.providers.base import Host, HostSpec
from damm.reports import report as r
from damm.stack.nats_server import NatsServer

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


class MemoryProvider:
    """Hosts as a dict: enough to watch what the loop asks a provider to do."""

    def __init__(self) -> None:
        self.name = "mem"
        self.hosts: dict[str, Host] = {}
        self.creates: list[str] = []

    async def create(self, spec: HostSpec) -> Host:
        self.creates.append(spec.gateway_id)
        await asyncio.sleep(0.05)  # a provider takes time; a racing loop would overlap here
        host = Host(
            gateway_id=spec.gateway_id,
            region=spec.region,
            provider_ref=f"mem-{spec.gateway_id}",
            state="running",
            front_doors={fd: f"192.0.2.{len(self.hosts) + 1}:51820" for fd in spec.front_doors},
        )
        self.hosts[spec.gateway_id] = host
        return host

    async def destroy(self, gateway_id: str) -> None:
        self.hosts.pop(gateway_id, None)

    async def add_front_door(self, gateway_id: str, front_door_id: str) -> str:
        return "192.0.2.200:51820"

    async def remove_front_door(self, gateway_id: str, front_door_id: str) -> None:
        return None

    async def add_egress(self, pool_id: str, region: str, country: str) -> tuple[str, ...]:
        return ("198.18.0.0/28",)

    async def list(self) -> list[Host]:
        return list(self.hosts.values())


async def test_two_loops_one_acts(
    control: ControlPlane, admin_nc: NATS, nats_server: NatsServer, dsn: str, tmp_path: Path
) -> None:
    topology = t.Topology(
        providers={"mem": t.Provider(kind="exec", command=("unused",))},
        regions={"eu": t.Region(provider="mem", gateways=1)},
        guardrails=t.Guardrails(cooldown_s=0),
    )
    provider = MemoryProvider()
    loops = [
        Orchestrator(
            admin_nc,
            dsn,
            topology,
            {"mem": provider},
            tmp_path / name,
            nats_server.url,
            holder=name,
        )
        for name in ("one", "two")
    ]
    outcomes = await asyncio.gather(*(o.round(60.0) for o in loops), return_exceptions=True)
    held = [x for x in outcomes if isinstance(x, DammError)]
    acted = [x for x in outcomes if not isinstance(x, BaseException)]
    assert len(acted) == 1 and [e.code for e in held] == [Code.LEASE_HELD]
    assert provider.creates == ["eu-1"]
    await control.wait_projected()
    # The winner keeps the lease: the other stays out until it expires, even with work to do.
    loser = loops[outcomes.index(held[0])]
    with pytest.raises(DammError) as err:
        await loser.take_lease(60.0)
    assert err.value.code is Code.LEASE_HELD


def test_fleet_from_joins_report_hosts_and_history() -> None:
    rep = r.Report(
        generated_at=NOW,
        period="2026-12",
        heartbeat_ttl_s=90,
        totals=r.Totals(
            gateways=2,
            gateways_healthy=1,
            devices=0,
            devices_by_status={},
            front_doors=1,
            egress_pools=0,
            used_bytes=0,
            near_quota=0,
            over_quota=0,
        ),
        regions=[],
        gateways=[
            r.GatewayRow(
                gateway_id=gid,
                region="eu",
                status=status,
                last_heartbeat=None,
                heartbeat_age_s=age,
                load=0.5,
                peer_count=0,
                active_peers=0,
                devices_active=1,
                devices_total=1,
            )
            for gid, status, age in (("eu-1", "healthy", 2.0), ("gw-manual", "stale", 500.0))
        ],
        front_doors=[
            r.FrontDoorRow(
                gateway_id="eu-1",
                front_door_id="fd1",
                endpoint="192.0.2.1:51820",
                transport="udp",
                priority=10,
                active=True,
                devices=1,
            )
        ],
        egress_pools=[],
        tiers=[],
        top_usage=[],
        near_quota=[],
        over_quota=[],
        tokens_at_session_limit=[],
        recommendations=[],
    )
    past = history.History(
        managed={"eu-1": "lab", "eu-2": "lab"},
        regions={"eu-1": "eu", "eu-2": "eu"},
        created_at={"eu-2": NOW - timedelta(seconds=40)},
    )
    hosts = {"eu-1": Host(gateway_id="eu-1", region="eu", provider_ref="ns", state="running")}
    fleet = {g.gateway_id: g for g in fleet_from(rep, hosts, past, NOW).gateways}
    assert fleet["eu-1"].host == "running" and fleet["eu-1"].front_doors == {"fd1": True}
    assert fleet["gw-manual"].provider is None and fleet["gw-manual"].host == "unmanaged"
    # Made by an apply that was cut short: not in the read models yet, its host missing.
    assert (fleet["eu-2"].status, fleet["eu-2"].host, fleet["eu-2"].silent_s) == (
        "unregistered",
        "missing",
        40.0,
    )


@pytest.mark.parametrize(
    ("script", "detail"),
    [
        ("exit 3", "x list: exit 3: boom"),
        ("echo not-json", "x list: answer:"),
        ("sleep 5", "x list: no answer in 0.5s"),
    ],
)
async def test_exec_provider_failures_are_provider_failed(script: str, detail: str) -> None:
    from damm.orchestrator.providers.exec import ExecProvider

    spec = t.Provider(kind="exec", command=("sh", "-c", f"echo boom >&2; {script}"), timeout_s=0.5)
    with pytest.raises(DammError) as err:
        await ExecProvider("x", spec).list()
    assert err.value.code is Code.PROVIDER_FAILED
    assert detail in err.value.detail


async def test_exec_provider_gets_the_token_on_stdin_only(tmp_path: Path) -> None:
    from damm.orchestrator.providers.exec import ExecProvider

    seen = tmp_path / "seen"
    answer = '{"gateway_id":"eu-1","region":"eu","provider_ref":"vm-1","state":"running"}'
    spec = t.Provider(
        kind="exec", command=("sh", "-c", f"cat > {seen}; echo '{answer}'"), timeout_s=5
    )
    spec_in = HostSpec(
        gateway_id="eu-1",
        region="eu",
        token="dmg_" + "s" * 40,
        nats_url="nats://n:4222",
        front_doors=("fd1",),
    )
    host = await ExecProvider("x", spec).create(spec_in)
    assert host.provider_ref == "vm-1"
    sent = seen.read_text()
    assert '"op":"create"' in sent and "dmg_" + "s" * 40 in sent
