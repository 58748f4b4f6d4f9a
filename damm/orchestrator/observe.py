"""The edge that builds the planner's input: report, providers' lists and step history meet here.

``fleet_from`` is pure (tests build fleets from hand-made reports); ``observe`` does the reading.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from nats.aio.client import Client as NATS

from damm.orchestrator import history
from damm.orchestrator.fleet import Fleet, GatewayNow, HostState, PoolNow
from damm.orchestrator.providers.base import Host, Provider
from damm.reports import report as r


def fleet_from(
    rep: r.Report,
    hosts: Mapping[str, Host],
    past: history.History,
    now: datetime,
) -> Fleet:
    doors: dict[str, dict[str, bool]] = {}
    for d in rep.front_doors:
        doors.setdefault(d.gateway_id, {})[d.front_door_id] = d.active
    gateways = []
    seen = set()
    for g in rep.gateways:
        seen.add(g.gateway_id)
        silent = g.heartbeat_age_s
        if silent is None and g.gateway_id in past.created_at:
            silent = (now - past.created_at[g.gateway_id]).total_seconds()
        gateways.append(
            GatewayNow(
                gateway_id=g.gateway_id,
                region=g.region,
                status=g.status,
                load=g.load,
                devices_active=g.devices_active,
                silent_s=silent,
                front_doors=doors.get(g.gateway_id, {}),
                provider=past.managed.get(g.gateway_id),
                host=_host_state(g.gateway_id, hosts, past),
            )
        )
    # Made by us but not in the read models yet (projection lag, or an apply cut short).
    for gid, provider in sorted(past.managed.items()):
        if gid in seen:
            continue
        host = hosts.get(gid)
        created = past.created_at.get(gid)
        gateways.append(
            GatewayNow(
                gateway_id=gid,
                region=host.region if host else past.regions.get(gid, ""),
                status="unregistered",
                silent_s=(now - created).total_seconds() if created else None,
                provider=provider,
                host=_host_state(gid, hosts, past),
            )
        )
    pools = tuple(
        PoolNow(
            pool_id=p.pool_id,
            region=p.region,
            countries=tuple(p.countries),
            headroom=p.headroom,
            active=p.active,
        )
        for p in rep.egress_pools
    )
    return Fleet(gateways=tuple(gateways), pools=pools, last_scaled=dict(past.last_scaled))


def _host_state(gid: str, hosts: Mapping[str, Host], past: history.History) -> HostState:
    if gid not in past.managed:
        return "unmanaged"
    host = hosts.get(gid)
    return "running" if host is not None and host.state == "running" else "missing"


async def observe(
    nc: NATS,
    database_url: str,
    providers: Mapping[str, Provider],
    *,
    heartbeat_ttl_s: float,
    now: datetime,
) -> tuple[Fleet, r.Report, history.History]:
    rep = await r.generate(database_url, ttl_s=heartbeat_ttl_s, now=now)
    hosts: dict[str, Host] = {}
    for provider in providers.values():
        for host in await provider.list():
            hosts[host.gateway_id] = host
    past = await history.read(nc)
    return fleet_from(rep, hosts, past, now), rep, past
