"""The domain's facts. Each class is one immutable thing that happened.

Events are frozen msgspec Structs in one tagged union so a single decoder handles "any event".
Fields only ever get added with defaults; readers ignore fields they do not know, and an event
type they do not know decodes to ``UnknownEvent`` so an old projector skips it instead of dying.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

TierStatus = Literal["active", "retired"]


class Actor(msgspec.Struct, frozen=True):
    """Who caused an event: an admin (by name), a device, a gateway, a policy reactor, or system."""

    kind: str
    id: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"


class _Event(msgspec.Struct, frozen=True, tag_field="type", kw_only=True):
    pass


# --- access tiers -----------------------------------------------------------------------------


class TierDefined(_Event, frozen=True, tag="tier.defined"):
    """A tier was created or its policy replaced; the latest definition wins."""

    tier: str
    regions: tuple[str, ...] = ()
    exit_countries: tuple[str, ...] = ()
    session_limit: int | None = None
    byte_limit: int | None = None
    key_lifetime_s: int | None = None
    status: TierStatus = "active"


# --- enrollment tokens ------------------------------------------------------------------------


class TokenIssued(_Event, frozen=True, tag="token.issued"):
    token_id: str
    token_hash: str
    tier: str
    max_uses: int | None = None
    expires_at: datetime | None = None


class TokenUsed(_Event, frozen=True, tag="token.used"):
    token_id: str
    device_id: str


class TokenSessionReleased(_Event, frozen=True, tag="token.session_released"):
    """A device enrolled with this token stopped counting against the tier's session limit."""

    token_id: str
    device_id: str


class TokenRevoked(_Event, frozen=True, tag="token.revoked"):
    token_id: str
    reason: str = ""


# --- gateways ---------------------------------------------------------------------------------


class GatewayAdded(_Event, frozen=True, tag="gateway.added"):
    gateway_id: str
    region: str
    token_hash: str
    nats_password_bcrypt: str | None = None  # the gateway's NATS login is its token


class FrontDoorSet(_Event, frozen=True, tag="gateway.front_door_set"):
    gateway_id: str
    front_door_id: str
    endpoint: str
    transport: str = "udp"
    priority: int = 10
    active: bool = True


class GatewayRegistered(_Event, frozen=True, tag="gateway.registered"):
    gateway_id: str
    public_key: str
    listen_port: int
    agent_version: str = ""


class GatewayStatusChanged(_Event, frozen=True, tag="gateway.status_changed"):
    gateway_id: str
    active: bool
    reason: str = ""


class GatewayHeartbeat(_Event, frozen=True, tag="gateway.heartbeat"):
    """Telemetry: lives in its own age-limited stream; placement needs only the latest one."""

    gateway_id: str
    peer_count: int
    active_peers: int
    rx_bytes: int
    tx_bytes: int
    load: float
    peer_set_revision: int = 0


# --- egress pools -----------------------------------------------------------------------------


class EgressPoolDefined(_Event, frozen=True, tag="egress.defined"):
    pool_id: str
    provider: str
    region: str
    countries: tuple[str, ...]
    ips: tuple[str, ...]
    load: float = 0.0  # typed by operators before load was measured; ignored
    headroom: float = 1.0  # likewise
    active: bool = True
    # Capacity: how many devices one source address carries; load = assigned / (addresses x this).
    devices_per_address: int = 128
    transfer_per_address: int | None = None  # bytes per usage period; None: not a constraint


# --- addresses and keys -----------------------------------------------------------------------


class AddressAllocated(_Event, frozen=True, tag="ipam.allocated"):
    pool: str
    index: int
    address: str
    device_id: str
    address6: str | None = None


class AddressReleased(_Event, frozen=True, tag="ipam.released"):
    pool: str
    index: int
    device_id: str


class KeyBound(_Event, frozen=True, tag="key.bound"):
    """A public key is claimed by a device forever: a revoked device cannot come back with it."""

    public_key: str
    device_id: str


# --- devices ----------------------------------------------------------------------------------


class DeviceFacts(msgspec.Struct, kw_only=True):
    """What enrollment settles about a device. The event records it and the decision state keeps
    it (with what later events change), from this one definition."""

    device_id: str
    public_key: str
    token_id: str
    tier: str
    gateway_id: str
    front_door_id: str
    egress_pool_id: str | None
    address: str
    address6: str | None = None
    key_expires_at: datetime | None = None
    # The pool address this device's traffic leaves from (damm.domain.egress.assign); None for
    # devices enrolled before egress reached the packet plane, or in a pool without IPv4.
    egress_address: str | None = None
    # The device's NATS identity (an nkey user key made on the device), taken from the
    # connection that enrolled it, never from the body; None for devices enrolled without one.
    identity_key: str | None = None


def facts_of(source: DeviceFacts) -> dict[str, Any]:
    """The device facts of an event or a state entry, to build the other."""
    return {name: getattr(source, name) for name in DeviceFacts.__struct_fields__}


# A frozen struct over a mutable base is fine to msgspec; mypy applies the dataclass rule.


class DeviceEnrolled(_Event, DeviceFacts, frozen=True, tag="device.enrolled"):  # type: ignore[misc]
    region: str = ""
    exit_country: str | None = None


class DeviceRevoked(_Event, frozen=True, tag="device.revoked"):
    """Also frees the device's session on its enrollment token (``token_id``)."""

    device_id: str
    reason: str = ""
    token_id: str = ""


class DeviceSuspended(_Event, frozen=True, tag="device.suspended"):
    device_id: str
    reason: str = ""


class DeviceResumed(_Event, frozen=True, tag="device.resumed"):
    device_id: str
    reason: str = ""


