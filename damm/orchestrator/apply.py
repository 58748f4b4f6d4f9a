"""Apply: run a plan's actions through providers, each step an event, safe to run again.

Every step is recorded as planned, started, then succeeded or failed (with the provider's own
name for what it made) through the control plane's ``orchestrator.step`` handler. Steps that
already succeeded for this plan are skipped; a step cut short is done again, and each of its
parts is idempotent: the gateway record (same derived token), the host (the provider's ``list``
says whether it is there), the front doors (same values). So an apply killed half-way and run
again finishes the plan without making anything twice.

Order inside a step matters for who sees what: a new gateway is recorded before its host boots
(its agent must be able to register), and a retired one is disabled before its host goes (so
placement stops choosing it first).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nats.aio.client import Client as NATS

from damm import log
from damm.errors import Code, DammError
from damm.orchestrator import actions as a
from damm.orchestrator import history
from damm.orchestrator.providers.base import Host, HostSpec, Provider
from damm.private_files import load_or_create_seed, private_dir
from damm.protocol import messages as p
from damm.protocol.client import call

_log = log.get("damm.orchestrator.apply")

Outcome = Literal["succeeded", "skipped", "failed"]


def load_secret(state_dir: Path) -> bytes:
    private_dir(state_dir)
    return load_or_create_seed(state_dir / "token.key", "orchestrator token key")


def gateway_token(secret: bytes, gateway_id: str) -> str:
    """The gateway's scoped token, derivable again by this orchestrator alone."""
    mac = hmac.new(secret, f"damm-gateway-token:{gateway_id}".encode(), hashlib.sha256).digest()
    return "dmg_" + base64.urlsafe_b64encode(mac).decode().rstrip("=")


@dataclass(frozen=True)
class StepResult:
    step: int
    action: a.Action
    outcome: Outcome
    provider_ref: str = ""
    error: str = ""


