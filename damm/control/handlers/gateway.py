"""What gateways may ask: register, heartbeat, report usage, fetch their peer set.

Every request carries the gateway-scoped token issued by `damm admin gateway add`; it is checked
against the stored hash on every call, so a gateway can speak only for itself.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from damm import log
from damm.control.context import Context
from damm.control.state import GatewayState
from damm.errors import Code, DammError
from damm.events import model as m
from damm.events.model import Actor
from damm.events.store import Append, envelope
from damm.keys.tokens import token_hash
from damm.keys.wireguard import validate_public_key
from damm.protocol import messages as p
from damm.protocol.router import Call, Route, route
from damm.subjects import event_subject, heartbeat_subject, usage_subject

_log = log.get("damm.gateway")

MAX_USAGE_BYTES = 256 * 1024


class GatewayHandlers:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def routes(self) -> list[Route]:
        return [
            route("gateway.register", p.RegisterGateway, self.register),
            route("gateway.heartbeat", p.Heartbeat, self.heartbeat),
            route("gateway.usage", p.ReportUsage, self.report_usage, max_bytes=MAX_USAGE_BYTES),
        ]

    async def authenticate(self, gateway_id: str, token: str) -> GatewayState:
        await self.ctx.fresh(lambda: gateway_id in self.ctx.state.gateways)
        gw = self.ctx.state.gateways.get(gateway_id)
        if gw is None or not hmac.compare_digest(gw.token_hash, token_hash(token)):
            raise DammError(Code.UNAUTHORIZED, f"gateway {gateway_id!r} and token do not match")
        return gw

    async def registered(self, gateway_id: str, token: str) -> GatewayState:
        """The authenticated gateway, registered; with several control planes the registration
        may have landed through another one a moment ago, so catch up before refusing."""
        gw = await self.authenticate(gateway_id, token)
        if not gw.registered:
            await self.ctx.fresh(lambda: self.ctx.state.gateways[gateway_id].registered)
            gw = self.ctx.state.gateways[gateway_id]
        if not gw.registered:
            raise DammError(Code.GATEWAY_NOT_REGISTERED, f"gateway {gw.gateway_id}: register first")
        return gw

    async def register(self, req: p.RegisterGateway, call: Call) -> p.Registered:
        gw = await self.authenticate(req.gateway_id, req.token)
        public_key = validate_public_key(req.public_key)
        gcall = Call(call.correlation_id, Actor("gateway", gw.gateway_id))
        subject = event_subject("gateway", gw.gateway_id)

        def decide() -> list[Append]:
            current = self.ctx.state.gateways[gw.gateway_id]
            if current.public_key == public_key and current.listen_port == req.listen_port:
                return []
            return [
                self.ctx.append(
                    subject,
                    m.GatewayRegistered(
                        gateway_id=gw.gateway_id,
                        public_key=public_key,
                        listen_port=req.listen_port,
                        agent_version=req.agent_version,
                    ),
                    gcall,
                    expected=self.ctx.state.seq_of(subject),
                )
            ]

        await self.ctx.commit(decide, call)
        overlay = self.ctx.settings.overlay
        return p.Registered(
            gw.gateway_id,
            gw.region,
            str(overlay.network),
            f"{overlay.gateway}/{overlay.network.prefixlen}",
            f"{overlay.gateway6}/{overlay.ula.prefixlen}"
            if overlay.gateway6 and overlay.ula
            else None,
        )

    async def heartbeat(self, req: p.Heartbeat, call: Call) -> p.HeartbeatAck:
        gw = await self.registered(req.gateway_id, req.token)
        event = m.GatewayHeartbeat(
            gateway_id=gw.gateway_id,
            peer_count=req.peer_count,
            active_peers=req.active_peers,
            rx_bytes=req.rx_bytes,
            tx_bytes=req.tx_bytes,
            load=req.load,
            peer_set_revision=req.peer_set_revision,
        )
        subject = heartbeat_subject(gw.gateway_id)
        env = envelope(
            subject,
            event,
            actor=Actor("gateway", gw.gateway_id),
            correlation_id=call.correlation_id,
            now=self.ctx.now(),
            aggregate=f"gateway/{gw.gateway_id}",
        )
        seq = await self.ctx.store.publish_telemetry(subject, env)
        self.ctx.state.fold_telemetry(env)
        return p.HeartbeatAck(
            seq=seq, peer_set_revision=self.ctx.state.peer_revisions.get(gw.gateway_id, 0)
        )

    def _owners(self, gateway_id: str, entries: Sequence[p.UsageEntry]) -> dict[str, str]:
        """Device of each reported key, old keys included: a peer's last counters before a key
        rotation arrive under the key it had."""
        state = self.ctx.state
        owners = {}
        for entry in entries:
            device_id = state.bound_keys.get(entry.public_key)
            dev = state.devices.get(device_id or "")
            if dev is not None and dev.gateway_id == gateway_id:
                owners[entry.public_key] = dev.device_id
        return owners

    async def report_usage(self, req: p.ReportUsage, call: Call) -> p.Done:
        gw = await self.registered(req.gateway_id, req.token)
        mark = (gw.gateway_id, req.ledger_id)
        numbered = bool(req.ledger_id and req.report_seq)

        def seen() -> bool:
            return numbered and req.report_seq <= self.ctx.state.usage_marks.get(mark, 0)

        if seen():
            return p.Done(seq=0, duplicate=True)
        owners = self._owners(gw.gateway_id, req.entries)
        if len(owners) < len({e.public_key for e in req.entries}):
            # A device enrolled through another control-plane process may not be folded yet.
            await self.ctx.follower.sync()
            owners = self._owners(gw.gateway_id, req.entries)
        deltas = []
        for entry in req.entries:
            device_id = owners.get(entry.public_key)
            if device_id is not None and (entry.rx_bytes or entry.tx_bytes):
                deltas.append(m.UsageDelta(device_id, entry.rx_bytes, entry.tx_bytes))
        if dropped := len(req.entries) - len(deltas):
            _log.info("usage entries without a device on this gateway", dropped=dropped)
        if not deltas:
            return p.Done(seq=0)
        subject = usage_subject(gw.gateway_id)
        event = m.UsageReported(
            gateway_id=gw.gateway_id,
            report_id=req.report_id,
            deltas=tuple(deltas),
            measured_at=req.measured_at,
            ledger_id=req.ledger_id,
            report_seq=req.report_seq,
        )
        gcall = Call(call.correlation_id, Actor("gateway", gw.gateway_id))
        duplicate = False

        def decide() -> list[Append]:
            nonlocal duplicate
            duplicate = seen()
            if duplicate:
                return []
            # Numbered reports expect the subject's sequence, so two processes cannot both
            # record one report between them; the mark they check is folded from this subject.
            return [
                self.ctx.append(
                    subject,
                    event,
                    gcall,
                    expected=self.ctx.state.seq_of(subject) if numbered else None,
                    msg_id=f"usage-{gw.gateway_id}-{req.report_id}",
                )
            ]

        result = await self.ctx.commit(decide, call)
        if duplicate:
            return p.Done(seq=0, duplicate=True)
        return p.Done(seq=result.seqs[-1], duplicate=result.duplicate)
