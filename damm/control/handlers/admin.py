"""Operator commands: tiers, tokens, gateways, front doors, egress pools, device lifecycle.

Every one of them is an event carrying the admin as actor; none writes a read model.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import timedelta

import msgspec

from damm import settings
from damm.control.context import Context
from damm.control.placement_view import explain_for
from damm.control.reactors.quota import is_over
from damm.control.state import DecisionState
from damm.domain import egress
from damm.domain.ids import resolve_prefix
from damm.domain.periods import period_at
from damm.errors import Code, DammError
from damm.events import model as m
from damm.events.store import Append
from damm.keys.tokens import gateway_password_hash, token_hash
from damm.protocol import messages as p
from damm.protocol.router import Call, Route, route
from damm.subjects import (
    DEFAULT_POOL,
    address_subject,
    check_id,
    event_subject,
    usage_reset_subject,
)

_COUNTRY_LEN = 2


def _countries(values: Sequence[str]) -> tuple[str, ...]:
    out = []
    for value in values:
        code = value.strip().upper()
        if len(code) != _COUNTRY_LEN or not code.isalpha():
            raise DammError(Code.INVALID_ARGUMENT, f"exit country {value!r} is not ISO alpha-2")
        out.append(code)
    return tuple(sorted(set(out)))


def _regions(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted({check_id(v.strip().lower(), "region") for v in values}))


def _endpoint(value: str) -> str:
    """Accept host:port or udp://host:port; return host:port."""
    raw = value.removeprefix("udp://")
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DammError(Code.INVALID_ARGUMENT, f"front door {value!r} is not host:port")
    return raw


def over_quota(state: DecisionState, device_id: str, period: str) -> None:
    """Refuse to let a device back in while it is over its tier's byte limit this period.

    Resuming it anyway would only last until the quota reactor's next sweep. A usage reset
    (``admin.usage.reset``) or a higher tier limit is what lets it back in.
    """
    dev = state.devices[device_id]
    tier = state.tiers.get(dev.tier)
    limit = tier.byte_limit if tier else None
    used = state.usage.get((device_id, period), 0)
    if is_over(used, limit):
        raise DammError(
            Code.OVER_QUOTA,
            f"device {device_id} used {used} of {limit} bytes in {period}: reset its usage"
            " (`damm admin usage reset`) or raise the tier's byte limit first",
        )


def _named(done: p.Done, ident: str) -> p.Done:
    """The answer names the object by its full id: the request may have used a prefix."""
    return msgspec.structs.replace(done, id=ident)