class DeviceKeyRotated(_Event, frozen=True, tag="device.key_rotated"):
    device_id: str
    old_public_key: str
    new_public_key: str
    key_expires_at: datetime | None = None


class DeviceFailedOver(_Event, frozen=True, tag="device.failed_over"):
    """The device reported, under its own identity, that it moved to another front door."""

    device_id: str
    gateway_id: str
    from_front_door_id: str
    front_door_id: str
    catalog_version: int = 0
    pinned_keys: tuple[str, ...] = ()
    reported_at: int = 0  # the device's clock (unix seconds): older reports are refused


class DeviceCatalogKeysReported(_Event, frozen=True, tag="device.catalog_keys"):
    """The catalog signing keys a device trusts changed (it fetched an announced key)."""

    device_id: str
    pinned_keys: tuple[str, ...]
    reported_at: int = 0  # the device's clock (unix seconds): older reports are not recorded


# --- usage and catalogs -----------------------------------------------------------------------


class UsageDelta(msgspec.Struct, frozen=True):
    device_id: str
    rx_bytes: int
    tx_bytes: int


class UsageReported(_Event, frozen=True, tag="usage.reported"):
    """Per-device byte deltas measured by one gateway over one reporting interval."""

    gateway_id: str
    report_id: str
    deltas: tuple[UsageDelta, ...]
    measured_at: datetime | None = None
    ledger_id: str = ""  # the agent ledger that numbered this report, and its number there
    report_seq: int = 0


class UsagePeriodReset(_Event, frozen=True, tag="usage.period_reset"):
    device_id: str
    period: str


class CatalogPublished(_Event, frozen=True, tag="catalog.published"):
    """The leader signed a region's catalog. ``signed`` is exactly what every replica serves, so
    devices see one version whichever replica answers; ``term`` is the leader's fencing token."""

    region: str
    version: int
    key_id: str
    digest: str
    expires_at: datetime | None = None
    term: int = 0
    signed: bytes = b""
    next_key_ids: tuple[str, ...] = ()


class SigningKeyAnnounced(_Event, frozen=True, tag="catalog.key_announced"):
    """A catalog signing key, its seed sealed under the operator's KEK (``kek_id`` names it).

    Events from before keys lived in the log carry no seed; they are history, not keys.
    """

    key_id: str
    public_key: str
    sealed_seed: bytes = b""
    kek_id: str = ""


class SigningKeyActivated(_Event, frozen=True, tag="catalog.key_activated"):
    """Catalogs are signed with this key from now on; the previous key is retired."""

    key_id: str
    retired_key_id: str


class RotationKeyStored(_Event, frozen=True, tag="keys.rotation_stored"):
    """The X25519 key devices prove key rotations against, sealed like the signing keys."""

    public_key: str
    sealed_seed: bytes
    kek_id: str


class LeaderTermStarted(_Event, frozen=True, tag="leader.term_started"):
    """A process won the leader lease; ``term`` is the lease revision, the fencing token its
    catalog publications carry. Appending it fences every earlier leader out of the catalogs."""

    holder: str
    term: int


# --- orchestrator -----------------------------------------------------------------------------


class _OrchestratorStep(_Event, frozen=True):
    """One step of an applied plan; ``provider_ref`` is the provider's own name for the host."""

    plan_id: str
    step: int
    action: str
    target: str
    region: str = ""
    provider: str = ""
    provider_ref: str = ""
    reason: str = ""


class OrchestratorStepPlanned(_OrchestratorStep, frozen=True, tag="orchestrator.step_planned"):
    pass


class OrchestratorStepStarted(_OrchestratorStep, frozen=True, tag="orchestrator.step_started"):
    pass


class OrchestratorStepSucceeded(_OrchestratorStep, frozen=True, tag="orchestrator.step_succeeded"):
    pass


class OrchestratorStepFailed(_OrchestratorStep, frozen=True, tag="orchestrator.step_failed"):
    error_code: str = ""
    error: str = ""


class OrchestratorLeaseTaken(_Event, frozen=True, tag="orchestrator.lease_taken"):
    """Only the holder may act until ``expires_at``; taken with an expected subject sequence."""

    name: str
    holder: str
    expires_at: datetime


class UnknownEvent(_Event, frozen=True, tag="unknown"):
    """An event type this build does not know: carried through, never folded."""

    original_type: str


Event = (
    TierDefined
    | TokenIssued
    | TokenUsed
    | TokenSessionReleased
    | TokenRevoked
    | GatewayAdded
    | FrontDoorSet
    | GatewayRegistered
    | GatewayStatusChanged
    | GatewayHeartbeat
    | EgressPoolDefined
    | AddressAllocated
    | AddressReleased
    | KeyBound
    | DeviceEnrolled
    | DeviceRevoked
    | DeviceSuspended
    | DeviceResumed
    | DeviceKeyRotated
    | DeviceFailedOver
    | DeviceCatalogKeysReported
    | UsageReported
    | UsagePeriodReset
    | CatalogPublished
    | SigningKeyAnnounced
    | SigningKeyActivated
    | RotationKeyStored
    | LeaderTermStarted
    | OrchestratorStepPlanned
    | OrchestratorStepStarted
    | OrchestratorStepSucceeded
    | OrchestratorStepFailed
    | OrchestratorLeaseTaken
)

EVENT_TYPES: tuple[type[_Event], ...] = Event.__args__


def event_type_name(event: Event | UnknownEvent) -> str:
    if isinstance(event, UnknownEvent):
        return event.original_type
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """What every stored message carries around its event."""

    id: str
    type: str
    schema: int = 1
    aggregate: str
    occurred_at: datetime
    actor: Actor
    correlation_id: str
    event: Event | UnknownEvent
    seq: int = 0  # stream sequence, filled on read; never encoded by writers
