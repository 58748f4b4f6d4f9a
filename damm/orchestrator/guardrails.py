"""Provider policy guardrails: a running tally the planner consults before keeping an action.

Each check answers with a refusal carrying its own catalog code, or nothing. The tally starts
from the current fleet and moves with every action the planner keeps, so the second addition in
a region is checked against a count that includes the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from damm.errors import Code
from damm.orchestrator import actions as a
from damm.orchestrator.fleet import Fleet, GatewayNow
from damm.orchestrator.topology import Topology


def _refuse(code: Code, detail: str, action: a.Action) -> a.Refusal:
    return a.Refusal(code=code.slug, detail=detail, action=action)


@dataclass
class Tally:
    topology: Topology
    now: datetime
    last_scaled: dict[str, datetime]
    in_region: dict[str, int] = field(default_factory=dict)  # gateways not disabled
    alive: dict[str, int] = field(default_factory=dict)  # not disabled and not dead
    healthy: dict[str, int] = field(default_factory=dict)
    per_provider: dict[str, int] = field(default_factory=dict)  # gateways it hosts for us
    dead: set[str] = field(default_factory=set)
    changes: int = 0

    @classmethod
    def start(cls, topology: Topology, fleet: Fleet, now: datetime, dead: set[str]) -> Tally:
        tally = cls(topology, now, dict(fleet.last_scaled), dead=set(dead))
        for g in fleet.gateways:
            if g.status == "disabled":
                continue
            tally.in_region[g.region] = tally.in_region.get(g.region, 0) + 1
            if g.gateway_id not in dead:
                tally.alive[g.region] = tally.alive.get(g.region, 0) + 1
            if g.status == "healthy" and g.gateway_id not in dead:  # a vanished host serves none
                tally.healthy[g.region] = tally.healthy.get(g.region, 0) + 1
            if g.provider is not None:
                tally.per_provider[g.provider] = tally.per_provider.get(g.provider, 0) + 1
        return tally

    def monthly_cost(self) -> float:
        providers = self.topology.providers
        return sum(
            n * providers[p].price_per_gateway_month
            for p, n in self.per_provider.items()
            if p in providers
        )

    # --- checks ----------------------------------------------------------------------------

    def check(self, action: a.Action, gateway: GatewayNow | None = None) -> a.Refusal | None:
        refusal = self._policy(action, gateway)
        if refusal is None and self.changes >= self.topology.guardrails.max_changes_per_apply:
            limit = self.topology.guardrails.max_changes_per_apply
            refusal = _refuse(
                Code.GUARDRAIL_CHANGE_BUDGET, f"{limit} change(s) per apply already planned", action
            )
        return refusal

    def _policy(self, action: a.Action, gateway: GatewayNow | None) -> a.Refusal | None:
        provider = self.topology.providers.get(action.provider)
        if provider is not None and provider.regions and action.region not in provider.regions:
            return _refuse(
                Code.GUARDRAIL_PROVIDER_REGION,
                f"provider {action.provider} serves {','.join(provider.regions)}, "
                f"not {action.region}",
                action,
            )
        match action:
            case a.AddGateway() if action.gateway_id in self.dead:
                return None  # making a cut-short gateway again: already counted, not scaling
            case a.AddGateway():
                return self._cooldown(action) or self._growth(action)
            case a.RetireGateway() if action.gateway_id in self.dead:
                return None  # clearing away a dead one neither shrinks capacity nor scales
            case a.RetireGateway():
                return self._retire(action, gateway) or self._cooldown(action)
        return None

    def _cooldown(self, action: a.Action) -> a.Refusal | None:
        last = self.last_scaled.get(action.region)
        wait = self.topology.guardrails.cooldown_s
        if last is None or wait <= 0:
            return None
        since = (self.now - last).total_seconds()
        if since < wait:
            return _refuse(
                Code.GUARDRAIL_COOLDOWN,
                f"{action.region} scaled {since:.0f}s ago; cool-down is {wait:.0f}s",
                action,
            )
        return None

    def _growth(self, action: a.Action) -> a.Refusal | None:
        region = self.topology.regions.get(action.region)
        count = self.in_region.get(action.region, 0)
        if region is not None and count + 1 > region.max_gateways:
            return _refuse(
                Code.GUARDRAIL_REGION_CAP,
                f"{action.region} has {count} gateway(s), its maximum is {region.max_gateways}",
                action,
            )
        provider = self.topology.providers.get(action.provider)
        if provider is None:
            return None
        hosted = self.per_provider.get(action.provider, 0)
        if provider.max_gateways is not None and hosted + 1 > provider.max_gateways:
            return _refuse(
                Code.GUARDRAIL_PROVIDER_CAP,
                f"provider {action.provider} hosts {hosted}, its maximum is "
                f"{provider.max_gateways}",
                action,
            )
        budget = self.topology.guardrails.max_monthly_cost
        if budget is not None:
            after = self.monthly_cost() + provider.price_per_gateway_month
            if after > budget + 1e-9:
                return _refuse(
                    Code.GUARDRAIL_COST,
                    f"monthly cost would be {after:.2f}, over the limit of {budget:.2f}",
                    action,
                )
        return None

    def _retire(self, action: a.Action, gateway: GatewayNow | None) -> a.Refusal | None:
        region = self.topology.regions.get(action.region)
        alive = self.alive.get(action.region, 0)
        if alive <= 1:
            return _refuse(
                Code.GUARDRAIL_LAST_GATEWAY, f"{action.region} would have no gateway left", action
            )
        healthy_after = self.healthy.get(action.region, 0) - (
            1 if gateway is not None and gateway.status == "healthy" else 0
        )
        minimum = region.min_healthy if region is not None else 1
        if healthy_after < minimum:
            return _refuse(
                Code.GUARDRAIL_MIN_HEALTHY,
                f"{action.region} would keep {healthy_after} healthy gateway(s), minimum {minimum}",
                action,
            )
        if gateway is not None and gateway.devices_active > 0:
            return _refuse(
                Code.GUARDRAIL_ACTIVE_DEVICES,
                f"{gateway.gateway_id} carries {gateway.devices_active} active device(s); "
                "move them first (revoke and re-enroll)",
                action,
            )
        return None

    # --- keeping an action -----------------------------------------------------------------

    def keep(self, action: a.Action, gateway: GatewayNow | None = None) -> None:
        self.changes += 1
        match action:
            case a.AddGateway() if action.gateway_id in self.dead:
                self.alive[action.region] = self.alive.get(action.region, 0) + 1
            case a.AddGateway():
                self._count(action.region, action.provider, +1)
            case a.RetireGateway() if action.gateway_id in self.dead:
                self.in_region[action.region] = self.in_region.get(action.region, 0) - 1
                self.per_provider[action.provider] = self.per_provider.get(action.provider, 0) - 1
            case a.RetireGateway():
                self._count(action.region, action.provider, -1)
                if gateway is not None and gateway.status == "healthy":
                    self.healthy[action.region] = self.healthy.get(action.region, 0) - 1
            case a.ReplaceGateway():
                self.alive[action.region] = self.alive.get(action.region, 0) + 1
                old = gateway.provider if gateway is not None else None
                if old is not None and old != action.provider:
                    self.per_provider[old] = self.per_provider.get(old, 0) - 1
                    self.per_provider[action.provider] = (
                        self.per_provider.get(action.provider, 0) + 1
                    )

    def _count(self, region: str, provider: str, delta: int) -> None:
        self.in_region[region] = self.in_region.get(region, 0) + delta
        self.alive[region] = self.alive.get(region, 0) + delta
        self.per_provider[provider] = self.per_provider.get(provider, 0) + delta