class AdminHandlers:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def routes(self) -> list[Route]:
        return [
            route("admin.tier.define", p.DefineTier, self.define_tier),
            route("admin.token.create", p.CreateToken, self.create_token),
            route("admin.token.revoke", p.RevokeToken, self.revoke_token),
            route("admin.gateway.add", p.AddGateway, self.add_gateway),
            route("admin.gateway.front_door", p.SetFrontDoor, self.set_front_door),
            route("admin.gateway.status", p.SetGatewayStatus, self.set_gateway_status),
            route("admin.egress.define", p.DefineEgress, self.define_egress),
            route("admin.device.revoke", p.DeviceAction, self.revoke_device),
            route("admin.device.suspend", p.DeviceAction, self.suspend_device),
            route("admin.device.resume", p.DeviceAction, self.resume_device),
            route("admin.usage.reset", p.ResetUsage, self.reset_usage),
            route("admin.explain_placement", p.ExplainPlacement, self.explain_placement),
        ]

    async def _record(self, subject: str, event: m.Event, call: Call) -> p.Done:
        """One event on its aggregate, expecting the sequence this process last saw there."""
        return await self._done(
            lambda: [
                self.ctx.append(subject, event, call, expected=self.ctx.state.seq_of(subject))
            ],
            call,
        )

    async def _gateway(self, gateway_id: str) -> str:
        """The gateway ``gateway_id`` names (its id or a unique prefix of it)."""
        await self.ctx.fresh(lambda: gateway_id in self.ctx.state.gateways)
        return resolve_prefix(self.ctx.state.gateways, gateway_id, "gateway")

    async def _done(self, decide: Callable[[], Sequence[Append]], call: Call) -> p.Done:
        result = await self.ctx.commit(decide, call)
        return p.Done(seq=result.seqs[-1] if result.seqs else 0, duplicate=result.duplicate)

    # --- tiers -------------------------------------------------------------------------------

    async def define_tier(self, req: p.DefineTier, call: Call) -> p.Done:
        check_id(req.tier, "tier")
        for name, value in (
            ("session limit", req.session_limit),
            ("byte limit", req.byte_limit),
            ("key lifetime", req.key_lifetime_s),
        ):
            if value is not None and value <= 0:
                raise DammError(Code.INVALID_ARGUMENT, f"{name} must be positive, got {value}")
        if req.status not in ("active", "retired"):
            raise DammError(Code.INVALID_ARGUMENT, f"status {req.status!r}: active or retired")
        event = m.TierDefined(
            tier=req.tier,
            regions=_regions(req.regions),
            exit_countries=_countries(req.exit_countries),
            session_limit=req.session_limit,
            byte_limit=req.byte_limit,
            key_lifetime_s=req.key_lifetime_s,
            status=req.status,
        )
        subject = event_subject("tier", req.tier)
        return await self._record(subject, event, call)

    # --- tokens ------------------------------------------------------------------------------

    async def create_token(self, req: p.CreateToken, call: Call) -> p.TokenCreated:
        await self.ctx.fresh(lambda: req.tier in self.ctx.state.tiers)
        tier = self.ctx.state.tiers.get(req.tier)
        if tier is None:
            raise DammError(Code.NOT_FOUND, f"tier {req.tier!r}")
        if tier.status != "active":
            raise DammError(Code.INVALID_ARGUMENT, f"tier {req.tier!r} is {tier.status}")
        if req.uses is not None and req.uses <= 0:
            raise DammError(Code.INVALID_ARGUMENT, f"uses must be positive, got {req.uses}")
        if req.ttl_s is not None and req.ttl_s <= 0:
            raise DammError(Code.INVALID_ARGUMENT, f"ttl must be positive, got {req.ttl_s}")
        token = "dmt_" + secrets.token_urlsafe(24)
        token_id = uuid.uuid4().hex[:16]
        expires = self.ctx.now() + timedelta(seconds=req.ttl_s) if req.ttl_s else None
        event = m.TokenIssued(
            token_id=token_id,
            token_hash=token_hash(token),
            tier=req.tier,
            max_uses=req.uses,
            expires_at=expires,
        )
        subject = event_subject("token", token_id)
        await self.ctx.commit(
            lambda: [
                self.ctx.append(
                    subject, event, call, expected=0, msg_id=f"token-{call.correlation_id}"
                )
            ],
            call,
        )
        return p.TokenCreated(token_id, token, req.tier, req.uses, expires)

    async def revoke_token(self, req: p.RevokeToken, call: Call) -> p.Done:
        if req.token_id.startswith("dmt_"):
            raise DammError(
                Code.INVALID_ARGUMENT,
                "that is the token's secret, not its id: `damm admin tokens` lists the ids",
            )
        await self.ctx.fresh(lambda: req.token_id in self.ctx.state.tokens)
        token_id = resolve_prefix(self.ctx.state.tokens, req.token_id, "token")
        subject = event_subject("token", token_id)
        event = m.TokenRevoked(token_id=token_id, reason=req.reason)
        return _named(await self._record(subject, event, call), token_id)

    # --- gateways ----------------------------------------------------------------------------

    async def add_gateway(self, req: p.AddGateway, call: Call) -> p.GatewayAdded:
        check_id(req.gateway_id, "gateway id")
        region = _regions([req.region])[0]
        endpoint = _endpoint(req.front_door) if req.front_door else None
        await self.ctx.fresh(lambda: req.gateway_id not in self.ctx.state.gateways)
        if req.gateway_id in self.ctx.state.gateways:
            raise DammError(Code.ALREADY_EXISTS, f"gateway {req.gateway_id!r}")
        token = "dmg_" + secrets.token_urlsafe(24)
        # The only moment the plaintext exists here: hash it for the gateway's own NATS user.
        nats_hash = await asyncio.to_thread(gateway_password_hash, token)
        subject = event_subject("gateway", req.gateway_id)

        def decide() -> list[Append]:
            if req.gateway_id in self.ctx.state.gateways:
                raise DammError(Code.ALREADY_EXISTS, f"gateway {req.gateway_id!r}")
            items = [
                self.ctx.append(
                    subject,
                    m.GatewayAdded(
                        gateway_id=req.gateway_id,
                        region=region,
                        token_hash=token_hash(token),
                        nats_password_bcrypt=nats_hash,
                    ),
                    call,
                    expected=0,
                )
            ]
            if endpoint:
                items.append(
                    self.ctx.append(
                        subject,
                        m.FrontDoorSet(
                            gateway_id=req.gateway_id,
                            front_door_id="fd1",
                            endpoint=endpoint,
                            priority=req.priority,
                        ),
                        call,
                    )
                )
            return items

        await self.ctx.commit(decide, call)
        return p.GatewayAdded(req.gateway_id, token)

    async def set_front_door(self, req: p.SetFrontDoor, call: Call) -> p.Done:
        check_id(req.front_door_id, "front door id")
        endpoint = _endpoint(req.endpoint)
        if req.transport != "udp":
            raise DammError(Code.INVALID_ARGUMENT, f"transport {req.transport!r}: only udp")
        req = msgspec.structs.replace(req, gateway_id=await self._gateway(req.gateway_id))
        subject = event_subject("gateway", req.gateway_id)
        event = m.FrontDoorSet(
            gateway_id=req.gateway_id,
            front_door_id=req.front_door_id,
            endpoint=endpoint,
            transport=req.transport,
            priority=req.priority,
            active=req.active,
        )
        return _named(await self._record(subject, event, call), req.gateway_id)

    async def set_gateway_status(self, req: p.SetGatewayStatus, call: Call) -> p.Done:
        req = msgspec.structs.replace(req, gateway_id=await self._gateway(req.gateway_id))
        subject = event_subject("gateway", req.gateway_id)
        event = m.GatewayStatusChanged(
            gateway_id=req.gateway_id, active=req.active, reason=req.reason
        )
        return _named(await self._record(subject, event, call), req.gateway_id)

    async def define_egress(self, req: p.DefineEgress, call: Call) -> p.Done:
        check_id(req.pool_id, "egress pool id")
        ips: list[str] = []
        for value in req.ips:
            try:
                ips.append(str(ipaddress.ip_network(value, strict=False)))
            except ValueError:
                raise DammError(Code.INVALID_ARGUMENT, f"egress IP {value!r}") from None
        for name, score in (("load", req.load), ("headroom", req.headroom)):
            if not 0.0 <= score <= 1.0:
                raise DammError(Code.INVALID_ARGUMENT, f"{name} must be within 0..1, got {score}")
        if not req.countries:
            raise DammError(Code.INVALID_ARGUMENT, "an egress pool serves at least one country")
        usable = egress.addresses(ips)
        event = m.EgressPoolDefined(
            pool_id=req.pool_id,
            provider=req.provider,
            region=_regions([req.region])[0],
            countries=_countries(req.countries),
            ips=tuple(ips),
            load=req.load,
            headroom=req.headroom,
            active=req.active,
            devices_per_address=req.devices_per_address,
            transfer_per_address=req.transfer_per_address,
        )
        subject = event_subject("egress", req.pool_id)
        await self.ctx.follower.sync()  # assignments other replicas made count too

        def decide() -> list[Append]:
            # Devices' NAT rules name their address: it cannot vanish from under them.
            in_use = self.ctx.state.egress_in_use.get(req.pool_id, Counter())
            if dropped := egress.orphaned(usable, in_use):
                shown = ", ".join(f"{a} ({in_use[a]} devices)" for a in dropped[:5])
                raise DammError(Code.EGRESS_IN_USE, f"pool {req.pool_id} would drop {shown}")
            return [self.ctx.append(subject, event, call, expected=self.ctx.state.seq_of(subject))]

        return await self._done(decide, call)

    # --- device lifecycle --------------------------------------------------------------------

    async def _device(self, req: p.DeviceAction) -> p.DeviceAction:
        """``req`` naming its device by full id (it may name it by a unique prefix)."""
        await self.ctx.fresh(lambda: req.device_id in self.ctx.state.devices)
        device_id = resolve_prefix(self.ctx.state.devices, req.device_id, "device")
        return msgspec.structs.replace(req, device_id=device_id)

    async def revoke_device(self, req: p.DeviceAction, call: Call) -> p.Done:
        req = await self._device(req)

        def decide() -> list[Append]:
            dev = self.ctx.state.devices[req.device_id]
            if dev.status == "revoked":
                return []
            subject = event_subject("device", dev.device_id)
            ipam_subject = address_subject(dev.index)
            return [
                self.ctx.append(
                    subject,
                    # The revoke itself releases the token's session: the token's subject is
                    # left to enrollments, so a revoke never races them for its sequence.
                    m.DeviceRevoked(
                        device_id=dev.device_id, reason=req.reason, token_id=dev.token_id
                    ),
                    call,
                    expected=self.ctx.state.seq_of(subject),
                ),
                self.ctx.append(
                    ipam_subject,
                    m.AddressReleased(pool=DEFAULT_POOL, index=dev.index, device_id=dev.device_id),
                    call,
                    expected=self.ctx.state.seq_of(ipam_subject),
                ),
            ]

        return _named(await self._done(decide, call), req.device_id)

    async def _status(
        self,
        req: p.DeviceAction,
        call: Call,
        event: m.Event,
        allowed_from: tuple[str, ...],
        check: Callable[[DecisionState, str, str], None] | None = None,
    ) -> p.Done:
        subject = event_subject("device", req.device_id)

        def decide() -> list[Append]:
            dev = self.ctx.state.devices[req.device_id]
            if dev.status == "revoked":
                raise DammError(Code.DEVICE_REVOKED, f"device {dev.device_id}")
            if dev.status not in allowed_from:
                return []
            if check is not None:
                check(
                    self.ctx.state,
                    dev.device_id,
                    period_at(self.ctx.now(), settings.usage_period()),
                )
            return [self.ctx.append(subject, event, call, expected=self.ctx.state.seq_of(subject))]

        return _named(await self._done(decide, call), req.device_id)

    async def suspend_device(self, req: p.DeviceAction, call: Call) -> p.Done:
        req = await self._device(req)
        event = m.DeviceSuspended(device_id=req.device_id, reason=req.reason or "admin")
        return await self._status(req, call, event, ("active",))

    async def resume_device(self, req: p.DeviceAction, call: Call) -> p.Done:
        req = await self._device(req)
        event = m.DeviceResumed(device_id=req.device_id, reason=req.reason or "admin")
        return await self._status(req, call, event, ("suspended",), check=over_quota)

    async def reset_usage(self, req: p.ResetUsage, call: Call) -> p.Done:
        await self.ctx.fresh(lambda: req.device_id in self.ctx.state.devices)
        req = msgspec.structs.replace(
            req, device_id=resolve_prefix(self.ctx.state.devices, req.device_id, "device")
        )
        now = self.ctx.now()
        period = req.period or period_at(now, settings.usage_period())
        subject = usage_reset_subject(req.device_id)
        event = m.UsagePeriodReset(device_id=req.device_id, period=period)
        return _named(
            await self._done(lambda: [self.ctx.append(subject, event, call)], call), req.device_id
        )

    async def explain_placement(self, req: p.ExplainPlacement, call: Call) -> p.PlacementExplained:
        return explain_for(self.ctx, req)
