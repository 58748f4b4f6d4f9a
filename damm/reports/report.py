"""The operator report: gather rows from the read models, then turn them into a ``Report``.

Gathering (``gather``) is a handful of aggregate queries, so the cost grows with gateways, pools
and tiers, not with devices (the per-device parts are a top-N and the near/over-quota lists,
both computed in SQL). Building (``build``) is a pure function of those rows, a clock and the
thresholds: the same rows always give the same report, which is what the tests pin down.

Health: a gateway is *healthy* when it is enabled, registered, and its last heartbeat is younger
than the heartbeat TTL; *stale* when it is registered and enabled but its heartbeat is older (or
it never sent one); *unregistered* before its agent registered; *disabled* when an operator
turned it off. Only healthy gateways count towards a region's capacity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from damm import settings
from damm.domain import egress
from damm.domain.health import GatewayHealth, gateway_health
from damm.domain.periods import period_at
from damm.errors import DammError

NEAR_CAPACITY_LOAD = 0.8  # a region whose healthy gateways average this load is near capacity
LOW_HEADROOM = 0.2  # an egress pool with less headroom than this needs more IPs
NEAR_QUOTA = 0.8  # a device at or above this share of its byte limit is near quota
TOP_USAGE = 20
QUOTA_LIST_LIMIT = 500


# --- the report -------------------------------------------------------------------------------


class GatewayRow(msgspec.Struct, kw_only=True):
    gateway_id: str
    region: str
    status: GatewayHealth
    last_heartbeat: datetime | None
    heartbeat_age_s: float | None
    load: float
    peer_count: int
    active_peers: int
    devices_active: int
    devices_total: int


class RegionRow(msgspec.Struct, kw_only=True):
    region: str
    gateways: int
    healthy: int
    stale: int
    load: float  # mean load of healthy gateways (1.0 when none is healthy)
    headroom: float
    devices_active: int
    peers: int
    near_capacity: bool


class FrontDoorRow(msgspec.Struct, kw_only=True):
    gateway_id: str
    front_door_id: str
    endpoint: str
    transport: str
    priority: int
    active: bool
    # Devices (not revoked) whose door this is now: enrolled through it, or moved to it by a
    # failover they reported under their own identity.
    devices: int
    # Of those, how many the gateway reported traffic for this period (a WireGuard peer only
    # carries traffic after a handshake): evidence that the door is really in use.
    devices_seen: int = 0


class PoolRow(msgspec.Struct, kw_only=True):
    """``load`` is measured, the same figure placement uses: devices assigned (not revoked) over
    addresses x devices per address, or, if higher, ``traffic_bytes`` (this period) over
    addresses x ``transfer_per_address`` when the operator declared that allowance."""

    pool_id: str
    provider: str
    region: str
    countries: list[str]
    ips: list[str]
    load: float
    headroom: float
    active: bool
    devices_active: int
    low_headroom: bool
    addresses: int = 0
    devices_per_address: int = 0
    devices_assigned: int = 0
    traffic_bytes: int = 0
    transfer_per_address: int | None = None


class TierRow(msgspec.Struct, kw_only=True):
    tier: str
    byte_limit: int | None
    session_limit: int | None
    status: str
    devices: dict[str, int]  # status -> count


class UsageRow(msgspec.Struct, kw_only=True):
    device_id: str
    tier: str
    gateway_id: str
    status: str
    rx_bytes: int
    tx_bytes: int
    used: int
    byte_limit: int | None
    share: float | None  # used / byte_limit


class SessionRow(msgspec.Struct, kw_only=True):
    """An enrollment token whose active devices reached its tier's session limit."""

    token_id: str
    tier: str
    active_sessions: int
    session_limit: int


class CatalogKeyRow(msgspec.Struct, kw_only=True):
    """An announced, not yet active catalog signing key, and who already holds it."""

    key_id: str
    announced_at: datetime
    devices_with_key: int
    devices_active: int


class Recommendation(msgspec.Struct, kw_only=True):
    severity: str  # critical | warning | info
    # region_near_capacity | region_without_capacity | pool_low_headroom | gateway_stale |
    # front_door_unused | front_door_silent | devices_over_quota | token_at_session_limit |
    # catalog_key_not_fetched | events_quarantined
    kind: str
    subject: str
    message: str


