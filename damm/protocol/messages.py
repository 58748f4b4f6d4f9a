"""Requests and replies on the bus: msgspec Structs, JSON on the wire.

A reply is either ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {...}}`` with a
stable code from the error catalog, so every client can turn it back into a ``DammError``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from damm.catalog.document import KeyAnnouncement
from damm.events.model import TierStatus

MAX_REQUEST_BYTES = 16 * 1024
# A request's budget in milliseconds, counted from when the control plane received it: past it,
# the caller has given up, so nothing may be recorded for the request any more.
TIMEOUT_HEADER = "Damm-Timeout-Ms"
MAX_BUDGET_MS = 60_000
DEFAULT_BUDGET_MS = 30_000

# A dotted-quad IPv4 address: the egress source a gateway writes into its NAT rules.
IPv4Text = Annotated[
    str, msgspec.Meta(min_length=7, max_length=15, pattern=r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$")
]

# Bounds on everything an outside party controls. Numbers match the read-model columns
# (integer, bigint, non-negative where they count), so nothing accepted here can stall a
# projector; strings and lists are short enough that no event grows without limit.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1

Id = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
RequestId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
Key = Annotated[str, Meta(min_length=1, max_length=64)]
Secret = Annotated[str, Meta(min_length=1, max_length=128)]
RotationProof = Annotated[str, Meta(min_length=1, max_length=64)]  # base64 of an HMAC-SHA256
Label = Annotated[str, Meta(max_length=128)]
Reason = Annotated[str, Meta(max_length=1024)]
Endpoint = Annotated[str, Meta(min_length=1, max_length=255)]
Country = Annotated[str, Meta(pattern=r"^[A-Za-z]{2}$")]
Count32 = Annotated[int, Meta(ge=0, le=INT32_MAX)]
Positive32 = Annotated[int, Meta(ge=1, le=INT32_MAX)]
Count64 = Annotated[int, Meta(ge=0, le=INT64_MAX)]
Positive64 = Annotated[int, Meta(ge=1, le=INT64_MAX)]
Priority = Annotated[int, Meta(ge=-INT32_MAX, le=INT32_MAX)]
Port = Annotated[int, Meta(ge=1, le=65535)]
TtlSeconds = Annotated[int, Meta(ge=1, le=20 * 365 * 86400)]
Load = Annotated[float, Meta(ge=0.0, le=1e6)]
# A usage delta covers one agent interval: 2**48 bytes (256 TiB) is far beyond any link, and
# keeps a device's bigint total from overflowing for tens of thousands of reports.
UsageBytes = Annotated[int, Meta(ge=0, le=2**48)]
MAX_LIST = 64
MAX_USAGE_ENTRIES = 2000


class ErrorBody(msgspec.Struct, frozen=True):
    code: str
    message: str
    detail: str = ""
    retryable: bool = False


class Reply(msgspec.Struct, frozen=True):
    ok: bool
    result: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    error: ErrorBody | None = None


class Empty(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


# --- admin ------------------------------------------------------------------------------------


class DefineTier(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tier: Id
    regions: Annotated[tuple[Id, ...], Meta(max_length=MAX_LIST)] = ()
    exit_countries: Annotated[tuple[Country, ...], Meta(max_length=MAX_LIST)] = ()
    session_limit: Count32 | None = None
    byte_limit: Count64 | None = None
    key_lifetime_s: Positive32 | None = None
    status: TierStatus = "active"


class CreateToken(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tier: Id
    uses: Positive32 | None = None
    ttl_s: TtlSeconds | None = None


class TokenCreated(msgspec.Struct, frozen=True):
    token_id: str
    token: str
    tier: str
    max_uses: int | None
    expires_at: datetime | None


class RevokeToken(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    token_id: Id
    reason: Reason = ""


class AddGateway(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gateway_id: Id
    region: Id
    front_door: Endpoint | None = None
    priority: Priority = 10


class GatewayAdded(msgspec.Struct, frozen=True):
    gateway_id: str
    token: str


class SetFrontDoor(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gateway_id: Id
    front_door_id: Id
    endpoint: Endpoint
    transport: Label = "udp"
    priority: Priority = 10
    active: bool = True


class SetGatewayStatus(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gateway_id: Id
    active: bool
    reason: Reason = ""


class DefineEgress(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pool_id: Id
    provider: Label = "static"
    region: Id
    countries: Annotated[tuple[Country, ...], Meta(max_length=MAX_LIST)]
    ips: Annotated[tuple[Annotated[str, Meta(max_length=64)], ...], Meta(max_length=4096)] = ()
    load: Load = 0.0  # ignored: load is measured from assignments
    headroom: Load = 1.0  # ignored likewise
    active: bool = True
    devices_per_address: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 128
    transfer_per_address: Annotated[int, msgspec.Meta(ge=1, le=2**62)] | None = None


class DeviceAction(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    device_id: Id
    reason: Reason = ""


class ResetUsage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    device_id: Id
    period: Label | None = None


class ExplainPlacement(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tier: Id
    region: Id | None = None
    exit_country: Country | None = None


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
    token: Secret
    public_key: Key
    region: Id | None = None
    exit_country: Country | None = None
    request_id: RequestId


class CatalogTrust(msgspec.Struct, frozen=True):
    """The catalog key a device pins at enrollment, plus the next key already announced (so a
    device enrolled between announce and activate verifies catalogs on both sides of the switch
    without having fetched the announcing one)."""

    key_id: str
    public_key: str
    min_version: int
    region: str
    next_keys: tuple[KeyAnnouncement, ...] = ()


class TunnelProfile(msgspec.Struct, kw_only=True):
    """Where a device's tunnel goes. The enrollment reply, the device's own file and a bundle's
    public view all carry it; one definition keeps the three from drifting apart."""

    device_id: str
    address: str
    address6: str | None = None
    gateway_id: str
    gateway_public_key: str
    front_door_id: str
    endpoint: str
    allowed_ips: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    key_expires_at: datetime | None = None


def profile_of(source: TunnelProfile) -> dict[str, Any]:
    """The profile fields of any struct that carries one, to build another that does."""
    return {name: getattr(source, name) for name in TunnelProfile.__struct_fields__}


class Enrolled(TunnelProfile, frozen=True, kw_only=True):  # type: ignore[misc]
    egress_pool_id: str | None = None
    rotation_key: str
    catalog: CatalogTrust | None = None


class RotateKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    device_id: Id
    old_public_key: Key
    new_public_key: Key
    proof: RotationProof
    request_id: RequestId


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
    region: Id


class SignedCatalogReply(msgspec.Struct, frozen=True):
    signed: bytes


# --- gateway ----------------------------------------------------------------------------------


class RegisterGateway(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gateway_id: Id
    token: Secret
    public_key: Key
    listen_port: Port
    agent_version: Label = ""


class Registered(msgspec.Struct, frozen=True):
    gateway_id: str
    region: str
    overlay: str
    gateway_address: str
    gateway_address6: str | None


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gateway_id: Id
    token: Secret
    peer_count: Count32
    active_peers: Count32
    rx_bytes: Count64
    tx_bytes: Count64
    load: Load
    peer_set_revision: Count64 = 0


class UsageEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    public_key: Key
    rx_bytes: UsageBytes
    tx_bytes: UsageBytes


class ReportUsage(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    gateway_id: Id
    token: Secret
    report_id: RequestId
    entries: Annotated[tuple[UsageEntry, ...], Meta(max_length=MAX_USAGE_ENTRIES)]
    measured_at: datetime | None = None
    # The agent's ledger numbers its reports: with ``ledger_id`` the control plane remembers the
    # highest number per ledger, so a report resent long after JetStream's dedupe window is
    # still recognised. Zero means an agent that does not number (deduped for the window only).
    ledger_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{0,64}$")] = ""
    report_seq: Count64 = 0


# A cursor is the last public key of the page before (base64 of 32 bytes is 44 characters).
PeerCursor = Annotated[str, Meta(min_length=1, max_length=64)]


class PeerSnapshotRequest(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True
):
    """One page of the gateway's peer set: the peers whose keys sort after ``after``."""

    gateway_id: Id
    token: Secret
    after: PeerCursor | None = None


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
    """One page of a peer set, in key order; ``next_after`` is the next page's cursor, if any.

    A set of any size crosses the bus in pages that each fit one message. Every page carries
    the revision it was read at, so the agent can tell a consistent set from one that moved
    while it paged.
    """

    gateway_id: str
    revision: int
    peers: tuple[PeerEntry, ...]
    next_after: str | None = None


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
