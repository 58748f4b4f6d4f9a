"""Requests and replies on the bus: msgspec Structs, JSON on the wire.

A reply is either ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {...}}`` with a
stable code from the error catalog, so every client can turn it back into a ``DammError``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from damm.events.model import TierStatus

MAX_REQUEST_BYTES = 16 * 1024

# A dotted-quad IPv4 address: the egress source a gateway writes into its NAT rules.
IPv4Text = Annotated[
    str, msgspec.Meta(min_length=7, max_length=15, pattern=r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")
]


class ErrorBody(msgspec.Struct, frozen=True):
    code: str
    message: str
    detail: str = ""
    retryable: bool = False


class Reply(msgspec.Struct, frozen=True):
    ok: bool
    result: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    error: ErrorBody | None = None


class Empty(msgspec.Struct, frozen=True):
    pass


# --- admin ------------------------------------------------------------------------------------


class DefineTier(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tier: str
    regions: tuple[str, ...] = ()
    exit_countries: tuple[str, ...] = ()
    session_limit: int | None = None
    byte_limit: int | None = None
    key_lifetime_s: int | None = None
    status: TierStatus = "active"


class CreateToken(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tier: str
    uses: int | None = None
    ttl_s: int | None = None


class TokenCreated(msgspec.Struct, frozen=True):
    token_id: str
    token: str
    tier: str
    max_uses: int | None
    expires_at: datetime | None


class RevokeToken(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    token_id: str
    reason: str = ""


class AddGateway(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gateway_id: str
    region: str
    front_door: str | None = None
    priority: int = 10


class GatewayAdded(msgspec.Struct, frozen=True):
    gateway_id: str
    token: str


class SetFrontDoor(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gateway_id: str
    front_door_id: str
    endpoint: str
    transport: str = "udp"
    priority: int = 10
    active: bool = True


class SetGatewayStatus(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gateway_id: str
    active: bool
    reason: str = ""


class DefineEgress(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pool_id: str
    provider: str = "static"
    region: str
    countries: tuple[str, ...]
    ips: tuple[str, ...] = ()
    load: float = 0.0  # ignored: load is measured from assignments
    headroom: float = 1.0  # ignored likewise
    active: bool = True
    devices_per_address: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 128
    transfer_per_address: Annotated[int, msgspec.Meta(ge=1, le=2**62)] | None = None


class DeviceAction(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    device_id: str
    reason: str = ""


class ResetUsage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    device_id: str
    period: str | None = None


class ExplainPlacement(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tier: str
    region: str | None = None
    exit_country: str | None = None


class Rejected(msgspec.Struct, frozen=True):
    kind: str
    id: str
    reason: str


class ScoredCandidate(msgspec.Struct, frozen=True, kw_only=True):
    """One eligible gateway with what placement compared; ``rank`` 1 is the winner."""

    rank: int
    chosen: bool
    gateway_id: str
    region: str
    load: float
    peer_count: int
    heartbeat_age_s: float
    front_door_id: str
    front_door_priority: int
    egress_pool_id: str | None
    egress_load: float | None
    egress_headroom: float | None


class PlacementExplained(msgspec.Struct, frozen=True):
    gateway_id: str | None
    front_door_id: str | None
    endpoint: str | None
    egress_pool_id: str | None
    error: ErrorBody | None
    rejected: tuple[Rejected, ...]
    candidates: tuple[ScoredCandidate, ...] = ()
    ranking: tuple[str, ...] = ()


class Done(msgspec.Struct, frozen=True):
    seq: int
    duplicate: bool = False
    id: str = ""  # the full id of the object acted on, when the request named it by a prefix


# --- device -----------------------------------------------------------------------------------


class Enroll(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    token: str
    public_key: str
    region: str | None = None
    exit_country: str | None = None
    request_id: str


class CatalogTrust(msgspec.Struct, frozen=True):
    key_id: str
    public_key: str
    min_version: int
    region: str


class Enrolled(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    address: str
    address6: str | None
    gateway_id: str
    gateway_public_key: str
    front_door_id: str
    endpoint: str
    allowed_ips: tuple[str, ...]
    dns: tuple[str, ...]
    egress_pool_id: str | None
    key_expires_at: datetime | None
    rotation_key: str
    catalog: CatalogTrust | None


class RotateKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    device_id: str
    old_public_key: str
    new_public_key: str
    proof: str
    request_id: str


class KeyRotated(msgspec.Struct, frozen=True):
    device_id: str
    public_key: str
    key_expires_at: datetime | None


Ident = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
KeyB64 = Annotated[str, msgspec.Meta(min_length=44, max_length=44)]
Proof = Annotated[str, msgspec.Meta(max_length=64)]
PinnedKeys = Annotated[tuple[Ident, ...], msgspec.Meta(max_length=8)]
UnixTime = Annotated[int, msgspec.Meta(ge=0, le=2**40)]


class DeviceCheckIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A device asks where it stands, under its own identity (see ``prove_request``).

    ``pinned_keys`` are the catalog signing key ids the device trusts now, so operators can see
    who already holds an announced key before activating it.
    """

    device_id: Ident
    public_key: KeyB64
    at: UnixTime
    pinned_keys: PinnedKeys = ()
    proof: Proof = ""