class Totals(msgspec.Struct, kw_only=True):
    gateways: int
    gateways_healthy: int
    devices: int
    devices_by_status: dict[str, int]
    front_doors: int
    egress_pools: int
    used_bytes: int
    near_quota: int
    over_quota: int


class QuarantinedRow(msgspec.Struct, kw_only=True):
    projector: str
    seq: int
    subject: str
    event_type: str
    error: str


class Report(msgspec.Struct, kw_only=True):
    generated_at: datetime
    period: str
    heartbeat_ttl_s: float
    totals: Totals
    regions: list[RegionRow]
    gateways: list[GatewayRow]
    front_doors: list[FrontDoorRow]
    egress_pools: list[PoolRow]
    tiers: list[TierRow]
    top_usage: list[UsageRow]
    near_quota: list[UsageRow]
    over_quota: list[UsageRow]
    tokens_at_session_limit: list[SessionRow]
    recommendations: list[Recommendation]
    catalog_keys: list[CatalogKeyRow] = msgspec.field(default_factory=list)
    quarantined: list[QuarantinedRow] = msgspec.field(default_factory=list)


# --- rows from Postgres ------------------------------------------------------------------------


@dataclass
class Rows:
    """What ``gather`` read; plain dicts so tests can build them by hand."""

    period: str
    gateways: list[dict[str, Any]] = field(default_factory=list)
    gateway_devices: list[dict[str, Any]] = field(default_factory=list)  # gateway_id, status, n
    front_doors: list[dict[str, Any]] = field(default_factory=list)
    pools: list[dict[str, Any]] = field(default_factory=list)
    tiers: list[dict[str, Any]] = field(default_factory=list)
    tier_devices: list[dict[str, Any]] = field(default_factory=list)  # tier, status, n
    top_usage: list[dict[str, Any]] = field(default_factory=list)
    quota: list[dict[str, Any]] = field(default_factory=list)  # near or over, most used first
    quota_counts: dict[str, int] = field(default_factory=dict)  # near, over
    used_bytes: int = 0
    # token_id, tier, active_sessions, session_limit
    sessions_at_limit: list[dict[str, Any]] = field(default_factory=list)
    # key_id, announced_at, devices_with_key, devices_active
    catalog_keys: list[dict[str, Any]] = field(default_factory=list)
    quarantined: list[dict[str, Any]] = field(default_factory=list)


