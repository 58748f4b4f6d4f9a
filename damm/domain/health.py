"""Gateway health: one predicate for placement, catalogs and the report.

A gateway serves new devices only while an operator has it enabled, its agent has registered,
and its last heartbeat is younger than the heartbeat TTL. The control plane is not authoritative
for health without heartbeat evidence, so "never heard from" is stale, not healthy.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

GatewayHealth = Literal["healthy", "stale", "unregistered", "disabled"]


def gateway_health(
    *,
    active: bool,
    registered: bool,
    last_heartbeat: datetime | None,
    now: datetime,
    ttl: timedelta,
) -> GatewayHealth:
    if not active:
        return "disabled"
    if not registered:
        return "unregistered"
    if last_heartbeat is None or now - last_heartbeat > ttl:
        return "stale"
    return "healthy"
