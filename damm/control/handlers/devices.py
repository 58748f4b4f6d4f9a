"""What an enrolled device may ask under its own identity: where it stands, and where it moved.

Devices connect to NATS without credentials, so the bus says nothing about who sent a request.
Each request therefore carries a proof made with the device's WireGuard private key (the
Diffie-Hellman MAC of ``damm.keys.rotation.prove_request``) over every field of the request,
checked against the key the log binds to the named device: a device can speak only for itself.
``at`` bounds how long a captured request can be replayed, and a failover report older than the
last one recorded is refused, so a replay cannot move a device back.
"""

from __future__ import annotations

from collections.abc import Iterable

from damm.control.context import Context
from damm.control.state import DeviceState
from damm.domain.lifecycle import KEY_EXPIRED, OVER_QUOTA
from damm.errors import Code, DammError
from damm.events import model as m
from damm.events.model import Actor
from damm.events.store import Append
from damm.keys.wireguard import validate_public_key
from damm.protocol import messages as p
from damm.protocol.device_auth import Signed, signed_body
from damm.protocol.router import Call, Route, route
from damm.subjects import event_subject

PROOF_WINDOW_S = 300


def standing_error(dev: DeviceState) -> DammError | None:
    """The catalogued refusal for a device that must not use the service, or None if active."""
    if dev.status == "revoked":
        return DammError(Code.DEVICE_REVOKED, f"device {dev.device_id}")
    if dev.status == "suspended":
        if dev.reason == OVER_QUOTA:
            return DammError(Code.OVER_QUOTA, f"device {dev.device_id} is suspended (over_quota)")
        if dev.reason == KEY_EXPIRED:
            return DammError(
                Code.KEY_EXPIRED, f"device {dev.device_id}: run `damm device rotate-key`"
            )
        return DammError(Code.DEVICE_SUSPENDED, f"device {dev.device_id} ({dev.reason})")
    return None


def known_keys(pinned: Iterable[str], announced: set[str], current: str) -> tuple[str, ...]:
    """Only key ids the control plane knows are recorded: the list is attacker-controlled."""
    return tuple(sorted({k for k in pinned if k in announced or k == current}))


class DeviceHandlers:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def routes(self) -> list[Route]:
        return [
            route("device.status", p.DeviceCheckIn, self.status),
            route("device.failover", p.ReportFailover, self.report_failover),
        ]

    async def authenticate(self, req: Signed, command: str) -> DeviceState:
        ctx = self.ctx
        await ctx.fresh(lambda: req.device_id in ctx.state.devices)
        dev = ctx.state.devices.get(req.device_id)
        public_key = validate_public_key(req.public_key)
        if dev is None or dev.public_key != public_key:
            raise DammError(Code.UNAUTHORIZED, f"{req.device_id} and key do not match")
        if abs(ctx.now().timestamp() - req.at) > PROOF_WINDOW_S:
            raise DammError(
                Code.UNAUTHORIZED, f"request time is more than {PROOF_WINDOW_S}s from ours"
            )
        if not ctx.rotation.verify_request(req.proof, public_key, command, signed_body(req)):
            raise DammError(Code.UNAUTHORIZED, "the proof of the device key does not verify")
        return dev

    def _keys(self, pinned: Iterable[str]) -> tuple[str, ...]:
        return known_keys(pinned, self.ctx.state.announced_keys, self.ctx.signer.key_id)

    async def status(self, req: p.DeviceCheckIn, call: Call) -> p.DeviceStanding:
        ctx = self.ctx
        dev = await self.authenticate(req, "device.status")
        if (err := standing_error(dev)) is not None:
            raise err
        keys = self._keys(req.pinned_keys)
        subject = event_subject("device", dev.device_id)
        dcall = Call(call.correlation_id, Actor("device", dev.device_id))

        def decide() -> list[Append]:
            current = ctx.state.devices[dev.device_id]
            if current.pinned_keys == keys or current.status != "active":
                return []
            if req.at < current.reported_at:
                return []  # a replayed older check-in must not roll the record back
            event = m.DeviceCatalogKeysReported(
                device_id=dev.device_id, pinned_keys=keys, reported_at=req.at
            )
            return [ctx.append(subject, event, dcall, expected=ctx.state.seq_of(subject))]

        await ctx.commit(decide, call)
        return p.DeviceStanding(
            device_id=dev.device_id,
            status="active",
            gateway_id=dev.gateway_id,
            front_door_id=dev.front_door_id,
        )

    async def report_failover(self, req: p.ReportFailover, call: Call) -> p.Done:
        ctx = self.ctx
        dev = await self.authenticate(req, "device.failover")
        if (err := standing_error(dev)) is not None:
            raise err
        gw = ctx.state.gateways.get(dev.gateway_id)
        if req.gateway_id != dev.gateway_id or gw is None:
            raise DammError(
                Code.INVALID_ARGUMENT, f"device {dev.device_id} is attached to {dev.gateway_id}"
            )
        if req.front_door_id not in gw.front_doors:
            raise DammError(Code.NOT_FOUND, f"front door {gw.gateway_id}/{req.front_door_id}")
        keys = self._keys(req.pinned_keys)
        subject = event_subject("device", dev.device_id)
        dcall = Call(call.correlation_id, Actor("device", dev.device_id))

        def decide() -> list[Append]:
            current = ctx.state.devices[dev.device_id]
            if req.at < current.reported_at:
                raise DammError(Code.CONFLICT, "a newer failover of this device is recorded")
            if (err := standing_error(current)) is not None:
                raise err
            event = m.DeviceFailedOver(
                device_id=dev.device_id,
                gateway_id=dev.gateway_id,
                from_front_door_id=req.from_front_door_id,
                front_door_id=req.front_door_id,
                catalog_version=req.catalog_version,
                pinned_keys=keys,
                reported_at=req.at,
            )
            return [
                ctx.append(
                    subject,
                    event,
                    dcall,
                    expected=ctx.state.seq_of(subject),
                    msg_id=f"failover-{dev.device_id}-{req.request_id}",
                )
            ]

        result = await ctx.commit(decide, call)
        return p.Done(seq=result.seqs[-1] if result.seqs else 0, duplicate=result.duplicate)