_GATEWAYS = """
SELECT g.gateway_id, g.region, g.active, g.registered_at IS NOT NULL AS registered,
       h.last_heartbeat, coalesce(h.load, 0) AS load, coalesce(h.peer_count, 0) AS peer_count,
       coalesce(h.active_peers, 0) AS active_peers
FROM gateways g LEFT JOIN gateway_health h USING (gateway_id) ORDER BY g.region, g.gateway_id
"""
_GATEWAY_DEVICES = "SELECT gateway_id, status, count(*) AS n FROM devices GROUP BY 1, 2"
_FRONT_DOORS = """
SELECT f.gateway_id, f.front_door_id, f.endpoint, f.transport, f.priority, f.active,
       coalesce(n.n, 0) AS devices, coalesce(n.seen, 0) AS devices_seen
FROM front_doors f LEFT JOIN (
    SELECT d.gateway_id, d.front_door_id, count(*) AS n,
           count(*) FILTER (WHERE u.rx_bytes + u.tx_bytes > 0) AS seen
    FROM devices d LEFT JOIN usage_totals u ON u.device_id = d.device_id AND u.period = $1
    WHERE d.status <> 'revoked' GROUP BY 1, 2
) n USING (gateway_id, front_door_id)
ORDER BY f.gateway_id, f.priority, f.front_door_id
"""
_POOLS = """
SELECT p.pool_id, p.provider, p.region, p.countries, p.ips, p.active, p.devices_per_address,
       p.transfer_per_address,
       coalesce(n.active, 0) AS devices_active, coalesce(n.assigned, 0) AS devices_assigned,
       coalesce(u.bytes, 0) AS traffic_bytes
FROM egress_pools p LEFT JOIN (
    SELECT egress_pool_id, count(*) FILTER (WHERE status = 'active') AS active,
           count(*) FILTER (WHERE status <> 'revoked') AS assigned
    FROM devices GROUP BY 1
) n ON n.egress_pool_id = p.pool_id LEFT JOIN (
    SELECT d.egress_pool_id, sum(t.rx_bytes + t.tx_bytes) AS bytes
    FROM usage_totals t JOIN devices d USING (device_id) WHERE t.period = $1 GROUP BY 1
) u ON u.egress_pool_id = p.pool_id
ORDER BY p.region, p.pool_id
"""
_TIERS = "SELECT tier, byte_limit, session_limit, status FROM tiers ORDER BY tier"
_TIER_DEVICES = "SELECT tier, status, count(*) AS n FROM devices GROUP BY 1, 2"
_USAGE_COLUMNS = """
SELECT u.device_id, d.tier, d.gateway_id, d.status, u.rx_bytes, u.tx_bytes,
       u.rx_bytes + u.tx_bytes AS used, t.byte_limit
FROM usage_totals u JOIN devices d USING (device_id) LEFT JOIN tiers t ON t.tier = d.tier
WHERE u.period = $1
"""
_TOP = _USAGE_COLUMNS + " ORDER BY used DESC, u.device_id LIMIT $2"
_QUOTA_WHERE = (
    " AND t.byte_limit IS NOT NULL AND d.status <> 'revoked'"
    " AND (u.rx_bytes + u.tx_bytes) >= $2::float8 * t.byte_limit"
)
# Filtered first, then ordered: walking the usage index in order (as _TOP does) and testing
# each row against its tier's limit is slower than sorting the few that qualify.
_QUOTA = (
    "WITH near AS MATERIALIZED (" + _USAGE_COLUMNS + _QUOTA_WHERE + ")"
    " SELECT * FROM near ORDER BY used DESC, device_id LIMIT $3"
)
_QUOTA_COUNTS = """
SELECT count(*) FILTER (WHERE u.rx_bytes + u.tx_bytes > t.byte_limit) AS over,
       count(*) FILTER (WHERE u.rx_bytes + u.tx_bytes <= t.byte_limit) AS near
FROM usage_totals u JOIN devices d USING (device_id) JOIN tiers t ON t.tier = d.tier
WHERE u.period = $1 AND t.byte_limit IS NOT NULL AND d.status <> 'revoked'
  AND (u.rx_bytes + u.tx_bytes) >= $2::float8 * t.byte_limit
"""
_USED = "SELECT coalesce(sum(rx_bytes + tx_bytes), 0) FROM usage_totals WHERE period = $1"
_SESSIONS_AT_LIMIT = """
SELECT k.token_id, k.tier, k.active_sessions, t.session_limit
FROM tokens k JOIN tiers t USING (tier)
WHERE t.session_limit IS NOT NULL AND NOT k.revoked AND k.active_sessions >= t.session_limit
ORDER BY k.tier, k.token_id
"""
_CATALOG_KEYS = """
SELECT k.key_id, k.announced_at,
       (SELECT count(*) FROM devices d
        WHERE d.status = 'active' AND k.key_id = ANY(d.pinned_keys)) AS devices_with_key,
       (SELECT count(*) FROM devices d WHERE d.status = 'active') AS devices_active
FROM signing_keys k WHERE k.activated_at IS NULL AND k.retired_at IS NULL
ORDER BY k.announced_at, k.key_id
"""


async def gather(
    conn: Any, period: str, *, top: int = TOP_USAGE, quota_limit: int = QUOTA_LIST_LIMIT
) -> Rows:
    """Read everything the report needs; ``conn`` is an asyncpg connection on the schema."""

    async def fetch(sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await conn.fetch(sql, *args)]

    rows = Rows(period=period)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        rows.gateways = await fetch(_GATEWAYS)
        rows.gateway_devices = await fetch(_GATEWAY_DEVICES)
        rows.front_doors = await fetch(_FRONT_DOORS, period)
        rows.pools = await fetch(_POOLS, period)
        rows.tiers = await fetch(_TIERS)
        rows.tier_devices = await fetch(_TIER_DEVICES)
        rows.top_usage = await fetch(_TOP, period, top)
        rows.quota = await fetch(_QUOTA, period, NEAR_QUOTA, quota_limit)
        counts = await conn.fetchrow(_QUOTA_COUNTS, period, NEAR_QUOTA)
        rows.quota_counts = {"near": int(counts["near"]), "over": int(counts["over"])}
        rows.quarantined = await fetch(
            "SELECT projector, seq, subject, event_type, error FROM quarantine"
            " ORDER BY projector, seq LIMIT 100"
        )
        rows.used_bytes = int(await conn.fetchval(_USED, period))
        rows.sessions_at_limit = await fetch(_SESSIONS_AT_LIMIT)
        rows.catalog_keys = await fetch(_CATALOG_KEYS)
    return rows


