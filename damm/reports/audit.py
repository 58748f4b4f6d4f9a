"""Audit: read the event log itself, filter it, and fold one device's history up to a moment.

Nothing here reads a read model: the log is the evidence. A filter narrows the JetStream consumer
by subject where the aggregate layout allows it (``filter_subjects``), starts it by time for
``since`` (``deliver_policy=by_start_time``), and then decides exactly on the decoded envelope
(``AuditFilter.matches``), so the subject narrowing is only ever a speed-up, never the rule.

What "about a device" means: the device's own aggregate, any event naming it (``device_id``:
token use and release, addresses, key binding, usage resets), usage reports carrying a delta for
it, and anything the device itself did (actor ``device:<id>``). The same shape holds for gateways
(``gateway_id``, actor ``gateway:<id>``, the gateway's usage reports) and tokens (``token_id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy

from damm.domain.lifecycle import LIFECYCLE_EVENTS, DeviceStatus, Lifecycle, transition
from damm.events import codec
from damm.events import model as m
from damm.subjects import EVENT_PREFIX, EVENTS_STREAM

T = TypeVar("T")

# Stream timestamps and envelope times come from different clocks; start the consumer a little
# early and let the envelope decide.
START_SLACK = timedelta(seconds=30)
_RELATIVE = re.compile(r"^(\d+)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(value: str, now: datetime | None = None) -> datetime:
    """``1h``/``30m``/``7d`` ago, or an ISO-8601 time (UTC when no zone is given)."""
    text = value.strip()
    match = _RELATIVE.fullmatch(text)
    if match:
        return (now or datetime.now(UTC)) - timedelta(
            seconds=int(match.group(1)) * _SECONDS[match.group(2)]
        )
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is neither a duration like 1h nor an ISO time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class AuditFilter:
    device: str | None = None
    gateway: str | None = None
    token: str | None = None
    actor: str | None = None  # "kind:id" or just "kind"
    types: tuple[str, ...] = ()  # exact type ("device.suspended") or a prefix ("device")
    since: datetime | None = None
    until: datetime | None = None

    def subjects(self) -> list[str]:
        """Subjects that can hold a matching event (a superset); ``[]`` means all of them."""
        p = EVENT_PREFIX
        if self.device:
            return [
                f"{p}.device.{self.device}",
                f"{p}.usage.>",
                f"{p}.token.>",
                f"{p}.ipam.>",
                f"{p}.key.>",
            ]
        if self.gateway:
            return [f"{p}.gateway.{self.gateway}", f"{p}.usage.{self.gateway}", f"{p}.device.>"]
        if self.token:
            return [f"{p}.token.{self.token}", f"{p}.device.>"]
        return []

    def matches(self, env: m.Envelope) -> bool:
        if self.since is not None and env.occurred_at < self.since:
            return False
        if self.until is not None and env.occurred_at > self.until:
            return False
        if self.types and not any(
            env.type == t or env.type.startswith(t + ".") for t in self.types
        ):
            return False
        if self.actor is not None:
            kind, _, ident = self.actor.partition(":")
            if env.actor.kind != kind or (ident and env.actor.id != ident):
                return False
        if self.device is not None and not mentions_device(env, self.device):
            return False
        if self.gateway is not None and not _mentions(env, "gateway", self.gateway):
            return False
        return self.token is None or _mentions(env, "token", self.token)


def _mentions(env: m.Envelope, kind: str, ident: str) -> bool:
    if env.aggregate == f"{kind}/{ident}":
        return True
    if env.actor.kind == kind and env.actor.id == ident:
        return True
    return getattr(env.event, f"{kind}_id", None) == ident


def mentions_device(env: m.Envelope, device_id: str) -> bool:
    if _mentions(env, "device", device_id):
        return True
    event = env.event
    return isinstance(event, m.UsageReported) and any(
        d.device_id == device_id for d in event.deltas
    )


def summary(env: m.Envelope, device: str | None = None) -> str:
    """One human line about what happened (the table's last column)."""
    e = env.event
    match e:
        case m.TierDefined():
            limit = f" byte_limit={e.byte_limit}" if e.byte_limit is not None else ""
            sessions = f" session_limit={e.session_limit}" if e.session_limit is not None else ""
            return f"tier {e.tier} regions={','.join(e.regions)}{limit}{sessions} {e.status}"
        case m.TokenIssued():
            return f"token {e.token_id} for tier {e.tier} uses={e.max_uses}"
        case m.TokenUsed():
            return f"token {e.token_id} used by {e.device_id}"
        case m.TokenSessionReleased():
            return f"token {e.token_id} session of {e.device_id} released"
        case m.TokenRevoked():
            return f"token {e.token_id} revoked {e.reason}".rstrip()
        case m.GatewayAdded():
            return f"gateway {e.gateway_id} added in {e.region}"
        case m.FrontDoorSet():
            state = "active" if e.active else "inactive"
            return f"front door {e.gateway_id}/{e.front_door_id} {e.endpoint} p{e.priority} {state}"
        case m.GatewayRegistered():
            version = f" {e.agent_version}" if e.agent_version else ""
            return f"gateway {e.gateway_id} registered port {e.listen_port}{version}"
        case m.GatewayStatusChanged():
            verb = "enabled" if e.active else "disabled"
            return f"gateway {e.gateway_id} {verb} {e.reason}".rstrip()
        case m.GatewayHeartbeat():
            return f"heartbeat peers={e.peer_count} load={e.load:.2f}"
        case m.EgressPoolDefined():
            return (
                f"egress {e.pool_id} {e.region} {','.join(e.countries)} ips={len(e.ips)}"
                f" load={e.load:.2f} headroom={e.headroom:.2f}"
            )
        case m.AddressAllocated():
            return f"address {e.address} to {e.device_id}"
        case m.AddressReleased():
            return f"address #{e.index} of {e.device_id} released"
        case m.KeyBound():
            return f"key {e.public_key[:10]}… bound to {e.device_id}"
        case m.DeviceEnrolled():
            return (
                f"device {e.device_id} enrolled tier={e.tier} gateway={e.gateway_id}"
                f" address={e.address}"
            )
        case m.DeviceRevoked():
            return f"device {e.device_id} revoked {e.reason}".rstrip()
        case m.DeviceSuspended():
            return f"device {e.device_id} suspended {e.reason}".rstrip()
        case m.DeviceResumed():
            return f"device {e.device_id} resumed {e.reason}".rstrip()
        case m.DeviceKeyRotated():
            return f"device {e.device_id} key rotated"
        case m.DeviceFailedOver():
            return (
                f"device {e.device_id} failed over {e.gateway_id}/{e.from_front_door_id}"
                f" -> {e.front_door_id} (catalog v{e.catalog_version})"
            )
        case m.DeviceCatalogKeysReported():
            return f"device {e.device_id} trusts signing keys {','.join(e.pinned_keys) or '-'}"
        case m.UsageReported():
            deltas = [d for d in e.deltas if device is None or d.device_id == device]
            rx = sum(d.rx_bytes for d in deltas)
            tx = sum(d.tx_bytes for d in deltas)
            who = f"{device}" if device else f"{len(deltas)} devices"
            return f"usage {who} rx={rx} tx={tx} report={e.report_id}"
        case m.UsagePeriodReset():
            return f"usage of {e.device_id} for {e.period} reset"
        case m.CatalogPublished():
            return f"catalog {e.region} v{e.version}"
        case m.SigningKeyAnnounced():
            return f"signing key {e.key_id} announced"
        case (
            m.OrchestratorStepPlanned()
            | m.OrchestratorStepStarted()
            | m.OrchestratorStepSucceeded()
            | m.OrchestratorStepFailed()
        ):
            phase = env.type.removeprefix("orchestrator.step_")
            ref = f" [{e.provider_ref}]" if e.provider_ref else ""
            line = f"plan {e.plan_id} step {e.step} {e.action} {e.target} {phase} ({e.provider})"
            if isinstance(e, m.OrchestratorStepFailed):
                return f"{line}: {e.error_code}"
            return f"{line}{ref}" + (f": {e.reason}" if phase == "planned" else "")
        case m.OrchestratorLeaseTaken():
            return f"orchestrator lease {e.name} to {e.holder} until {e.expires_at:%H:%M:%S}"
        case _:
            return env.type


class AuditRow(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    occurred_at: datetime
    type: str
    aggregate: str
    actor: str
    correlation_id: str
    summary: str
    event: dict[str, Any]


# Bulk bytes an operator cannot read: the signed catalog (its digest stays) and sealed seeds.
_OPAQUE_FIELDS = ("signed", "sealed_seed")


def row_of(env: m.Envelope, device: str | None = None) -> AuditRow:
    event = msgspec.to_builtins(env.event)
    assert isinstance(event, dict)
    for name in _OPAQUE_FIELDS:
        if event.get(name):
            event[name] = f"<{len(getattr(env.event, name))} bytes>"
    return AuditRow(
        seq=env.seq,
        occurred_at=env.occurred_at,
        type=env.type,
        aggregate=env.aggregate,
        actor=str(env.actor),
        correlation_id=env.correlation_id,
        summary=summary(env, device),
        event=event,
    )


@dataclass
class AuditReader:
    """Iterate matching envelopes from the log; ``follow`` keeps going after the end."""

    nc: NATS
    stream: str = EVENTS_STREAM
    idle_s: float = 0.25
    scanned: int = field(default=0, init=False)

    async def read(self, flt: AuditFilter, *, follow: bool = False) -> AsyncIterator[m.Envelope]:
        js = self.nc.jetstream(timeout=10)
        info = await _through_reloads(lambda: js.stream_info(self.stream))
        if not follow and int(info.state.messages) == 0:
            return
        config = ConsumerConfig()
        subjects = flt.subjects()
        if len(subjects) > 1:
            config.filter_subjects = subjects
        deliver = DeliverPolicy.ALL
        if flt.since is not None:
            deliver = DeliverPolicy.BY_START_TIME
            config.opt_start_time = flt.since - START_SLACK
        subject = subjects[0] if len(subjects) == 1 else f"{EVENT_PREFIX}.>"
        sub = await _through_reloads(
            lambda: js.subscribe(
                subject,
                stream=self.stream,
                ordered_consumer=True,
                deliver_policy=deliver,
                config=config,
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
            )
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=self.idle_s)
                except (TimeoutError, nats.errors.TimeoutError):
                    if follow:
                        continue
                    try:
                        consumer = await sub.consumer_info()
                    except nats.js.errors.ServiceUnavailableError:
                        continue  # JetStream is reloading its configuration: ask again
                    if int(consumer.num_pending or 0) == 0 and sub.pending_msgs == 0:
                        return
                    continue
                self.scanned += 1
                meta = msg.metadata
                if (
                    not follow
                    and flt.until is not None
                    and meta.timestamp is not None
                    and meta.timestamp > flt.until + START_SLACK
                ):
                    return
                try:
                    env = codec.decode(msg.data, seq=int(meta.sequence.stream))
                except codec.CodecError:
                    continue
                if flt.matches(env):
                    yield env
                if not follow and int(meta.num_pending or 0) == 0:
                    return
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


async def _through_reloads(call: Callable[[], Awaitable[T]], wait_s: float = 5.0) -> T:
    """A JetStream API call, retried while the server answers "service unavailable".

    nats-server reloads its configuration whenever a gateway user is added; for a moment its
    JetStream API does not answer. An operator's audit should wait that out, not fail.
    """
    deadline = asyncio.get_running_loop().time() + wait_s
    delay = 0.05
    while True:
        try:
            return await call()
        except nats.js.errors.ServiceUnavailableError:
            if asyncio.get_running_loop().time() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


async def collect(nc: NATS, flt: AuditFilter) -> list[m.Envelope]:
    return [env async for env in AuditReader(nc).read(flt)]


# --- a device as of a moment ------------------------------------------------------------------


class DeviceAsOf(msgspec.Struct, kw_only=True):
    device_id: str
    as_of: datetime
    exists: bool = False
    status: DeviceStatus | Literal[""] = ""
    reason: str = ""
    tier: str = ""
    gateway_id: str = ""
    front_door_id: str = ""
    egress_pool_id: str | None = None
    address: str = ""
    public_key: str = ""
    enrolled_at: datetime | None = None
    changed_at: datetime | None = None
    changed_by: str = ""
    usage: dict[str, list[int]] = msgspec.field(default_factory=dict)  # period -> [rx, tx]
    events: int = 0
    last_seq: int = 0


def fold_device(device_id: str, history: list[m.Envelope], as_of: datetime) -> DeviceAsOf:
    """Fold the events about one device that happened at or before ``as_of``."""
    from damm.projections.readmodels import period_of

    out = DeviceAsOf(device_id=device_id, as_of=as_of)
    for env in history:
        if env.occurred_at > as_of or not mentions_device(env, device_id):
            continue
        e = env.event
        out.events += 1
        out.last_seq = max(out.last_seq, env.seq)
        status_before = (out.status, out.reason)
        if isinstance(e, LIFECYCLE_EVENTS):
            before = Lifecycle(out.status, out.reason) if out.status else None
            if after := transition(before, e):
                out.status, out.reason = after.status, after.reason
        match e:
            case m.DeviceEnrolled():
                out.exists = True
                out.tier, out.gateway_id, out.front_door_id = e.tier, e.gateway_id, e.front_door_id
                out.egress_pool_id, out.address, out.public_key = (
                    e.egress_pool_id,
                    e.address,
                    e.public_key,
                )
                out.enrolled_at = env.occurred_at
            case m.DeviceFailedOver():
                out.front_door_id = e.front_door_id
            case m.DeviceKeyRotated():
                out.public_key = e.new_public_key
            case m.UsageReported():
                period = period_of(env)
                acc = out.usage.setdefault(period, [0, 0])
                for d in e.deltas:
                    if d.device_id == device_id:
                        acc[0] += d.rx_bytes
                        acc[1] += d.tx_bytes
            case m.UsagePeriodReset():
                out.usage.pop(e.period, None)
            case _:
                pass
        if (out.status, out.reason) != status_before or isinstance(e, m.DeviceEnrolled):
            out.changed_at = env.occurred_at
            out.changed_by = str(env.actor)
    return out


async def device_as_of(nc: NATS, device_id: str, as_of: datetime) -> DeviceAsOf:
    history = await collect(nc, AuditFilter(device=device_id, until=as_of))
    return fold_device(device_id, history, as_of)
