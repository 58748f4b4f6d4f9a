"""What the orchestrator may ask: record its steps, add the gateways it makes, hold its lease.

Only control-plane handlers write the log, so the orchestrator's evidence goes through here.
Every route is under ``orchestrator.``, which makes the actor of each event ``orchestrator``:
``damm admin audit --actor orchestrator`` shows the fleet's history. Front doors, gateway
status and egress reuse the admin handlers' decisions unchanged, under the same prefix.

A managed gateway's token is derived by the orchestrator from a secret it keeps, so an apply
killed after the gateway was recorded can derive the same token again and finish the host;
adding the same gateway with the same token is therefore a no-op, not a conflict.
"""

from __future__ import annotations

import asyncio
import hmac
from datetime import datetime, timedelta

import nats.js.errors

from damm.control.context import Context
from damm.control.handlers.admin import AdminHandlers
from damm.errors import Code, DammError
from damm.events import codec
from damm.events import model as m
from damm.events.store import Append, ConflictError
from damm.keys.tokens import gateway_password_hash, token_hash
from damm.protocol import messages as p
from damm.protocol.router import Call, Route, route
from damm.subjects import event_subject

LEASE_ATTEMPTS = 3


def lease_decision(
    last: m.OrchestratorLeaseTaken | None, req: p.TakeLease, now: datetime
) -> m.OrchestratorLeaseTaken:
    """Take or renew the lease unless someone else holds an unexpired one."""
    if last is not None and last.holder != req.holder and last.expires_at > now:
        raise DammError(
            Code.LEASE_HELD,
            f"{req.name} held by {last.holder} until {last.expires_at:%H:%M:%S} UTC",
        )
    return m.OrchestratorLeaseTaken(
        name=req.name, holder=req.holder, expires_at=now + timedelta(seconds=req.ttl_s)
    )


def step_event(req: p.RecordStep) -> m.Event:
    fields = dict(
        plan_id=req.plan_id,
        step=req.step,
        action=req.action,
        target=req.target,
        region=req.region,
        provider=req.provider,
        provider_ref=req.provider_ref,
        reason=req.reason,
    )
    match req.phase:
        case "planned":
            return m.OrchestratorStepPlanned(**fields)  # type: ignore[arg-type]
        case "started":
            return m.OrchestratorStepStarted(**fields)  # type: ignore[arg-type]
        case "succeeded":
            return m.OrchestratorStepSucceeded(**fields)  # type: ignore[arg-type]
        case "failed":
            return m.OrchestratorStepFailed(
                **fields,  # type: ignore[arg-type]
                error_code=req.error_code,
                error=req.error,
            )


class OrchestratorHandlers:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.admin = AdminHandlers(ctx)

    def routes(self) -> list[Route]:
        return [
            route("orchestrator.step", p.RecordStep, self.record_step),
            route("orchestrator.lease", p.TakeLease, self.take_lease),
            route("orchestrator.gateway.add", p.AddManagedGateway, self.add_gateway),
            route("orchestrator.gateway.front_door", p.SetFrontDoor, self.admin.set_front_door),
            route("orchestrator.gateway.status", p.SetGatewayStatus, self.admin.set_gateway_status),
            route("orchestrator.egress.define", p.DefineEgress, self.admin.define_egress),
        ]

    async def record_step(self, req: p.RecordStep, call: Call) -> p.Done:
        subject = event_subject("orchestrator", req.plan_id)
        item = self.ctx.append(subject, step_event(req), call, msg_id=f"step-{call.correlation_id}")
        result = await self.ctx.store.append(item)
        return p.Done(seq=result.seqs[-1] if result.seqs else 0, duplicate=result.duplicate)

    async def take_lease(self, req: p.TakeLease, call: Call) -> p.LeaseTaken:
        subject = event_subject("orchestrator", f"lease-{req.name}")
        for attempt in range(LEASE_ATTEMPTS):
            seq, last = await self._last_lease(subject)
            event = lease_decision(last, req, self.ctx.now())
            item = self.ctx.append(subject, event, call, expected=seq)
            try:
                await self.ctx.store.append(item)
            except ConflictError:  # another orchestrator took it between our read and write
                await asyncio.sleep(0.01 * (attempt + 1))
                continue
            return p.LeaseTaken(holder=event.holder, expires_at=event.expires_at)
        raise DammError(Code.LEASE_HELD, f"{req.name} is contended")

    async def _last_lease(self, subject: str) -> tuple[int, m.OrchestratorLeaseTaken | None]:
        store = self.ctx.store
        try:
            raw = await store.js.get_last_msg(store.stream, subject)
        except nats.js.errors.NotFoundError:
            return 0, None
        seq = int(raw.seq or 0)
        try:
            event = codec.decode(raw.data or b"", seq=seq).event
        except codec.CodecError:
            return seq, None
        return seq, event if isinstance(event, m.OrchestratorLeaseTaken) else None

    async def add_gateway(self, req: p.AddManagedGateway, call: Call) -> p.Done:
        region = req.region.lower()
        digest = token_hash(req.token)
        await self.ctx.fresh(lambda: req.gateway_id in self.ctx.state.gateways)
        known = self.ctx.state.gateways.get(req.gateway_id)
        if known is not None:
            if hmac.compare_digest(known.token_hash, digest) and known.region == region:
                return p.Done(
                    seq=self.ctx.state.seq_of(event_subject("gateway", known.gateway_id)),
                    duplicate=True,
                )
            raise DammError(Code.ALREADY_EXISTS, f"gateway {req.gateway_id!r}")
        nats_hash = await asyncio.to_thread(gateway_password_hash, req.token)
        subject = event_subject("gateway", req.gateway_id)

        def decide() -> list[Append]:
            if req.gateway_id in self.ctx.state.gateways:
                raise DammError(Code.ALREADY_EXISTS, f"gateway {req.gateway_id!r}")
            event = m.GatewayAdded(
                gateway_id=req.gateway_id,
                region=region,
                token_hash=digest,
                nats_password_bcrypt=nats_hash,
            )
            return [self.ctx.append(subject, event, call, expected=0)]

        result = await self.ctx.commit(decide, call)
        return p.Done(seq=result.seqs[-1] if result.seqs else 0, duplicate=result.duplicate)