# --- rows -> report (pure) ----------------------------------------------------------------------


def gateway_status(
    row: dict[str, Any], now: datetime, ttl_s: float
) -> tuple[GatewayHealth, float | None]:
    beat: datetime | None = row.get("last_heartbeat")
    age = (now - beat).total_seconds() if beat is not None else None
    status = gateway_health(
        active=row.get("active", True),
        registered=row.get("registered", False),
        last_heartbeat=beat,
        now=now,
        ttl=timedelta(seconds=ttl_s),
    )
    return status, age


def _usage(row: dict[str, Any]) -> UsageRow:
    limit = row.get("byte_limit")
    used = int(row["used"])
    return UsageRow(
        device_id=row["device_id"],
        tier=row["tier"],
        gateway_id=row["gateway_id"],
        status=row["status"],
        rx_bytes=int(row["rx_bytes"]),
        tx_bytes=int(row["tx_bytes"]),
        used=used,
        byte_limit=limit,
        share=(used / limit) if limit else None,
    )


def _pool(r: dict[str, Any]) -> PoolRow:
    try:
        addresses = len(egress.addresses(list(r["ips"])))
    except DammError:  # an inventory recorded before it was checked
        addresses = 0
    per_address = int(r["devices_per_address"])
    transfer = r.get("transfer_per_address")
    load = egress.pool_load(
        int(r["devices_assigned"]),
        int(r["traffic_bytes"]),
        addresses,
        per_address,
        int(transfer) if transfer is not None else None,
    )
    return PoolRow(
        pool_id=r["pool_id"],
        provider=r["provider"],
        region=r["region"],
        countries=list(r["countries"]),
        ips=list(r["ips"]),
        load=load,
        headroom=1.0 - load,
        active=bool(r["active"]),
        devices_active=int(r["devices_active"]),
        low_headroom=bool(r["active"]) and 1.0 - load < LOW_HEADROOM,
        addresses=addresses,
        devices_per_address=per_address,
        devices_assigned=int(r["devices_assigned"]),
        traffic_bytes=int(r["traffic_bytes"]),
        transfer_per_address=int(transfer) if transfer is not None else None,
    )


