"""The current fleet as the planner sees it: plain values, built by ``observe`` at the edge.

Three sources meet here: the read models and heartbeat metrics (through the operator report),
the providers' own inventories (``list``), and the orchestrator's step events (which gateways it
made, through which provider, and when a region last scaled). The planner takes this value and
a clock; it never reads any of them itself.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Literal

import msgspec

GatewayStatus = Literal["healthy", "stale", "unregistered", "disabled"]
HostState = Literal["running", "missing", "unmanaged"]


class GatewayNow(msgspec.Struct, frozen=True, kw_only=True):
    gateway_id: str
    region: str
    status: GatewayStatus
    load: float = 0.0
    devices_active: int = 0
    # Seconds since the last heartbeat, or since the host was made when it never beat.
    silent_s: float | None = None
    front_doors: dict[str, bool] = msgspec.field(default_factory=dict)  # id -> active
    provider: str | None = None  # the provider whose host it is, when the orchestrator made it
    host: HostState = "unmanaged"


class PoolNow(msgspec.Struct, frozen=True, kw_only=True):
    pool_id: str
    region: str
    countries: tuple[str, ...]
    headroom: float
    active: bool = True


class Fleet(msgspec.Struct, frozen=True, kw_only=True):
    gateways: tuple[GatewayNow, ...] = ()
    pools: tuple[PoolNow, ...] = ()
    last_scaled: dict[str, datetime] = msgspec.field(default_factory=dict)  # region -> when

    def in_region(self, region: str) -> list[GatewayNow]:
        return [g for g in self.gateways if g.region == region and g.status != "disabled"]

    def ids(self) -> set[str]:
        return {g.gateway_id for g in self.gateways} | {p.pool_id for p in self.pools}


def fingerprint(fleet: Fleet, exclude: frozenset[str] = frozenset()) -> str:
    """The structural state a plan was decided on: who exists, in which state, with which doors.

    Loads, ages and scaling times are left out: they move every second, and a plan refused as
    stale because a heartbeat arrived would be useless. ``exclude`` drops the plan's own targets,
    so a plan interrupted half-way is not stale because of its own finished steps.
    """
    shape = (
        sorted(
            (
                g.gateway_id,
                g.region,
                g.status,
                g.provider or "",
                g.host,
                sorted(g.front_doors.items()),
            )
            for g in fleet.gateways
            if g.gateway_id not in exclude
        ),
        sorted(
            (p.pool_id, p.region, p.countries, p.active)
            for p in fleet.pools
            if p.pool_id not in exclude
        ),
    )
    return hashlib.sha256(msgspec.json.encode(shape)).hexdigest()
