"""The planner: ``plan(desired, current, recommendations, now) -> Plan``, a pure function.

Region by region (sorted, so the same inputs give the same plan): replace dead gateways the
orchestrator made, then add or retire to reach the wanted count, then front doors, then egress.
Every action passes the guardrail tally (``guardrails.py``, whose limits live in the topology)
or becomes a refusal with its code; nothing is dropped without a line in the plan.

Gateway ids are ``<region>-<n>`` with the smallest n nobody used, so a saved plan names what it
will create before anything exists, and applying it twice cannot make two of them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from datetime import datetime

import msgspec

from damm.orchestrator import actions as a
from damm.orchestrator.fleet import Fleet, GatewayNow, PoolNow, fingerprint
from damm.orchestrator.guardrails import Tally
from damm.orchestrator.topology import Region, Topology
from damm.reports.report import Recommendation


def topology_digest(desired: Topology) -> str:
    return hashlib.sha256(msgspec.json.encode(desired)).hexdigest()


def _age(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def is_dead(g: GatewayNow, dead_after_s: float) -> bool:
    """A gateway the orchestrator made whose host is gone, or silent past the grace period."""
    if g.provider is None or g.status == "disabled":
        return False
    if g.host == "missing":
        return True
    return g.status != "healthy" and g.silent_s is not None and g.silent_s > dead_after_s


def _why_dead(g: GatewayNow) -> str:
    if g.host == "missing":
        return f"{g.gateway_id}'s host is gone from provider {g.provider}"
    assert g.silent_s is not None
    if g.status == "unregistered":
        return f"{g.gateway_id} never registered in {_age(g.silent_s)}"
    return f"{g.gateway_id} silent for {_age(g.silent_s)}"


class _Names:
    """Fresh ids, never one a gateway or pool already has (disabled ones included)."""

    def __init__(self, taken: Iterable[str]) -> None:
        self.taken = set(taken)

    def next(self, prefix: str) -> str:
        n = 1
        while f"{prefix}-{n}" in self.taken:
            n += 1
        name = f"{prefix}-{n}"
        self.taken.add(name)
        return name


def wanted(
    name: str, spec: Region, healthy: Sequence[GatewayNow], notes: Sequence[Recommendation]
) -> tuple[int, str]:
    """How many gateways the region should have, and the words saying why."""
    if spec.gateways is not None:
        return spec.gateways, f"topology asks for {spec.gateways} gateway(s) in {name}"
    if not healthy:
        return spec.min_gateways, f"{name} has no healthy gateway; minimum {spec.min_gateways}"
    load = sum(g.load for g in healthy) / len(healthy)
    need = max(spec.min_gateways, math.ceil(round(len(healthy) * load / spec.target_load, 6)))
    relation = "over" if load > spec.target_load else "within"
    why = f"{name} load {load:.2f} {relation} target {spec.target_load:.2f}"
    for note in notes:
        if note.subject == name and note.kind == "region_near_capacity":
            why += f" (report: {note.message})"
    return need, why


def plan(
    desired: Topology,
    current: Fleet,
    recommendations: Sequence[Recommendation],
    now: datetime,
    *,
    plan_id: str | None = None,
) -> a.Plan:
    rails = desired.guardrails
    dead = {g.gateway_id for g in current.gateways if is_dead(g, rails.dead_after_s)}
    tally = Tally.start(desired, current, now, dead)
    names = _Names(current.ids())
    kept: list[a.Action] = []
    refused: list[a.Refusal] = []

    def offer(action: a.Action, gateway: GatewayNow | None = None) -> None:
        refusal = tally.check(action, gateway)
        if refusal is None:
            tally.keep(action, gateway)
            kept.append(action)
        else:
            refused.append(refusal)

    for name in sorted(desired.regions):
        spec = desired.regions[name]
        members = current.in_region(name)
        healthy = [g for g in members if g.status == "healthy"]
        alive = [g for g in members if g.gateway_id not in dead and _counts(g, rails.dead_after_s)]
        want, why = wanted(name, spec, healthy, recommendations)

        # Dead ones are replaced while the region needs them, and cleared away beyond that. One
        # that never registered and has no host was cut short while being made: make it again
        # under its own name (its token can be derived again), rather than a new one.
        lost = sorted((g for g in members if g.gateway_id in dead), key=lambda g: g.gateway_id)
        short = max(0, want - len(alive))
        for g in lost[:short]:
            if g.status == "unregistered" and g.host == "missing":
                offer(
                    a.AddGateway(
                        region=name,
                        provider=spec.provider,
                        reason=f"{g.gateway_id} was recorded but its host never came up: "
                        "make it again",
                        gateway_id=g.gateway_id,
                        front_doors=spec.front_doors,
                    ),
                    g,
                )
                continue
            offer(
                a.ReplaceGateway(
                    region=name,
                    provider=spec.provider,
                    reason=_why_dead(g),
                    gateway_id=g.gateway_id,
                    new_gateway_id=names.next(name),
                    front_doors=spec.front_doors,
                ),
                g,
            )
        for g in lost[short:]:
            offer(
                a.RetireGateway(
                    region=name,
                    provider=g.provider or spec.provider,
                    reason=f"{_why_dead(g)}; {len(alive)} serving, {want} wanted",
                    gateway_id=g.gateway_id,
                ),
                g,
            )
        have = len(alive) + min(short, len(lost))
        for _ in range(want - have):
            offer(
                a.AddGateway(
                    region=name,
                    provider=spec.provider,
                    reason=f"{why}: {have} running, {want} wanted",
                    gateway_id=names.next(name),
                    front_doors=spec.front_doors,
                )
            )
        if have > want:
            owned = [g for g in alive if g.provider is not None]
            # Emptiest first, then the newest name: the cheapest to take away.
            owned.sort(key=lambda g: (g.devices_active, -_suffix(g.gateway_id), g.gateway_id))
            for g in owned[: have - want]:
                offer(
                    a.RetireGateway(
                        region=name,
                        provider=g.provider or spec.provider,
                        reason=f"{why}: {have} running, {want} wanted",
                        gateway_id=g.gateway_id,
                    ),
                    g,
                )

        for g in sorted(alive, key=lambda g: g.gateway_id):
            if g.provider is None or g.host != "running":
                continue
            active = {fd for fd, on in g.front_doors.items() if on}
            for fd in spec.front_doors:
                if fd not in active:
                    offer(
                        a.AddFrontDoor(
                            region=name,
                            provider=g.provider,
                            reason=f"topology lists front door {fd} for {name} gateways; "
                            f"{g.gateway_id} lacks it",
                            gateway_id=g.gateway_id,
                            front_door_id=fd,
                        )
                    )
            for fd in sorted(active - set(spec.front_doors)):
                offer(
                    a.DeactivateFrontDoor(
                        region=name,
                        provider=g.provider,
                        reason=f"front door {fd} of {g.gateway_id} is no longer in the topology",
                        gateway_id=g.gateway_id,
                        front_door_id=fd,
                    )
                )

        for egress in spec.egress:
            best = _best_headroom(current.pools, name, egress.country)
            if best is not None and best >= egress.min_headroom:
                continue
            reason = (
                f"no egress pool serves {egress.country} in {name}"
                if best is None
                else f"egress {egress.country} in {name} headroom {best:.2f} under minimum "
                f"{egress.min_headroom:.2f}"
            )
            offer(
                a.AddEgress(
                    region=name,
                    provider=spec.provider,
                    reason=reason,
                    pool_id=names.next(f"{name}-{egress.country.lower()}"),
                    country=egress.country,
                )
            )

    draft = a.Plan(
        plan_id="",
        created_at=now,
        topology_digest=topology_digest(desired),
        fleet_digest="",
        actions=tuple(kept),
        refusals=tuple(refused),
    )
    digest = fingerprint(current, draft.targets())
    return msgspec.structs.replace(
        draft, plan_id=plan_id or digest[:12] + now.strftime("%Y%m%d%H%M%S"), fleet_digest=digest
    )


def _counts(g: GatewayNow, dead_after_s: float) -> bool:
    """Serving, or on its way: healthy, or made by us and not yet past the grace period."""
    if g.status == "healthy":
        return True
    return g.provider is not None and not is_dead(g, dead_after_s)


def _suffix(gateway_id: str) -> int:
    tail = gateway_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _best_headroom(pools: Iterable[PoolNow], region: str, country: str) -> float | None:
    fits = [p.headroom for p in pools if p.active and p.region == region and country in p.countries]
    return max(fits) if fits else None


def stale_reason(saved: a.Plan, desired: Topology, current: Fleet) -> str | None:
    """Why a saved plan may no longer be applied, or None when its inputs still hold."""
    if topology_digest(desired) != saved.topology_digest:
        return "the topology file changed"
    if fingerprint(current, saved.targets()) != saved.fleet_digest:
        return "the fleet changed (gateways, hosts, front doors or pools)"
    return None
