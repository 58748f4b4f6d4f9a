"""The control plane's orchestrator handlers: steps as evidence, managed gateways, the lease."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from nats.aio.client import Client as NATS

from damm.control.handlers.orchestrator import lease_decision
from damm.control.process import ControlPlane
from damm.errors import Code, DammError
from damm.events import model as m
from damm.orchestrator import history
from damm.orchestrator.apply import gateway_token
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.reports.audit import AuditFilter, collect, summary

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def test_lease_is_refused_while_another_holds_it_and_free_once_expired() -> None:
    req = p.TakeLease(name="fleet", holder="b", ttl_s=30)
    held = m.OrchestratorLeaseTaken(name="fleet", holder="a", expires_at=NOW + timedelta(seconds=5))
    with pytest.raises(DammError) as err:
        lease_decision(held, req, NOW)
    assert err.value.code is Code.LEASE_HELD
    assert "held by a" in err.value.detail
    assert lease_decision(held, req, NOW + timedelta(seconds=6)).holder == "b"
    assert lease_decision(held, p.TakeLease(name="fleet", holder="a", ttl_s=30), NOW).holder == "a"
    assert lease_decision(None, req, NOW).expires_at == NOW + timedelta(seconds=30)


async def test_two_orchestrators_racing_for_the_lease_one_wins(
    control: ControlPlane, admin_nc: NATS
) -> None:
    async def take(holder: str) -> str:
        try:
            await call(
                admin_nc,
                "orchestrator.lease",
                p.TakeLease(name="fleet", holder=holder, ttl_s=60),
                p.LeaseTaken,
            )
        except DammError as err:
            return err.code.slug
        return "taken"

    results = await asyncio.gather(*(take(f"o{n}") for n in range(5)))
    assert sorted(results) == ["lease_held"] * 4 + ["taken"]


async def test_managed_gateway_add_is_idempotent_for_its_token_only(
    control: ControlPlane, admin_nc: NATS
) -> None:
    token = gateway_token(b"k" * 32, "eu-1")
    request = p.AddManagedGateway(gateway_id="eu-1", region="eu", token=token)
    first = await call(admin_nc, "orchestrator.gateway.add", request, p.Done)
    again = await call(admin_nc, "orchestrator.gateway.add", request, p.Done)
    assert not first.duplicate and again.duplicate
    other = p.AddManagedGateway(
        gateway_id="eu-1", region="eu", token=gateway_token(b"x" * 32, "eu-1")
    )
    with pytest.raises(DammError) as err:
        await call(admin_nc, "orchestrator.gateway.add", other, p.Done)
    assert err.value.code is Code.ALREADY_EXISTS
    with pytest.raises(DammError) as err:
        await call(
            admin_nc,
            "orchestrator.gateway.add",
            p.AddManagedGateway(gateway_id="eu-2", region="eu", token="dmg_short"),
            p.Done,
        )
    assert err.value.code is Code.MALFORMED_REQUEST
    assert "eu-2" not in control.ctx.state.gateways  # type: ignore[union-attr]


async def test_steps_are_events_with_the_orchestrator_as_actor(
    control: ControlPlane, admin_nc: NATS
) -> None:
    for phase in ("planned", "started", "failed"):
        await call(
            admin_nc,
            "orchestrator.step",
            p.RecordStep(
                plan_id="plan1",
                step=0,
                phase=phase,  # type: ignore[arg-type]
                action="add_gateway",
                target="eu-1",
                region="eu",
                provider="lab",
                reason="topology asks for 1 gateway(s) in eu",
                error_code="provider_failed" if phase == "failed" else "",
            ),
            p.Done,
        )
    envs = await collect(admin_nc, AuditFilter(actor="orchestrator"))
    assert [e.type for e in envs] == [
        "orchestrator.step_planned",
        "orchestrator.step_started",
        "orchestrator.step_failed",
    ]
    assert summary(envs[-1]) == ("plan plan1 step 0 add_gateway eu-1 failed (lab): provider_failed")
    past = history.fold(envs)
    assert past.managed == {"eu-1": "lab"} and past.done("plan1") == set()
