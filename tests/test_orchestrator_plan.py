"""The planner and its guardrails, without any server: values in, a plan out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damm.errors import Code, DammError
from damm.orchestrator import actions as a
from damm.orchestrator import topology as t
from damm.orchestrator.fleet import Fleet, GatewayNow, PoolNow
from damm.orchestrator.plan import is_dead, plan, stale_reason
from damm.orchestrator.simulate import applied
from damm.reports.report import Recommendation

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
REGIONS = ("eu", "us", "ap")
ROOT = Path(__file__).resolve().parent.parent


def topo(regions: dict[str, t.Region], **rails: object) -> t.Topology:
    return t.Topology(
        providers={"lab": t.Provider(kind="netns", price_per_gateway_month=10.0)},
        regions=regions,
        guardrails=t.Guardrails(**rails),  # type: ignore[arg-type]
    )


def gw(gid: str, region: str = "eu", **kw: object) -> GatewayNow:
    base: dict[str, object] = dict(
        status="healthy",
        load=0.1,
        silent_s=1.0,
        front_doors={"fd1": True},
        provider="lab",
        host="running",
    )
    base.update(kw)
    return GatewayNow(gateway_id=gid, region=region, **base)  # type: ignore[arg-type]


# --- examples the issue names -------------------------------------------------------------------


def test_two_gateways_wanted_gives_two_additions_with_reasons() -> None:
    desired = topo({"eu": t.Region(provider="lab", gateways=2)}, cooldown_s=0)
    result = plan(desired, Fleet(), [], NOW)
    assert [type(x) for x in result.actions] == [a.AddGateway, a.AddGateway]
    assert [x.gateway_id for x in result.actions] == ["eu-1", "eu-2"]  # type: ignore[union-attr]
    assert all("topology asks for 2 gateway(s) in eu" in x.reason for x in result.actions)
    assert not result.refusals


def test_fleet_as_desired_gives_an_empty_plan() -> None:
    desired = topo({"eu": t.Region(provider="lab", gateways=2)})
    assert plan(desired, Fleet(gateways=(gw("eu-1"), gw("eu-2"))), [], NOW).empty


def test_load_over_target_scales_out_and_says_why() -> None:
    desired = topo({"eu": t.Region(provider="lab", min_gateways=1, target_load=0.6)})
    fleet = Fleet(gateways=(gw("eu-1", load=0.9), gw("eu-2", load=0.74)))
    note = Recommendation(
        severity="warning", kind="region_near_capacity", subject="eu", message="add a gateway"
    )
    result = plan(desired, fleet, [note], NOW)
    assert len(result.actions) == 1
    assert "eu load 0.82 over target 0.60" in result.actions[0].reason
    assert "report: add a gateway" in result.actions[0].reason


def test_region_cap_refuses_scale_out_with_its_code() -> None:
    desired = topo({"eu": t.Region(provider="lab", max_gateways=2, target_load=0.5)})
    fleet = Fleet(gateways=(gw("eu-1", load=1.0), gw("eu-2", load=1.0)))
    result = plan(desired, fleet, [], NOW)
    assert not result.actions
    assert [r.code for r in result.refusals] == [Code.GUARDRAIL_REGION_CAP.slug] * 2
    assert "maximum is 2" in result.refusals[0].detail


def test_dead_gateway_is_replaced_with_a_reason_naming_the_silence() -> None:
    desired = topo({"eu": t.Region(provider="lab", gateways=2)}, dead_after_s=60)
    fleet = Fleet(gateways=(gw("eu-1"), gw("eu-2", status="stale", silent_s=300.0)))
    (action,) = plan(desired, fleet, [], NOW).actions
    assert isinstance(action, a.ReplaceGateway)
    assert action.gateway_id == "eu-2" and action.new_gateway_id == "eu-3"
    assert action.reason == "eu-2 silent for 5 min"


def test_host_gone_is_dead_at_once() -> None:
    assert is_dead(gw("eu-1", host="missing"), 120)
    assert not is_dead(gw("eu-1", host="missing", provider=None), 120)  # not ours to replace


def test_retire_refusals_last_gateway_min_healthy_and_devices() -> None:
    one = topo({"eu": t.Region(provider="lab", gateways=0, min_healthy=0)})
    last = plan(one, Fleet(gateways=(gw("eu-1"),)), [], NOW)
    assert [r.code for r in last.refusals] == [Code.GUARDRAIL_LAST_GATEWAY.slug]

    rails = topo({"eu": t.Region(provider="lab", gateways=1, min_healthy=2)})
    low = plan(rails, Fleet(gateways=(gw("eu-1"), gw("eu-2"))), [], NOW)
    assert [r.code for r in low.refusals] == [Code.GUARDRAIL_MIN_HEALTHY.slug]

    busy = topo({"eu": t.Region(provider="lab", gateways=1, min_healthy=1)})
    fleet = Fleet(gateways=(gw("eu-1", devices_active=3), gw("eu-2", devices_active=1)))
    refused = plan(busy, fleet, [], NOW).refusals
    assert [r.code for r in refused] == [Code.GUARDRAIL_ACTIVE_DEVICES.slug]
    assert "eu-2 carries 1 active device(s)" in refused[0].detail


def test_cost_provider_cap_region_and_cooldown_refusals() -> None:
    costly = topo({"eu": t.Region(provider="lab", gateways=3)}, max_monthly_cost=25.0)
    result = plan(costly, Fleet(), [], NOW)
    assert len(result.actions) == 2
    assert [r.code for r in result.refusals] == [Code.GUARDRAIL_COST.slug]

    capped = t.Topology(
        providers={"lab": t.Provider(kind="netns", max_gateways=1, regions=("us",))},
        regions={"eu": t.Region(provider="lab", gateways=1)},
    )
    assert [r.code for r in plan(capped, Fleet(), [], NOW).refusals] == [
        Code.GUARDRAIL_PROVIDER_REGION.slug
    ]

    cool = topo({"eu": t.Region(provider="lab", gateways=2)}, cooldown_s=300)
    fleet = Fleet(gateways=(gw("eu-1"),), last_scaled={"eu": NOW - timedelta(seconds=100)})
    refused = plan(cool, fleet, [], NOW).refusals
    assert [r.code for r in refused] == [Code.GUARDRAIL_COOLDOWN.slug]
    assert "scaled 100s ago; cool-down is 300s" in refused[0].detail


def test_change_budget_lists_the_rest_as_refused() -> None:
    desired = topo({"eu": t.Region(provider="lab", gateways=5)}, max_changes_per_apply=2)
    result = plan(desired, Fleet(), [], NOW)
    assert len(result.actions) == 2
    assert [r.code for r in result.refusals] == [Code.GUARDRAIL_CHANGE_BUDGET.slug] * 3


def test_front_doors_and_egress() -> None:
    desired = topo(
        {
            "eu": t.Region(
                provider="lab",
                gateways=1,
                front_doors=("fd1", "fd2"),
                egress=(t.Egress(country="DE", min_headroom=0.3), t.Egress(country="NL")),
            )
        }
    )
    fleet = Fleet(
        gateways=(gw("eu-1", front_doors={"fd1": True, "old": True}),),
        pools=(PoolNow(pool_id="p", region="eu", countries=("DE",), headroom=0.1),),
    )
    reasons = {type(x).__name__: x.reason for x in plan(desired, fleet, [], NOW).actions}
    assert reasons["AddFrontDoor"].startswith("topology lists front door fd2")
    assert reasons["DeactivateFrontDoor"] == "front door old of eu-1 is no longer in the topology"
    egress = [x for x in plan(desired, fleet, [], NOW).actions if isinstance(x, a.AddEgress)]
    assert [x.reason for x in egress] == [
        "egress DE in eu headroom 0.10 under minimum 0.30",
        "no egress pool serves NL in eu",
    ]


def test_saved_plan_goes_stale_on_foreign_change_not_on_its_own_steps() -> None:
    desired = topo({"eu": t.Region(provider="lab", gateways=2)})
    saved = plan(desired, Fleet(gateways=(gw("x-1", region="x"),)), [], NOW)
    half = Fleet(gateways=(gw("x-1", region="x"), gw("eu-1", status="unregistered")))
    assert stale_reason(saved, desired, half) is None
    other = Fleet(gateways=(gw("x-1", region="x", status="disabled"),))
    assert stale_reason(saved, desired, other) == (
        "the fleet changed (gateways, hosts, front doors or pools)"
    )
    changed = topo({"eu": t.Region(provider="lab", gateways=3)})
    assert stale_reason(saved, changed, half) == "the topology file changed"


def test_plan_round_trips_as_json() -> None:
    desired = topo({"eu": t.Region(provider="lab", gateways=2, max_gateways=1)})
    result = plan(desired, Fleet(), [], NOW)
    assert msgspec.json.decode(msgspec.json.encode(result), type=a.Plan) == result


def test_example_topology_parses_and_bad_ones_are_refused() -> None:
    example = t.load(ROOT / "ops" / "fleet.example.toml")
    assert example.regions
    with pytest.raises(DammError) as err:
        t.parse({"providers": {}, "regions": {"eu": {"provider": "nope"}}})
    assert err.value.code is Code.TOPOLOGY_INVALID
    with pytest.raises(DammError) as err:
        t.parse({"providers": {"p": {"kind": "netns"}}, "regions": {"EU!": {"provider": "p"}}})
    assert err.value.code is Code.TOPOLOGY_INVALID


# --- properties --------------------------------------------------------------------------------

doors = st.lists(st.sampled_from(("fd1", "fd2", "fd3")), min_size=1, max_size=3, unique=True)


@st.composite
def fleets(draw: st.DrawFn, regions: tuple[str, ...], managed_only: bool = False) -> Fleet:
    gateways = []
    for region in regions:
        for n in range(draw(st.integers(0, 4))):
            gateways.append(
                gw(
                    f"{region}-{n + 1}",
                    region,
                    status=draw(st.sampled_from(("healthy", "stale", "unregistered", "disabled"))),
                    load=draw(st.floats(0, 1)),
                    silent_s=draw(st.none() | st.floats(0, 1000)),
                    devices_active=0 if managed_only else draw(st.integers(0, 3)),
                    front_doors={d: draw(st.booleans()) for d in draw(doors)},
                    provider="lab" if managed_only else draw(st.sampled_from(("lab", None))),
                    host=draw(st.sampled_from(("running", "missing"))),
                )
            )
    pools = [
        PoolNow(
            pool_id=f"pool-{i}",
            region=draw(st.sampled_from(regions)),
            countries=(draw(st.sampled_from(("DE", "NL"))),),
            headroom=draw(st.floats(0, 1)),
            active=draw(st.booleans()),
        )
        for i in range(draw(st.integers(0, 3)))
    ]
    return Fleet(gateways=tuple(gateways), pools=tuple(pools))


@st.composite
def regions_spec(draw: st.DrawFn, fixed: bool) -> dict[str, t.Region]:
    names = draw(st.lists(st.sampled_from(REGIONS), min_size=1, max_size=3, unique=True))
    out = {}
    for name in names:
        egress = tuple(
            t.Egress(country=c, min_headroom=draw(st.floats(0, 1)))
            for c in draw(st.lists(st.sampled_from(("DE", "NL")), max_size=2, unique=True))
        )
        low = draw(st.integers(0, 2))
        out[name] = t.Region(
            provider="lab",
            gateways=draw(st.integers(1, 5)) if fixed else draw(st.none() | st.integers(0, 5)),
            min_gateways=low,
            max_gateways=50 if fixed else draw(st.integers(low, 6)),
            target_load=draw(st.floats(0.2, 1.0)),
            min_healthy=0 if fixed else draw(st.integers(0, 3)),
            front_doors=tuple(draw(doors)),
            egress=egress,
        )
    return out


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_applying_plans_reaches_the_desired_topology(data: st.DataObject) -> None:
    """With room in every guardrail, plan-then-apply converges and the last plan is empty."""
    regions = data.draw(regions_spec(fixed=True))
    desired = topo(regions, cooldown_s=0, max_changes_per_apply=3)
    fleet = data.draw(fleets(tuple(regions), managed_only=True))
    now = NOW
    for _ in range(40):
        result = plan(desired, fleet, [], now)
        assert not result.refusals or all(
            r.code == Code.GUARDRAIL_CHANGE_BUDGET.slug for r in result.refusals
        )
        if not result.actions:
            break
        fleet = applied(fleet, result, now)
        now += timedelta(seconds=1)
    assert plan(desired, fleet, [], now).empty
    for name, spec in regions.items():
        serving = [g for g in fleet.in_region(name) if not is_dead(g, 120)]
        assert len(serving) == spec.gateways
        for g in serving:
            if g.status == "healthy" and g.host == "running":
                assert {d for d, on in g.front_doors.items() if on} == set(spec.front_doors)
        for egress in spec.egress:
            assert any(
                p.active
                and p.region == name
                and egress.country in p.countries
                and p.headroom >= egress.min_headroom
                for p in fleet.pools
            )


def _serving(g: GatewayNow) -> bool:
    return g.status == "healthy" and not is_dead(g, 60.0)


def _counts(fleet: Fleet, desired: t.Topology) -> tuple[dict[str, int], int, float]:
    per_region: dict[str, int] = {}
    hosted = 0
    for g in fleet.gateways:
        if g.status == "disabled":
            continue
        per_region[g.region] = per_region.get(g.region, 0) + 1
        hosted += g.provider is not None
    return per_region, hosted, hosted * desired.providers["lab"].price_per_gateway_month


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_no_sequence_of_plans_breaks_a_guardrail(data: st.DataObject) -> None:
    regions = data.draw(regions_spec(fixed=False))
    cap = data.draw(st.none() | st.integers(0, 8))
    desired = t.Topology(
        providers={"lab": t.Provider(kind="netns", price_per_gateway_month=5.0, max_gateways=cap)},
        regions=regions,
        guardrails=t.Guardrails(
            max_changes_per_apply=data.draw(st.integers(1, 5)),
            cooldown_s=data.draw(st.sampled_from((0.0, 30.0, 300.0))),
            max_monthly_cost=data.draw(st.none() | st.floats(0, 40)),
            dead_after_s=60.0,
        ),
    )
    fleet = data.draw(fleets(tuple(regions)))
    now = NOW
    for _ in range(data.draw(st.integers(1, 6))):
        result = plan(desired, fleet, [], now)
        after = applied(fleet, result, now)
        rails = desired.guardrails
        assert len(result.actions) <= rails.max_changes_per_apply
        before_regions, before_hosted, _ = _counts(fleet, desired)
        after_regions, after_hosted, after_cost = _counts(after, desired)
        for name, spec in regions.items():
            grew = after_regions.get(name, 0) > before_regions.get(name, 0)
            assert not grew or after_regions[name] <= spec.max_gateways
            dead = {g.gateway_id for g in fleet.gateways if is_dead(g, rails.dead_after_s)}
            scaled = any(
                x.region == name
                and (
                    (isinstance(x, a.AddGateway) and x.gateway_id not in dead)
                    # neither clearing away nor remaking a dead gateway is a scaling step
                    or (isinstance(x, a.RetireGateway) and x.gateway_id not in dead)
                )
                for x in result.actions
            )
            last = fleet.last_scaled.get(name)
            if scaled and last is not None:
                assert (now - last).total_seconds() >= rails.cooldown_s
            healthy_before = sum(1 for g in fleet.in_region(name) if _serving(g))
            for x in result.actions:
                if isinstance(x, a.RetireGateway) and x.region == name:
                    retired = next(g for g in fleet.gateways if g.gateway_id == x.gateway_id)
                    # A dead gateway's devices are cut off already; clearing it away is allowed.
                    assert retired.devices_active == 0 or is_dead(retired, 60.0)
            retired_healthy = sum(
                1
                for x in result.actions
                if isinstance(x, a.RetireGateway)
                and x.region == name
                and _serving(next(g for g in fleet.gateways if g.gateway_id == x.gateway_id))
            )
            if retired_healthy:
                assert healthy_before - retired_healthy >= spec.min_healthy
                assert after_regions.get(name, 0) >= 1
        if after_hosted > before_hosted:
            assert cap is None or after_hosted <= cap
            assert rails.max_monthly_cost is None or after_cost <= rails.max_monthly_cost + 1e-9
        # The world moves on: time passes, a host may die, loads change.
        now += timedelta(seconds=data.draw(st.sampled_from((1, 45, 400))))
        victims = data.draw(
            st.sets(st.sampled_from([g.gateway_id for g in after.gateways] or [""]))
        )
        fleet = msgspec.structs.replace(
            after,
            gateways=tuple(
                msgspec.structs.replace(
                    g,
                    host="missing",
                    status="stale",
                    silent_s=500.0,
                    load=data.draw(st.floats(0, 1)),
                )
                if g.gateway_id in victims and g.provider is not None and g.status != "disabled"
                else msgspec.structs.replace(g, load=data.draw(st.floats(0, 1)))
                for g in after.gateways
            ),
        )


def test_a_gateway_whose_host_vanished_does_not_count_as_healthy() -> None:
    """Found by the property above: a dead host still reported healthy let a retire through."""
    desired = topo({"eu": t.Region(provider="lab", max_gateways=0, min_healthy=2)})
    fleet = Fleet(gateways=(gw("eu-1"), gw("eu-2"), gw("eu-3", host="missing")))
    result = plan(desired, fleet, [], NOW)
    retired = [x.gateway_id for x in result.actions if isinstance(x, a.RetireGateway)]
    assert retired == ["eu-3"]
    assert {r.code for r in result.refusals} == {Code.GUARDRAIL_MIN_HEALTHY.slug}


def test_a_gateway_cut_short_while_being_made_is_made_again_under_its_name() -> None:
    desired = topo({"eu": t.Region(provider="lab", gateways=2, max_gateways=2)}, cooldown_s=300)
    fleet = Fleet(
        gateways=(
            gw("eu-1"),
            gw("eu-2", status="unregistered", host="missing", silent_s=3.0, front_doors={}),
        ),
        last_scaled={"eu": NOW - timedelta(seconds=3)},
    )
    result = plan(desired, fleet, [], NOW)
    assert not result.refusals  # neither growth (cap) nor scaling (cool-down)
    (action,) = result.actions
    assert isinstance(action, a.AddGateway) and action.gateway_id == "eu-2"
    assert action.reason == "eu-2 was recorded but its host never came up: make it again"
