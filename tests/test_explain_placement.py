"""Placement explained whole: every eligible gateway with its figures, the winner marked."""

from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from nats.aio.client import Client as NATS

from damm.cli.admin import admin
from damm.cli.common import Target
from damm.control.process import ControlPlane
from damm.domain.placement import (
    RANKING,
    EgressPool,
    GatewayCandidate,
    PlacementRequest,
    TierPolicy,
    explain,
)
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.stack.nats_server import NatsServer
from tests.fleet import enroll, heartbeat, setup_fleet
from tests.test_placement import (
    ANY,
    NOW,
    TTL,
    door,
    gateway,
    gateways_st,
    pool,
    pools_st,
    request_st,
    run,
    tier_st,
)


def test_scores_carry_every_component_and_mark_the_winner() -> None:
    gws = [
        gateway("a", load=0.3, peers=5, age=40, doors=(door("fd1", priority=20), door("fd2"))),
        gateway("b", load=0.1, peers=9, age=5),
        gateway("c", load=0.3, peers=2, age=80),
        gateway("d", age=None),
    ]
    pools = [pool("p1", load=0.75, headroom=0.25)]
    out = explain(PlacementRequest("eu", "DE"), ANY, gws, pools, now=NOW, heartbeat_ttl=TTL)
    ranked = [(s.rank, s.gateway.id, s.chosen) for s in out.scores]
    assert ranked == [(1, "b", True), (2, "c", False), (3, "a", False)]
    a = out.scores[2]
    assert (a.load, a.gateway.peer_count, a.heartbeat_age_s) == (0.3, 5, 40.0)
    assert (a.front_door.id, a.front_door.priority) == ("fd2", 10)
    assert a.egress_pool is not None and a.egress_headroom == 0.25
    assert out.chosen is not None and out.chosen.gateway.id == "b"
    assert "d" not in [s.gateway.id for s in out.scores]  # rejected, with its reason
    assert RANKING[0].startswith("gateway load")


def test_no_scores_when_nothing_is_eligible() -> None:
    out = explain(PlacementRequest(), ANY, [gateway(age=None)], [], now=NOW, heartbeat_ttl=TTL)
    assert out.error is not None and out.scores == ()


@settings(max_examples=200, deadline=None)
@given(request_st, tier_st, gateways_st(), pools_st())
def test_scores_agree_with_place(
    req: PlacementRequest,
    tier: TierPolicy,
    gws: list[GatewayCandidate],
    pools: list[EgressPool],
) -> None:
    out = explain(req, tier, gws, pools, now=NOW, heartbeat_ttl=TTL)
    assert [s.gateway for s in out.scores] == list(out.candidates)
    assert [s.rank for s in out.scores] == list(range(1, len(out.scores) + 1))
    assert sum(s.chosen for s in out.scores) == (1 if out.chosen else 0)
    if out.chosen is not None:
        win = out.scores[0]
        assert win.chosen and win.gateway == out.chosen.gateway
        assert win.front_door == out.chosen.front_door and win.egress_pool == out.chosen.egress_pool
        assert all(s.heartbeat_age_s <= TTL.total_seconds() for s in out.scores)
        placed = run(gws, pools, region=req.region, country=req.exit_country, tier=tier)
        assert win.gateway == placed.gateway


async def test_explain_over_the_bus_and_the_cli(
    control: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    nats_server: NatsServer,
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet = await setup_fleet(
        admin_nc, gateway_nc, countries=("DE",), gateways=(("gw1", "eu"), ("gw2", "eu"))
    )
    await heartbeat(gateway_nc, "gw1", fleet["gw1_token"], load=0.6)
    await heartbeat(gateway_nc, "gw2", fleet["gw2_token"], load=0.2)
    await call(
        admin_nc,
        "admin.egress.define",
        p.DefineEgress(pool_id="eu-de", region="eu", countries=("DE",), ips=("198.51.100.7",)),
        p.Done,
    )
    for _ in range(4):  # four devices on the pool's only address: load 4/128
        await enroll(device_nc, fleet["token"], exit_country="DE")

    res = await call(
        admin_nc,
        "admin.explain_placement",
        p.ExplainPlacement(tier="gold", exit_country="DE"),
        p.PlacementExplained,
    )
    assert [(c.rank, c.gateway_id, c.chosen) for c in res.candidates] == [
        (1, "gw2", True),
        (2, "gw1", False),
    ]
    win = res.candidates[0]
    assert win.load == 0.2 and win.front_door_id == "fd1" and win.egress_pool_id == "eu-de"
    assert win.egress_load == pytest.approx(4 / 128)
    assert win.egress_headroom == pytest.approx(1 - 4 / 128)
    assert 0 <= win.heartbeat_age_s < 30 and res.ranking == RANKING

    monkeypatch.setenv("DAMM_ADMIN_PASSWORD", nats_server.passwords["admin"])
    runner = CliRunner()

    def invoke(*args: str) -> str:
        result = runner.invoke(
            admin,
            ["explain-placement", "--tier", "gold", "--exit-country", "DE", *args],
            obj=Target(nats_server.url, dsn),
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        return result.output

    text = await asyncio.to_thread(invoke)
    chosen = [line for line in text.splitlines() if "<- chosen" in line]
    assert len(chosen) == 1 and "gw2" in chosen[0] and "headroom 97%" in chosen[0]
    assert "gw1" in text and "load 0.60" in text and "ranked by gateway load" in text
    as_json = json.loads(await asyncio.to_thread(invoke, "--json"))
    assert [c["gateway_id"] for c in as_json["candidates"]] == ["gw2", "gw1"]
    assert as_json["candidates"][0]["chosen"] is True
    assert {"load", "heartbeat_age_s", "front_door_priority", "egress_headroom"} <= set(
        as_json["candidates"][1]
    )