def build(rows: Rows, now: datetime, ttl_s: float) -> Report:
    per_gateway: dict[str, dict[str, int]] = {}
    for r in rows.gateway_devices:
        per_gateway.setdefault(r["gateway_id"], {})[r["status"]] = int(r["n"])

    gateways: list[GatewayRow] = []
    for r in rows.gateways:
        status, age = gateway_status(r, now, ttl_s)
        counts = per_gateway.get(r["gateway_id"], {})
        gateways.append(
            GatewayRow(
                gateway_id=r["gateway_id"],
                region=r["region"],
                status=status,
                last_heartbeat=r.get("last_heartbeat"),
                heartbeat_age_s=round(age, 1) if age is not None else None,
                load=float(r.get("load") or 0.0),
                peer_count=int(r.get("peer_count") or 0),
                active_peers=int(r.get("active_peers") or 0),
                devices_active=counts.get("active", 0),
                devices_total=sum(counts.values()),
            )
        )

    regions: list[RegionRow] = []
    for region in sorted({g.region for g in gateways}):
        members = [g for g in gateways if g.region == region]
        healthy = [g for g in members if g.status == "healthy"]
        load = sum(g.load for g in healthy) / len(healthy) if healthy else 1.0
        regions.append(
            RegionRow(
                region=region,
                gateways=len(members),
                healthy=len(healthy),
                stale=sum(1 for g in members if g.status == "stale"),
                load=round(load, 4),
                headroom=round(max(0.0, 1.0 - load), 4),
                devices_active=sum(g.devices_active for g in members),
                peers=sum(g.peer_count for g in members),
                near_capacity=load >= NEAR_CAPACITY_LOAD,
            )
        )

    doors = [
        FrontDoorRow(
            gateway_id=r["gateway_id"],
            front_door_id=r["front_door_id"],
            endpoint=r["endpoint"],
            transport=r["transport"],
            priority=int(r["priority"]),
            active=bool(r["active"]),
            devices=int(r["devices"]),
            devices_seen=int(r.get("devices_seen", 0)),
        )
        for r in rows.front_doors
    ]

    pools = [_pool(r) for r in rows.pools]

    by_tier: dict[str, dict[str, int]] = {}
    by_status: dict[str, int] = {}
    for r in rows.tier_devices:
        by_tier.setdefault(r["tier"], {})[r["status"]] = int(r["n"])
        by_status[r["status"]] = by_status.get(r["status"], 0) + int(r["n"])
    tiers = [
        TierRow(
            tier=r["tier"],
            byte_limit=r.get("byte_limit"),
            session_limit=r.get("session_limit"),
            status=r.get("status", "active"),
            devices=dict(sorted(by_tier.get(r["tier"], {}).items())),
        )
        for r in rows.tiers
    ]

    quota = [_usage(r) for r in rows.quota]
    over = [u for u in quota if u.byte_limit is not None and u.used > u.byte_limit]
    near = [u for u in quota if u.byte_limit is not None and u.used <= u.byte_limit]

    report = Report(
        generated_at=now,
        period=rows.period,
        heartbeat_ttl_s=ttl_s,
        totals=Totals(
            gateways=len(gateways),
            gateways_healthy=sum(1 for g in gateways if g.status == "healthy"),
            devices=sum(by_status.values()),
            devices_by_status=dict(sorted(by_status.items())),
            front_doors=len(doors),
            egress_pools=len(pools),
            used_bytes=rows.used_bytes,
            near_quota=rows.quota_counts.get("near", len(near)),
            over_quota=rows.quota_counts.get("over", len(over)),
        ),
        regions=regions,
        gateways=gateways,
        front_doors=doors,
        egress_pools=pools,
        tiers=tiers,
        top_usage=[_usage(r) for r in rows.top_usage],
        near_quota=near,
        over_quota=over,
        tokens_at_session_limit=[
            SessionRow(
                token_id=r["token_id"],
                tier=r["tier"],
                active_sessions=int(r["active_sessions"]),
                session_limit=int(r["session_limit"]),
            )
            for r in rows.sessions_at_limit
        ],
        recommendations=[],
        catalog_keys=[
            CatalogKeyRow(
                key_id=r["key_id"],
                announced_at=r["announced_at"],
                devices_with_key=int(r["devices_with_key"]),
                devices_active=int(r["devices_active"]),
            )
            for r in rows.catalog_keys
        ],
        quarantined=[
            QuarantinedRow(
                projector=r["projector"],
                seq=int(r["seq"]),
                subject=r["subject"],
                event_type=r["event_type"],
                error=r["error"],
            )
            for r in rows.quarantined
        ],
    )
    report.recommendations = recommend(report)
    return report


_SEVERITY = {"critical": 0, "warning": 1, "info": 2}