class Applier:
    def __init__(
        self,
        nc: NATS,
        providers: Mapping[str, Provider],
        secret: bytes,
        agent_nats_url: str,
        *,
        timeout: float = 10.0,
    ) -> None:
        self.nc = nc
        self.providers = providers
        self.secret = secret
        self.agent_nats_url = agent_nats_url
        self.timeout = timeout

    async def _call(self, command: str, request: object, result: type[object] = p.Done) -> object:
        return await call(self.nc, command, request, result, timeout=self.timeout)  # type: ignore[arg-type]

    async def _record(
        self, plan_id: str, step: int, phase: p.StepPhase, action: a.Action, **extra: str
    ) -> None:
        await self._call(
            "orchestrator.step",
            p.RecordStep(
                plan_id=plan_id,
                step=step,
                phase=phase,
                action=a.kind_of(action),
                target=a.target_of(action),
                region=action.region,
                provider=action.provider,
                reason=action.reason[:1000],
                **extra,
            ),
        )

    def _provider(self, name: str) -> Provider:
        provider = self.providers.get(name)
        if provider is None:
            raise DammError(Code.PROVIDER_FAILED, f"no provider named {name!r} is configured")
        return provider

    async def apply(self, plan: a.Plan) -> list[StepResult]:
        past = await history.read(self.nc)
        done = past.done(plan.plan_id)
        planned = past.planned.get(plan.plan_id, set())
        for i, action in enumerate(plan.actions):
            if i not in done and i not in planned:
                await self._record(plan.plan_id, i, "planned", action)
        results: list[StepResult] = []
        for i, action in enumerate(plan.actions):
            if i in done:
                results.append(StepResult(i, action, "skipped"))
                continue
            await self._record(plan.plan_id, i, "started", action)
            try:
                ref = await self._execute(action)
            except DammError as err:
                _log.warning("step failed", plan_id=plan.plan_id, step=i, error=err.line())
                await self._record(
                    plan.plan_id,
                    i,
                    "failed",
                    action,
                    error_code=err.code.slug,
                    error=err.detail[:1000],
                )
                results.append(StepResult(i, action, "failed", error=err.line()))
                break  # later steps may rest on this one; the next apply resumes here
            await self._record(plan.plan_id, i, "succeeded", action, provider_ref=ref)
            results.append(StepResult(i, action, "succeeded", provider_ref=ref))
        return results

    async def _execute(self, action: a.Action) -> str:
        match action:
            case a.AddGateway():
                made = await self._gateway(action.gateway_id, action.region, action.provider,
                                           action.front_doors)  # fmt: skip
                return made.provider_ref
            case a.ReplaceGateway():
                new = await self._gateway(action.new_gateway_id, action.region, action.provider,
                                          action.front_doors)  # fmt: skip
                await self._retire(action.gateway_id, action.provider, action.reason)
                return new.provider_ref
            case a.RetireGateway():
                await self._retire(action.gateway_id, action.provider, action.reason)
                return ""
            case a.AddFrontDoor():
                endpoint = await self._provider(action.provider).add_front_door(
                    action.gateway_id, action.front_door_id
                )
                await self._door(action.gateway_id, action.front_door_id, endpoint, True)
                return endpoint
            case a.DeactivateFrontDoor():
                provider = self._provider(action.provider)
                found = await self._host(provider, action.gateway_id)
                door = found.front_doors.get(action.front_door_id) if found else None
                if door is None:
                    raise DammError(
                        Code.PROVIDER_FAILED,
                        f"{action.provider} has no endpoint for "
                        f"{action.gateway_id}/{action.front_door_id}",
                    )
                await self._door(action.gateway_id, action.front_door_id, door, False)
                await provider.remove_front_door(action.gateway_id, action.front_door_id)
                return door
            case a.AddEgress():
                ips = await self._provider(action.provider).add_egress(
                    action.pool_id, action.region, action.country
                )
                await self._call(
                    "orchestrator.egress.define",
                    p.DefineEgress(
                        pool_id=action.pool_id,
                        provider=action.provider,
                        region=action.region,
                        countries=(action.country,),
                        ips=ips,
                    ),
                )
                return ",".join(ips)

    async def _host(self, provider: Provider, gateway_id: str) -> Host | None:
        return next((h for h in await provider.list() if h.gateway_id == gateway_id), None)

    async def _gateway(
        self, gateway_id: str, region: str, provider_name: str, doors: tuple[str, ...]
    ) -> Host:
        provider = self._provider(provider_name)
        token = gateway_token(self.secret, gateway_id)
        await self._call(
            "orchestrator.gateway.add",
            p.AddManagedGateway(gateway_id=gateway_id, region=region, token=token),
        )
        host = await self._host(provider, gateway_id)
        if host is None or host.state != "running":
            host = await provider.create(
                HostSpec(
                    gateway_id=gateway_id,
                    region=region,
                    token=token,
                    nats_url=self.agent_nats_url,
                    front_doors=doors,
                )
            )
        for n, fd in enumerate(doors):
            endpoint = host.front_doors.get(fd) or await provider.add_front_door(gateway_id, fd)
            await self._door(gateway_id, fd, endpoint, True, priority=10 * (n + 1))
        return host

    async def _door(
        self, gateway_id: str, door: str, endpoint: str, active: bool, priority: int = 10
    ) -> None:
        await self._call(
            "orchestrator.gateway.front_door",
            p.SetFrontDoor(
                gateway_id=gateway_id,
                front_door_id=door,
                endpoint=endpoint,
                priority=priority,
                active=active,
            ),
        )

    async def _retire(self, gateway_id: str, provider_name: str, reason: str) -> None:
        try:
            await self._call(
                "orchestrator.gateway.status",
                p.SetGatewayStatus(gateway_id=gateway_id, active=False, reason=reason[:200]),
            )
        except DammError as err:
            if err.code is not Code.NOT_FOUND:  # never recorded: nothing to disable
                raise
        await self._provider(provider_name).destroy(gateway_id)
