"""Turning the folded state into placement's pure inputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timedelta

from damm.control.context import Context
from damm.control.state import DecisionState
from damm.domain import placement as pl
from damm.errors import Code, DammError
from damm.events import model as m
from damm.protocol import messages as p


def tier_policy(tier: m.TierDefined) -> pl.TierPolicy:
    return pl.TierPolicy(tier.tier, frozenset(tier.regions), frozenset(tier.exit_countries))


def candidates(
    state: DecisionState, pending: Mapping[str, int] | None = None
) -> list[pl.GatewayCandidate]:
    """Every gateway, for a full explanation; ``pending`` adds assignments not yet folded."""
    out = []
    for gateway_id in state.gateways:
        cand = state.candidate(gateway_id)
        assert cand is not None
        if pending and (extra := pending.get(gateway_id)):
            cand = replace(cand, assigned=cand.assigned + extra)
        out.append(cand)
    return out


def pools(state: DecisionState, now: datetime) -> list[pl.EgressPool]:
    """Pools with load and headroom measured from the devices assigned to them in the log; the
    figures an operator once typed into ``egress.defined`` are not evidence and are ignored."""
    out = []
    for e in state.pools.values():
        load = state.pool_load(e.pool_id, now)
        out.append(
            pl.EgressPool(
                e.pool_id,
                e.provider,
                e.region,
                frozenset(e.countries),
                e.ips,
                load,
                1.0 - load,
                e.active,
            )
        )
    return out


def explain_for(ctx: Context, req: p.ExplainPlacement) -> p.PlacementExplained:
    tier = ctx.state.tiers.get(req.tier)
    if tier is None:
        raise DammError(Code.NOT_FOUND, f"tier {req.tier!r}")
    now = ctx.now()
    result = pl.explain(
        pl.PlacementRequest(req.region, req.exit_country),
        tier_policy(tier),
        candidates(ctx.state),
        pools(ctx.state, now),
        now=now,
        heartbeat_ttl=timedelta(seconds=ctx.settings.heartbeat_ttl_s),
        capacity=ctx.state.placement.capacity,
    )
    chosen = result.chosen
    error = None
    if result.error is not None:
        err = result.error
        error = p.ErrorBody(err.code.slug, err.code.message, err.detail, err.code.retryable)
    return p.PlacementExplained(
        gateway_id=chosen.gateway.id if chosen else None,
        front_door_id=chosen.front_door.id if chosen else None,
        endpoint=chosen.front_door.endpoint if chosen else None,
        egress_pool_id=chosen.egress_pool.id if chosen and chosen.egress_pool else None,
        error=error,
        rejected=tuple(p.Rejected(r.kind, r.id, r.reason) for r in result.rejections),
        candidates=tuple(_scored(c) for c in result.scores),
        ranking=pl.RANKING,
    )


def _scored(c: pl.CandidateScore) -> p.ScoredCandidate:
    pool = c.egress_pool
    return p.ScoredCandidate(
        rank=c.rank,
        chosen=c.chosen,
        gateway_id=c.gateway.id,
        region=c.gateway.region,
        load=c.load,
        peer_count=c.gateway.peer_count,
        heartbeat_age_s=round(c.heartbeat_age_s, 3),
        front_door_id=c.front_door.id,
        front_door_priority=c.front_door.priority,
        egress_pool_id=pool.id if pool else None,
        egress_load=pool.load if pool else None,
        egress_headroom=c.egress_headroom,
    )