def recommend(report: Report) -> list[Recommendation]:
    """Placement advice from a built report; most severe first, then by kind and subject."""
    out: list[Recommendation] = []
    for q in report.quarantined:
        out.append(
            Recommendation(
                severity="critical",
                kind="events_quarantined",
                subject=f"{q.projector}:{q.seq}",
                message=(
                    f"event {q.seq} on {q.subject} ({q.event_type}) was not applied to the "
                    f"read models: {q.error[:160]}; the read models miss what it said"
                ),
            )
        )
    for region in report.regions:
        if region.healthy == 0:
            out.append(
                Recommendation(
                    severity="critical",
                    kind="region_without_capacity",
                    subject=region.region,
                    message=(
                        f"region {region.region} has no healthy gateway ({region.gateways} "
                        f"known, {region.stale} stale): enrollments there fail; "
                        "restore a gateway or add one"
                    ),
                )
            )
        elif region.near_capacity:
            out.append(
                Recommendation(
                    severity="warning",
                    kind="region_near_capacity",
                    subject=region.region,
                    message=(
                        f"region {region.region} runs at {region.load:.0%} average load over "
                        f"{region.healthy} healthy gateway(s): add a gateway"
                    ),
                )
            )
    for g in report.gateways:
        if g.status == "stale":
            age = f"{g.heartbeat_age_s:.0f}s ago" if g.heartbeat_age_s is not None else "never"
            out.append(
                Recommendation(
                    severity="warning",
                    kind="gateway_stale",
                    subject=g.gateway_id,
                    message=(
                        f"gateway {g.gateway_id} ({g.region}) last heartbeat {age} "
                        f"(ttl {report.heartbeat_ttl_s:.0f}s): new devices are not placed "
                        f"there; {g.devices_active} active device(s) attached — check the agent"
                    ),
                )
            )
    for p in report.egress_pools:
        if p.low_headroom:
            moved = (
                f"; {p.traffic_bytes} B of {p.addresses * p.transfer_per_address} B allowed "
                "moved this period"
                if p.transfer_per_address
                else ""
            )
            out.append(
                Recommendation(
                    severity="warning",
                    kind="pool_low_headroom",
                    subject=p.pool_id,
                    message=(
                        f"egress pool {p.pool_id} ({p.region}, {','.join(p.countries)}) has "
                        f"{p.headroom:.0%} headroom: {p.devices_assigned} device(s) on "
                        f"{p.addresses} address(es) at {p.devices_per_address} per address"
                        f"{moved}: add IPs or another pool for these countries"
                    ),
                )
            )
    gateways = {g.gateway_id: g for g in report.gateways}
    for d in report.front_doors:
        if not d.active:
            continue
        if d.devices == 0:
            out.append(
                Recommendation(
                    severity="info",
                    kind="front_door_unused",
                    subject=f"{d.gateway_id}/{d.front_door_id}",
                    message=(
                        f"front door {d.gateway_id}/{d.front_door_id} ({d.endpoint}) has no "
                        "device attached (by enrollment or a reported failover): keep it only "
                        "as a failover target, else retire it"
                    ),
                )
            )
        elif d.devices_seen == 0 and (gw := gateways.get(d.gateway_id)) is not None:
            # Handshake evidence: the gateway's live peers fall short of its active devices,
            # and none of this door's devices sent traffic, so some devices here are not
            # getting through. A gateway whose every active device has a live handshake is not
            # accused, even if its devices have been idle.
            if gw.active_peers >= gw.devices_active:
                continue
            out.append(
                Recommendation(
                    severity="info",
                    kind="front_door_silent",
                    subject=f"{d.gateway_id}/{d.front_door_id}",
                    message=(
                        f"front door {d.gateway_id}/{d.front_door_id} ({d.endpoint}) has "
                        f"{d.devices} device(s) attached and no traffic from any in "
                        f"{report.period}; gateway {d.gateway_id} reports a live handshake for "
                        f"{gw.active_peers} of its {gw.devices_active} active devices: check "
                        "that the endpoint is reachable before relying on it"
                    ),
                )
            )
    if report.totals.over_quota:
        out.append(
            Recommendation(
                severity="info",
                kind="devices_over_quota",
                subject=report.period,
                message=(
                    f"{report.totals.over_quota} device(s) over quota and "
                    f"{report.totals.near_quota} near it in {report.period}: review tier limits"
                ),
            )
        )
    for s in report.tokens_at_session_limit:
        out.append(
            Recommendation(
                severity="info",
                kind="token_at_session_limit",
                subject=s.token_id,
                message=(
                    f"token {s.token_id} (tier {s.tier}) has {s.active_sessions} active devices, "
                    f"its limit of {s.session_limit}: enrollments with it are refused until one "
                    "is revoked, or the tier's session limit is raised"
                ),
            )
        )
    for k in report.catalog_keys:
        if k.devices_with_key < k.devices_active:
            missing = k.devices_active - k.devices_with_key
            out.append(
                Recommendation(
                    severity="warning",
                    kind="catalog_key_not_fetched",
                    subject=k.key_id,
                    message=(
                        f"announced signing key {k.key_id} was fetched by {k.devices_with_key} "
                        f"of {k.devices_active} active devices: activating it now strands "
                        f"{missing} (their failover fails until they re-enroll); wait until "
                        "more have fetched a catalog"
                    ),
                )
            )
    out.sort(key=lambda r: (_SEVERITY.get(r.severity, 9), r.kind, r.subject))
    return out


async def generate(
    dsn: str, *, ttl_s: float = 90.0, now: datetime | None = None, schema: str = "damm"
) -> Report:
    import asyncpg

    now = now or datetime.now(UTC)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        rows = await gather(conn, period_at(now, settings.usage_period()))
    finally:
        await conn.close()
    return build(rows, now, ttl_s)


def to_json(report: Report) -> bytes:
    return msgspec.json.encode(report)
