"""Where a device lands: a gateway, its front door, and an egress pool.

Placement is a pure function of the request, the tier and a snapshot of the fleet, with ``now``
passed in, so the enrollment handler and ``damm admin explain-placement`` reach the same answer
from the same read models, and tests need neither a clock nor a bus. Every candidate that is
passed over is recorded with a short reason: "no healthy gateway" on its own tells an operator
nothing, the list of why-nots tells them which heartbeat stopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sortedcontainers import SortedList

from damm.domain.health import gateway_health
from damm.errors import Code, DammError

RejectionKind = Literal["gateway", "front_door", "egress_pool"]

# Enough for an operator to see the pattern on one CLI line; explain() has the full list.
_SUMMARY_LIMIT = 5
# Peers at which a reported load reads 1.0, the agent's default --capacity.
DEFAULT_CAPACITY = 1000


@dataclass(frozen=True, slots=True)
class FrontDoor:
    id: str
    endpoint: str
    transport: str
    priority: int
    active: bool


@dataclass(frozen=True, slots=True)
class GatewayCandidate:
    id: str
    region: str
    registered: bool
    active: bool
    last_heartbeat: datetime | None
    load: float
    peer_count: int
    front_doors: tuple[FrontDoor, ...]
    # Devices placed here that its last heartbeat did not count yet. Load is learnt from
    # heartbeats only, so without this a burst lands on whichever gateway sorts first.
    assigned: int = 0


RankKey = tuple[float, int, str]


def rank_key(gw: GatewayCandidate, capacity: int, pending: int = 0) -> RankKey:
    """Effective load (reported plus assigned since), then peers, then id: lowest is best."""
    assigned = gw.assigned + pending
    return (gw.load + assigned / max(capacity, 1), gw.peer_count + assigned, gw.id)


@dataclass(frozen=True, slots=True)
class EgressPool:
    id: str
    provider: str
    region: str
    countries: frozenset[str]
    ips: tuple[str, ...]
    load: float
    headroom: float
    active: bool


@dataclass(frozen=True, slots=True)
class TierPolicy:
    """An empty set means "no restriction", not "nothing allowed"."""

    name: str
    regions: frozenset[str] = frozenset()
    exit_countries: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    region: str | None = None
    exit_country: str | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    kind: RejectionKind
    id: str
    reason: str

    def line(self) -> str:
        return f"{self.kind} {self.id}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Placement:
    gateway: GatewayCandidate
    front_door: FrontDoor
    egress_pool: EgressPool | None
    rejected: tuple[Rejection, ...]


# How eligible gateways are ordered, first key first; front doors and pools are picked within
# the winner (front door: lowest priority; pool: lowest load, then most headroom).
RANKING = (
    "gateway load plus devices assigned since its last heartbeat / capacity (lower wins)",
    "peer count plus those devices (fewer wins)",
    "gateway id",
)


@dataclass(frozen=True, slots=True)
class CandidateScore:
    """One eligible gateway with every figure placement looked at; rank 1 is the winner.

    Freshness and front-door priority are shown for the operator (a gateway about to go stale,
    a door about to be used) but do not reorder gateways: every gateway shown is fresh enough.
    """

    rank: int
    chosen: bool
    gateway: GatewayCandidate
    heartbeat_age_s: float
    front_door: FrontDoor
    egress_pool: EgressPool | None

    @property
    def load(self) -> float:
        return self.gateway.load

    @property
    def egress_headroom(self) -> float | None:
        return self.egress_pool.headroom if self.egress_pool else None


@dataclass(frozen=True, slots=True)
class PlacementExplanation:
    """What ``place`` would do, as data: the choice or the error, never both.

    ``candidates`` are the gateways that passed every check, best first, so an operator can see
    where devices go when the chosen one drops out; ``scores`` are the same, with their figures.
    """

    request: PlacementRequest
    tier: str
    chosen: Placement | None
    error: DammError | None
    rejections: tuple[Rejection, ...]
    candidates: tuple[GatewayCandidate, ...]
    scores: tuple[CandidateScore, ...] = ()


def _seconds(delta: timedelta) -> str:
    total = delta.total_seconds()
    return f"{total:.0f}s" if total == int(total) else f"{total:.1f}s"


def _normalise(request: PlacementRequest) -> PlacementRequest:
    region = request.region.strip() if request.region else None
    country = request.exit_country.strip().upper() if request.exit_country else None
    return PlacementRequest(region=region or None, exit_country=country or None)


def _check_policy(request: PlacementRequest, tier: TierPolicy) -> None:
    if request.region is not None and tier.regions and request.region not in tier.regions:
        allowed = ", ".join(sorted(tier.regions))
        raise DammError(
            Code.OUT_OF_POLICY,
            f"region {request.region} not allowed by tier {tier.name} (allowed: {allowed})",
        )
    country = request.exit_country
    if country is not None and tier.exit_countries and country not in tier.exit_countries:
        allowed = ", ".join(sorted(tier.exit_countries))
        raise DammError(
            Code.OUT_OF_POLICY,
            f"exit country {country} not allowed by tier {tier.name} (allowed: {allowed})",
        )


def _gateway_health(
    gw: GatewayCandidate,
    request: PlacementRequest,
    tier: TierPolicy,
    now: datetime,
    ttl: timedelta,
) -> str | None:
    """The first reason the gateway cannot take a device, ignoring egress; None if it can."""
    if request.region is not None:
        if gw.region != request.region:
            return f"region {gw.region} is not the requested {request.region}"
    elif tier.regions and gw.region not in tier.regions:
        return f"region {gw.region} not allowed by tier {tier.name}"
    beat = gw.last_heartbeat
    if beat is not None and (beat.tzinfo is None or beat.utcoffset() is None):
        return "heartbeat timestamp has no timezone"
    match gateway_health(
        active=gw.active, registered=gw.registered, last_heartbeat=beat, now=now, ttl=ttl
    ):
        case "disabled":
            return "inactive"
        case "unregistered":
            return "not registered"
        case "stale" if beat is None:
            return "no heartbeat yet"
        case "stale":
            assert beat is not None
            return f"heartbeat stale: last {_seconds(now - beat)} ago > ttl {_seconds(ttl)}"
    if not any(fd.active for fd in gw.front_doors):
        return "no active front door" if gw.front_doors else "no front doors"
    return None


def _usable(
    gw: GatewayCandidate,
    request: PlacementRequest,
    tier: TierPolicy,
    now: datetime,
    ttl: timedelta,
) -> bool:
    """``_gateway_health(...) is None`` without composing reasons: the indexed walk may pass
    many stale gateways and needs no explanation for them."""
    if request.region is not None:
        if gw.region != request.region:
            return False
    elif tier.regions and gw.region not in tier.regions:
        return False
    beat = gw.last_heartbeat
    if beat is None or beat.tzinfo is None or beat.utcoffset() is None:
        return False
    health = gateway_health(
        active=gw.active, registered=gw.registered, last_heartbeat=beat, now=now, ttl=ttl
    )
    return health == "healthy" and any(fd.active for fd in gw.front_doors)


def _best_front_door(gw: GatewayCandidate) -> FrontDoor:
    return min((fd for fd in gw.front_doors if fd.active), key=lambda fd: (fd.priority, fd.id))


def _best_pool(pools: Iterable[EgressPool]) -> EgressPool | None:
    return min(pools, key=lambda p: (p.load, -p.headroom, p.id), default=None)


def _pools_for(
    gw: GatewayCandidate, pools: Sequence[EgressPool], country: str | None
) -> list[EgressPool]:
    return [
        p
        for p in pools
        if p.active and p.region == gw.region and (country is None or country in p.countries)
    ]


def _where(request: PlacementRequest, tier: TierPolicy) -> str:
    if request.region is not None:
        where = f"region {request.region}"
    elif tier.regions:
        where = f"regions {', '.join(sorted(tier.regions))} (tier {tier.name})"
    else:
        where = "any region"
    if request.exit_country is not None:
        where += f" with exit {request.exit_country}"
    return where


def _summary(rejections: Sequence[Rejection]) -> str:
    shown = "; ".join(f"{r.id}: {r.reason}" for r in rejections[:_SUMMARY_LIMIT])
    more = len(rejections) - _SUMMARY_LIMIT
    return shown + (f"; and {more} more" if more > 0 else "")


def _ids(gateways: Sequence[GatewayCandidate]) -> str:
    shown = ", ".join(gw.id for gw in gateways[:_SUMMARY_LIMIT])
    more = len(gateways) - _SUMMARY_LIMIT
    return shown + (f" and {more} more" if more > 0 else "")


def _validate_clock(now: datetime, heartbeat_ttl: timedelta) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise DammError(Code.INVALID_ARGUMENT, "placement clock must be timezone-aware")
    if heartbeat_ttl < timedelta(0):
        raise DammError(
            Code.INVALID_ARGUMENT, f"heartbeat ttl must not be negative: {heartbeat_ttl}"
        )


def explain(
    request: PlacementRequest,
    tier: TierPolicy,
    gateways: Sequence[GatewayCandidate],
    pools: Sequence[EgressPool],
    *,
    now: datetime,
    heartbeat_ttl: timedelta,
    capacity: int = DEFAULT_CAPACITY,
) -> PlacementExplanation:
    """Run placement and report every decision, turning placement failures into data.

    Only a caller's own mistake (a naive clock, a negative ttl) raises; out-of-policy requests and
    an empty fleet are answers an operator asked to see.
    """
    _validate_clock(now, heartbeat_ttl)
    req = _normalise(request)
    try:
        _check_policy(req, tier)
    except DammError as refused:
        return PlacementExplanation(req, tier.name, None, refused, (), ())

    gw_rejections: list[Rejection] = []
    fd_rejections: list[Rejection] = []
    healthy: list[GatewayCandidate] = []
    for gw in sorted(gateways, key=lambda g: g.id):
        reason = _gateway_health(gw, req, tier, now, heartbeat_ttl)
        if reason is not None:
            gw_rejections.append(Rejection("gateway", gw.id, reason))
            continue
        healthy.append(gw)
        for fd in sorted(gw.front_doors, key=lambda f: f.id):
            if not fd.active:
                fd_rejections.append(Rejection("front_door", f"{gw.id}/{fd.id}", "inactive"))

    country = req.exit_country
    candidates: list[tuple[GatewayCandidate, EgressPool | None]] = []
    for gw in healthy:
        served = _pools_for(gw, pools, country)
        if country is not None and not served:
            gw_rejections.append(
                Rejection("gateway", gw.id, f"no egress pool for {country} in region {gw.region}")
            )
            continue
        candidates.append((gw, _best_pool(served)))
    candidates.sort(key=lambda c: rank_key(c[0], capacity))

    pool_rejections = _pool_rejections(pools, healthy, country)
    rejections = (*gw_rejections, *fd_rejections, *pool_rejections)
    ranked = tuple(gw for gw, _ in candidates)

    if not candidates:
        where = _where(req, tier)
        if healthy:
            regions = sorted({gw.region for gw in healthy})
            label = "region" if len(regions) == 1 else "regions"
            err = DammError(
                Code.NO_EGRESS,
                f"no egress pool for {country} in {label} {', '.join(regions)}; "
                f"healthy gateways: {_ids(healthy)}",
            )
        elif gw_rejections:
            err = DammError(
                Code.NO_HEALTHY_GATEWAY,
                f"{where}: {len(gw_rejections)} gateway(s) rejected: {_summary(gw_rejections)}",
            )
        else:
            err = DammError(Code.NO_HEALTHY_GATEWAY, f"{where}: no gateways known")
        return PlacementExplanation(req, tier.name, None, err, rejections, ranked)

    scores = tuple(
        CandidateScore(
            rank=i + 1,
            chosen=i == 0,
            gateway=c_gw,
            heartbeat_age_s=(now - c_gw.last_heartbeat).total_seconds()
            if c_gw.last_heartbeat
            else 0.0,
            front_door=_best_front_door(c_gw),
            egress_pool=c_pool,
        )
        for i, (c_gw, c_pool) in enumerate(candidates)
    )
    gw, pool = candidates[0]
    chosen = Placement(gw, scores[0].front_door, pool, rejections)
    return PlacementExplanation(req, tier.name, chosen, None, rejections, ranked, scores)


def _pool_rejections(
    pools: Sequence[EgressPool], healthy: Sequence[GatewayCandidate], country: str | None
) -> list[Rejection]:
    """Why-nots for pools, limited to regions that had a healthy gateway to attach them to."""
    regions = {gw.region for gw in healthy}
    out: list[Rejection] = []
    for p in sorted(pools, key=lambda p: p.id):
        if p.region not in regions:
            continue
        if not p.active:
            out.append(Rejection("egress_pool", p.id, "inactive"))
        elif country is not None and country not in p.countries:
            out.append(Rejection("egress_pool", p.id, f"does not serve {country}"))
    return out


def place(
    request: PlacementRequest,
    tier: TierPolicy,
    gateways: Sequence[GatewayCandidate],
    pools: Sequence[EgressPool],
    *,
    now: datetime,
    heartbeat_ttl: timedelta,
    capacity: int = DEFAULT_CAPACITY,
) -> Placement:
    """Choose a gateway, front door and egress pool, or raise the catalog error saying why not.

    Gateways: lowest effective load (``rank_key``), then fewest peers, then id. Front doors:
    lowest priority, then id. Pools: lowest load, then most headroom, then id. Ties end on ids
    so every handler replica picks the same answer.
    """
    result = explain(
        request, tier, gateways, pools, now=now, heartbeat_ttl=heartbeat_ttl, capacity=capacity
    )
    if result.error is not None:
        raise result.error
    assert result.chosen is not None
    return result.chosen


def _eligible(gw: GatewayCandidate) -> bool:
    return gw.active and gw.registered and any(fd.active for fd in gw.front_doors)


class PlacementIndex:
    """Gateways that could take a device, per region, in ``rank_key`` order.

    Enrollment walks a region from the best entry and stops at the first healthy one, instead of
    rebuilding and sorting the whole fleet per request. Only heartbeat freshness is left to the
    walk (it depends on the clock); everything else that excludes a gateway keeps it out of the
    index. A heartbeat that changes neither load nor peers only swaps the candidate, leaving the
    order alone.
    """

    __slots__ = ("_keys", "_regions", "capacity", "gateways")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = max(capacity, 1)
        self.gateways: dict[str, GatewayCandidate] = {}
        self._keys: dict[str, tuple[str, RankKey]] = {}
        self._regions: dict[str, SortedList[RankKey]] = {}

    def put(self, gw: GatewayCandidate) -> None:
        """Insert or update one gateway (after any event that changes what placement sees)."""
        key = rank_key(gw, self.capacity)
        old = self._keys.get(gw.id)
        if old is not None and old == (gw.region, key) and _eligible(gw):
            self.gateways[gw.id] = gw
            return
        self.remove(gw.id)
        if not _eligible(gw):
            return
        self.gateways[gw.id] = gw
        self._keys[gw.id] = (gw.region, key)
        self._regions.setdefault(gw.region, SortedList()).add(key)

    def remove(self, gateway_id: str) -> None:
        old = self._keys.pop(gateway_id, None)
        self.gateways.pop(gateway_id, None)
        if old is not None:
            region, key = old
            ranked = self._regions[region]
            ranked.remove(key)
            if not ranked:
                del self._regions[region]

    def regions(self) -> set[str]:
        return set(self._regions)

    def ranked(self, region: str) -> Iterator[GatewayCandidate]:
        for key in self._regions.get(region, ()):
            yield self.gateways[key[2]]


def place_indexed(
    request: PlacementRequest,
    tier: TierPolicy,
    index: PlacementIndex,
    pools: Sequence[EgressPool],
    *,
    now: datetime,
    heartbeat_ttl: timedelta,
    pending: Mapping[str, int] | None = None,
) -> Placement | None:
    """``place`` over the index: the same choice, or None where ``place`` would refuse (then
    call ``explain`` for the reasons; refusals are rare, so they may cost a full pass).

    ``pending`` counts devices this caller already placed but the index has not seen yet (a
    group of enrollments decided together). Entries are walked in order of their indexed key;
    a pending count can only raise a key, so the walk stops at the first indexed key above the
    best one found. Raises only for an out-of-policy request, like ``place``.
    """
    _validate_clock(now, heartbeat_ttl)
    req = _normalise(request)
    _check_policy(req, tier)
    extra = pending or {}
    if req.region is not None:
        regions = [req.region]
    else:
        regions = sorted(index.regions() & tier.regions if tier.regions else index.regions())
    country = req.exit_country
    best: tuple[RankKey, GatewayCandidate, list[EgressPool]] | None = None
    for region in regions:
        served = [
            p
            for p in pools
            if p.active and p.region == region and (country is None or country in p.countries)
        ]
        if country is not None and not served:
            continue
        for gw in index.ranked(region):
            base = rank_key(gw, index.capacity)
            if best is not None and base > best[0]:
                break
            if not _usable(gw, req, tier, now, heartbeat_ttl):
                continue
            key = rank_key(gw, index.capacity, extra.get(gw.id, 0))
            if best is None or key < best[0]:
                best = (key, gw, served)
    if best is None:
        return None
    _, gw, served = best
    return Placement(gw, _best_front_door(gw), _best_pool(served), ())