class DeviceStanding(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to an active device; any other state is answered with its error code."""

    device_id: str
    status: Literal["active"]
    gateway_id: str
    front_door_id: str


class ReportFailover(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A device moved to another front door of its gateway (after `damm device failover`)."""

    device_id: Ident
    public_key: KeyB64
    at: UnixTime
    gateway_id: Ident
    from_front_door_id: Ident
    front_door_id: Ident
    catalog_version: Annotated[int, msgspec.Meta(ge=0, le=2**62)]
    pinned_keys: PinnedKeys = ()
    request_id: Ident
    proof: Proof = ""


class GetCatalog(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    region: str


class SignedCatalogReply(msgspec.Struct, frozen=True):
    signed: bytes


# --- gateway ----------------------------------------------------------------------------------


class RegisterGateway(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gateway_id: str
    token: str
    public_key: str
    listen_port: int
    agent_version: str = ""


class Registered(msgspec.Struct, frozen=True):
    gateway_id: str
    region: str
    overlay: str
    gateway_address: str
    gateway_address6: str | None


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gateway_id: str
    token: str
    peer_count: int
    active_peers: int
    rx_bytes: int
    tx_bytes: int
    load: float
    peer_set_revision: int = 0


class UsageEntry(msgspec.Struct, frozen=True):
    public_key: str
    rx_bytes: int
    tx_bytes: int


class ReportUsage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gateway_id: str
    token: str
    report_id: str
    entries: tuple[UsageEntry, ...]
    measured_at: datetime | None = None


class PeerSnapshotRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gateway_id: str
    token: str


# --- peer sets (gateway agent) ----------------------------------------------------------------


class HeartbeatAck(msgspec.Struct, frozen=True):
    """A heartbeat's reply: ``Done`` plus the peer-set revision the control plane holds now.

    An agent whose own revision differs missed a change (a lost core-NATS message, a leader
    change) and resyncs from the snapshot.
    """

    seq: int
    duplicate: bool = False
    peer_set_revision: int = 0


class PeerEntry(msgspec.Struct, frozen=True, array_like=True):
    """``egress``: the address this peer's traffic leaves the gateway from (source NAT), if any.

    Added last with a default, so an agent that predates it decodes the entry and ignores it.
    """

    public_key: str
    allowed_ips: tuple[str, ...]
    egress: IPv4Text | None = None


class PeerSnapshot(msgspec.Struct, frozen=True):
    gateway_id: str
    revision: int
    peers: tuple[PeerEntry, ...]


class PeerSetChange(msgspec.Struct, frozen=True):
    """Published on ``damm.peers.<gateway_id>``; apply only when ``prev_revision`` is yours."""

    gateway_id: str
    prev_revision: int
    revision: int
    upserts: tuple[PeerEntry, ...] = ()
    removes: tuple[str, ...] = ()


# --- orchestrator -----------------------------------------------------------------------------

StepPhase = Literal["planned", "started", "succeeded", "failed"]
_Id = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
_Text = Annotated[str, msgspec.Meta(max_length=1000)]


class AddManagedGateway(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A gateway whose token the orchestrator derived, so a retried apply can derive it again."""

    gateway_id: _Id
    region: _Id
    token: Annotated[str, msgspec.Meta(pattern=r"^dmg_[A-Za-z0-9_-]{32,128}$")]


class RecordStep(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    plan_id: _Id
    step: Annotated[int, msgspec.Meta(ge=0, le=100_000)]
    phase: StepPhase
    action: Annotated[str, msgspec.Meta(max_length=64)]
    target: Annotated[str, msgspec.Meta(max_length=200)]
    region: Annotated[str, msgspec.Meta(max_length=64)] = ""
    provider: Annotated[str, msgspec.Meta(max_length=64)] = ""
    provider_ref: _Text = ""
    reason: _Text = ""
    error_code: Annotated[str, msgspec.Meta(max_length=64)] = ""
    error: _Text = ""


class TakeLease(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: _Id
    holder: _Id
    ttl_s: Annotated[float, msgspec.Meta(gt=0, le=3600)]


class LeaseTaken(msgspec.Struct, frozen=True):
    holder: str
    expires_at: datetime
