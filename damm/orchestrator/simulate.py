"""What a fleet looks like once a plan's actions succeeded: the planner's model of its own effect.

Property tests use it to show that planning converges on the desired topology and that no
sequence of plans breaks a guardrail; the benchmark uses it to replay many rounds cheaply. New
gateways come up healthy and empty, which is what a successful apply leads to.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from damm.orchestrator import actions as a
from damm.orchestrator.fleet import Fleet, GatewayNow, PoolNow


def _new(gateway_id: str, region: str, provider: str, doors: tuple[str, ...]) -> GatewayNow:
    return GatewayNow(
        gateway_id=gateway_id,
        region=region,
        status="healthy",
        silent_s=0.0,
        front_doors=dict.fromkeys(doors, True),
        provider=provider,
        host="running",
    )


def applied(fleet: Fleet, plan: a.Plan, now: datetime) -> Fleet:
    gateways = {g.gateway_id: g for g in fleet.gateways}
    pools = list(fleet.pools)
    last = dict(fleet.last_scaled)
    for action in plan.actions:
        match action:
            case a.AddGateway():
                gateways[action.gateway_id] = _new(
                    action.gateway_id, action.region, action.provider, action.front_doors
                )
                last[action.region] = now
            case a.ReplaceGateway():
                gateways[action.new_gateway_id] = _new(
                    action.new_gateway_id, action.region, action.provider, action.front_doors
                )
                old = gateways[action.gateway_id]
                gateways[action.gateway_id] = msgspec.structs.replace(
                    old, status="disabled", host="missing"
                )
            case a.RetireGateway():
                old = gateways[action.gateway_id]
                gateways[action.gateway_id] = msgspec.structs.replace(
                    old, status="disabled", host="missing"
                )
                last[action.region] = now
            case a.AddFrontDoor() | a.DeactivateFrontDoor():
                old = gateways[action.gateway_id]
                doors = dict(old.front_doors)
                doors[action.front_door_id] = isinstance(action, a.AddFrontDoor)
                gateways[action.gateway_id] = msgspec.structs.replace(old, front_doors=doors)
            case a.AddEgress():
                pools.append(
                    PoolNow(
                        pool_id=action.pool_id,
                        region=action.region,
                        countries=(action.country,),
                        headroom=1.0,
                    )
                )
    return Fleet(gateways=tuple(gateways.values()), pools=tuple(pools), last_scaled=last)
