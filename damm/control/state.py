"""What the handlers decide from: an in-memory fold of the event log.

Handlers never read the Postgres read models (they may lag). Each control-plane process folds the
log itself and remembers the last sequence of every subject it folded; a decision appends with
those sequences as expectations, so a decision taken on stale state is refused by JetStream and
taken again. The fold skips anything at or below a subject's known sequence, which makes applying
one's own appends immediately and seeing them again from the stream harmless.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from damm import log, settings
from damm.domain import egress
from damm.domain import placement as pl
from damm.domain.ipam import AddressPool, Overlay
from damm.domain.lifecycle import DeviceStatus, Lifecycle, transition
from damm.domain.periods import period_at
from damm.errors import DammError
from damm.events import model as m
from damm.settings import UsagePeriod
from damm.subjects import EVENT_PREFIX

_log = log.get("damm.state")


@dataclass
class TokenState:
    token_id: str
    token_hash: str
    tier: str
    max_uses: int | None
    expires_at: datetime | None
    uses: int = 0
    sessions: set[str] = field(default_factory=set)
    revoked: bool = False


@dataclass
class FrontDoorState:
    front_door_id: str
    endpoint: str
    transport: str
    priority: int
    active: bool


@dataclass
class GatewayState:
    gateway_id: str
    region: str
    token_hash: str
    public_key: str | None = None
    listen_port: int | None = None
    active: bool = True
    front_doors: dict[str, FrontDoorState] = field(default_factory=dict)
    last_heartbeat: datetime | None = None
    load: float = 0.0
    peer_count: int = 0
    nats_password_bcrypt: str | None = None

    @property
    def registered(self) -> bool:
        return self.public_key is not None


class DeviceState(m.DeviceFacts, kw_only=True):
    index: int
    status: DeviceStatus = "active"
    reason: str = ""
    pinned_keys: tuple[str, ...] = ()
    reported_at: int = 0  # the device's clock on its latest recorded report


@dataclass
class KeyringState:
    """Catalog signing keys and the rotation key as the log has them: sealed, never plaintext.

    ``active`` signs catalogs and is what enrollments pin; ``announced`` is the next key, vouched
    for in catalogs until an operator activates it. ``seq`` moves on every change, so a
    publisher can notice one without comparing contents.
    """

    keys: dict[str, m.SigningKeyAnnounced] = field(default_factory=dict)
    active: str | None = None
    announced: str | None = None
    retired: set[str] = field(default_factory=set)
    rotation: m.RotationKeyStored | None = None
    seq: int = 0


@dataclass(frozen=True)
class PeerChange:
    """One change to one gateway's peer set, as the fold saw it (see ``DecisionState.apply``).

    ``upserts`` are (public_key, allowed_ips) pairs; ``removes`` are public keys; ``egress``
    maps an upserted key to the address its traffic leaves from.
    """

    gateway_id: str
    prev_revision: int
    revision: int
    upserts: tuple[tuple[str, tuple[str, ...]], ...]
    removes: tuple[str, ...]
    egress: tuple[tuple[str, str], ...] = ()


PeerListener = Callable[[PeerChange], None]

_PEER_EVENTS = (
    m.DeviceEnrolled,
    m.DeviceRevoked,
    m.DeviceSuspended,
    m.DeviceResumed,
    m.DeviceKeyRotated,
)


def peer_of(dev: DeviceState | None) -> tuple[str, tuple[str, ...]] | None:
    """The peer a device puts on its gateway, or None when it must not be there."""
    if dev is None or dev.status != "active":
        return None
    ips = (f"{dev.address}/32",) + ((f"{dev.address6}/128",) if dev.address6 else ())
    return dev.public_key, ips


class DecisionState:
    def __init__(
        self,
        overlay: Overlay,
        usage_period: UsagePeriod | None = None,
        *,
        gateway_capacity: int = 1000,
    ) -> None:
        self.overlay = overlay
        # The same period labels as the usage read model, so both agree on "this period".
        self.usage_period = usage_period or settings.usage_period()
        self.addresses = AddressPool(overlay)
        self.tiers: dict[str, m.TierDefined] = {}
        self.tokens: dict[str, TokenState] = {}
        self.tokens_by_hash: dict[str, TokenState] = {}
        self.gateways: dict[str, GatewayState] = {}
        self.pools: dict[str, m.EgressPoolDefined] = {}
        # Per pool: its usable source addresses, and how many non-revoked devices each carries.
        self.pool_addresses: dict[str, tuple[str, ...]] = {}
        self.egress_in_use: dict[str, Counter[str]] = {}
        self.pool_assigned: Counter[str] = Counter()
        self.pool_traffic: Counter[tuple[str, str]] = Counter()  # (pool, usage period) -> bytes
        self.devices: dict[str, DeviceState] = {}
        self.devices_by_gateway: dict[str, dict[str, DeviceState]] = {}
        self.bound_keys: dict[str, str] = {}
        self.identities: dict[str, str] = {}  # NATS identity key -> the device enrolled with it
        self.requests: dict[str, str] = {}
        self.subject_seq: dict[str, int] = {}
        self.catalog_versions: dict[str, int] = {}
        # Bytes per (device, usage period): admin resume refuses a device still over its limit.
        self.usage: dict[tuple[str, str], int] = {}
        # Announced catalog signing keys not yet activated.
        self.announced_keys: set[str] = set()
        # (gateway, agent ledger) -> the highest report number recorded: usage dedupe that
        # outlives JetStream's duplicate window, one integer per ledger.
        self.usage_marks: dict[tuple[str, str], int] = {}
        self.catalogs: dict[str, m.CatalogPublished] = {}
        self.keyring = KeyringState()
        self.applied_seq = 0
        self.changed = asyncio.Event()
        # Per gateway: the highest event sequence that changed its peer set (deterministic over
        # the log, so every control-plane process agrees), and who wants to hear of changes.
        self.peer_revisions: dict[str, int] = {}
        self.peer_listeners: list[PeerListener] = []
        # Active devices per gateway as the log says; what a heartbeat has not counted yet is
        # load placement must add itself (see placement.GatewayCandidate.assigned).
        self.active_on: Counter[str] = Counter()
        self.placement = pl.PlacementIndex(gateway_capacity)
        # (expires_at, device_id), a min-heap: the key-expiry reactor pops what is due instead of
        # scanning the fleet. Entries go stale when a key rotates; ``due_keys`` skips those.
        self.key_expiries: list[tuple[datetime, str]] = []

    def due_keys(self, now: datetime) -> list[str]:
        """Pop the active devices whose key expired at or before ``now``, soonest first.

        A caller that fails to act on one hands it back with ``expiry_pending``.
        """
        out: list[str] = []
        heap = self.key_expiries
        while heap and heap[0][0] <= now:
            expires, device_id = heapq.heappop(heap)
            dev = self.devices.get(device_id)
            if dev is not None and dev.status == "active" and dev.key_expires_at == expires:
                out.append(device_id)
        return out

    def expiry_pending(self, device_id: str) -> None:
        dev = self.devices.get(device_id)
        if dev is not None and dev.key_expires_at is not None:
            heapq.heappush(self.key_expiries, (dev.key_expires_at, device_id))

    def candidate(self, gateway_id: str) -> pl.GatewayCandidate | None:
        """What placement sees of one gateway (the index keeps one per eligible gateway)."""
        gw = self.gateways.get(gateway_id)
        if gw is None:
            return None
        doors = tuple(
            pl.FrontDoor(fd.front_door_id, fd.endpoint, fd.transport, fd.priority, fd.active)
            for fd in gw.front_doors.values()
        )
        return pl.GatewayCandidate(
            gw.gateway_id,
            gw.region,
            gw.registered,
            gw.active,
            gw.last_heartbeat,
            gw.load,
            gw.peer_count,
            doors,
            self._assigned(gw),
        )

    def _assigned(self, gw: GatewayState) -> int:
        return max(0, self.active_on[gw.gateway_id] - gw.peer_count)

    def reindex(self, gateway_id: str) -> None:
        if (cand := self.candidate(gateway_id)) is not None:
            self.placement.put(cand)

    def _reindex_telemetry(self, gw: GatewayState) -> None:
        """A heartbeat or a peer change: only the numbers moved, so keep the doors as they are."""
        old = self.placement.gateways.get(gw.gateway_id)
        if old is None:
            self.reindex(gw.gateway_id)
            return
        self.placement.put(
            dataclasses.replace(
                old,
                last_heartbeat=gw.last_heartbeat,
                load=gw.load,
                peer_count=gw.peer_count,
                assigned=self._assigned(gw),
            )
        )

    def on_gateway(self, gateway_id: str) -> Iterable[DeviceState]:
        """Devices attached to a gateway, without scanning the whole fleet."""
        return self.devices_by_gateway.get(gateway_id, {}).values()

    def peer_set(self, gateway_id: str) -> list[tuple[str, tuple[str, ...]]]:
        return [peer for dev in self.on_gateway(gateway_id) if (peer := peer_of(dev)) is not None]

    def peer_entries(self, gateway_id: str) -> list[tuple[str, tuple[str, ...], str | None]]:
        """The peer set with each peer's egress address, for the gateway's NAT rules."""
        return [
            (*peer, dev.egress_address)
            for dev in self.on_gateway(gateway_id)
            if (peer := peer_of(dev)) is not None
        ]

    def pool_load(self, pool_id: str, now: datetime) -> float:
        """How full the pool is, from the devices assigned to it and what they moved this period."""
        pool = self.pools.get(pool_id)
        return egress.pool_load(
            self.pool_assigned[pool_id],
            self.pool_traffic[(pool_id, period_at(now, self.usage_period))],
            len(self.pool_addresses.get(pool_id, ())),
            pool.devices_per_address if pool else egress.DEVICES_PER_ADDRESS,
            pool.transfer_per_address if pool else None,
        )

    def seq_of(self, subject: str) -> int:
        return self.subject_seq.get(subject, 0)

    def skip(self, subject: str, seq: int) -> None:
        """A message on ``subject`` that cannot be decoded still takes its place in the sequence:
        otherwise every later append there would expect an older sequence and conflict forever.
        What it said is unknown, so nothing else changes."""
        if seq > self.subject_seq.get(subject, 0):
            self.subject_seq[subject] = seq
        self.applied_seq = max(self.applied_seq, seq)

    def apply(self, env: m.Envelope, subject: str | None = None) -> None:
        subject = subject or f"{EVENT_PREFIX}.{env.aggregate.replace('/', '.', 1)}"
        if env.seq and env.seq <= self.subject_seq.get(subject, 0):
            return
        if isinstance(env.event, _PEER_EVENTS):
            self._fold_peer_event(env)
        else:
            self._fold(env)
        if env.seq:
            self.subject_seq[subject] = env.seq
            self.applied_seq = max(self.applied_seq, env.seq)

    def _fold_peer_event(self, env: m.Envelope) -> None:
        """Fold a device event and, when the device's peer changed, record and announce it."""
        device_id: str = env.event.device_id  # type: ignore[union-attr]
        before = peer_of(self.devices.get(device_id))
        self._fold(env)
        dev = self.devices.get(device_id)
        after = peer_of(dev)
        if before == after or dev is None:
            return
        if (before is None) != (after is None):
            self.active_on[dev.gateway_id] += 1 if after is not None else -1
            if gw := self.gateways.get(dev.gateway_id):
                self._reindex_telemetry(gw)
        nat = ((after[0], dev.egress_address),) if after and dev.egress_address else ()
        removes = (before[0],) if before and (after is None or after[0] != before[0]) else ()
        upserts = (after,) if after else ()
        prev = self.peer_revisions.get(dev.gateway_id, 0)
        revision = max(prev, env.seq)
        self.peer_revisions[dev.gateway_id] = revision
        change = PeerChange(dev.gateway_id, prev, revision, upserts, removes, nat)
        for listener in self.peer_listeners:
            listener(change)

    def fold_telemetry(self, env: m.Envelope) -> None:
        """Heartbeats live in another stream: fold them without touching subject sequences."""
        self._fold(env)

    @staticmethod
    def _transition(dev: DeviceState, event: m.Event) -> None:
        after = transition(Lifecycle(dev.status, dev.reason), event)
        assert after is not None
        dev.status, dev.reason = after.status, after.reason

    def _fold(self, env: m.Envelope) -> None:
        e = env.event
        match e:
            case m.TierDefined():
                self.tiers[e.tier] = e
            case m.TokenIssued():
                t = TokenState(e.token_id, e.token_hash, e.tier, e.max_uses, e.expires_at)
                self.tokens[e.token_id] = t
                self.tokens_by_hash[e.token_hash] = t
            case m.TokenUsed():
                if tok := self.tokens.get(e.token_id):
                    tok.uses += 1
                    tok.sessions.add(e.device_id)
            case m.TokenSessionReleased():
                if tok := self.tokens.get(e.token_id):
                    tok.sessions.discard(e.device_id)
            case m.TokenRevoked():
                if tok := self.tokens.get(e.token_id):
                    tok.revoked = True
            case m.GatewayAdded():
                self.gateways[e.gateway_id] = GatewayState(
                    e.gateway_id,
                    e.region,
                    e.token_hash,
                    nats_password_bcrypt=e.nats_password_bcrypt,
                )
                self.reindex(e.gateway_id)
            case m.FrontDoorSet():
                if gw := self.gateways.get(e.gateway_id):
                    gw.front_doors[e.front_door_id] = FrontDoorState(
                        e.front_door_id, e.endpoint, e.transport, e.priority, e.active
                    )
                    self.reindex(e.gateway_id)
            case m.GatewayRegistered():
                if gw := self.gateways.get(e.gateway_id):
                    gw.public_key = e.public_key
                    gw.listen_port = e.listen_port
                    self.reindex(e.gateway_id)
            case m.GatewayStatusChanged():
                if gw := self.gateways.get(e.gateway_id):
                    gw.active = e.active
                    self.reindex(e.gateway_id)
            case m.GatewayHeartbeat():
                gw = self.gateways.get(e.gateway_id)
                if gw and (gw.last_heartbeat is None or env.occurred_at >= gw.last_heartbeat):
                    gw.last_heartbeat = env.occurred_at
                    gw.load = e.load
                    gw.peer_count = e.peer_count
                    self._reindex_telemetry(gw)
            case m.EgressPoolDefined():
                self.pools[e.pool_id] = e
                try:
                    self.pool_addresses[e.pool_id] = egress.addresses(e.ips)
                except DammError:  # recorded before the inventory was checked
                    self.pool_addresses[e.pool_id] = ()
            case m.AddressAllocated():
                if self.addresses.is_free(e.index):
                    self.addresses.claim(e.index)
            case m.AddressReleased():
                if not self.addresses.is_free(e.index):
                    self.addresses.release(e.index)
            case m.CatalogPublished():
                current = self.catalog_versions.get(e.region, 0)
                self.catalog_versions[e.region] = max(current, e.version)
                if e.signed and e.version >= current:
                    self.catalogs[e.region] = e
            case m.UsageReported() if e.ledger_id and e.report_seq:
                mark = (e.gateway_id, e.ledger_id)
                self.usage_marks[mark] = max(self.usage_marks.get(mark, 0), e.report_seq)
            case m.SigningKeyAnnounced() if e.sealed_seed:
                ring = self.keyring
                ring.keys[e.key_id] = e
                if e.key_id != ring.active and e.key_id not in ring.retired:
                    ring.announced = e.key_id
                    self.announced_keys.add(e.key_id)
                ring.seq += 1
            case m.SigningKeyActivated() if e.key_id in self.keyring.keys:
                ring = self.keyring
                if ring.active is not None:
                    ring.retired.add(ring.active)
                ring.active = e.key_id
                if ring.announced == e.key_id:
                    ring.announced = None
                self.announced_keys.discard(e.key_id)
                ring.seq += 1
            case m.RotationKeyStored() if self.keyring.rotation is None:
                self.keyring.rotation = e
            case m.KeyBound():
                self.bound_keys[e.public_key] = e.device_id
            case m.UsagePeriodReset():
                self.usage.pop((e.device_id, e.period), None)
            case m.SigningKeyAnnounced():
                self.announced_keys.add(e.key_id)
            case m.SigningKeyActivated():
                self.announced_keys.discard(e.key_id)
            case m.DeviceFailedOver():
                if dev := self.devices.get(e.device_id):
                    dev.front_door_id = e.front_door_id
                    dev.pinned_keys = e.pinned_keys
                    dev.reported_at = max(dev.reported_at, e.reported_at)
            case m.DeviceCatalogKeysReported():
                if dev := self.devices.get(e.device_id):
                    dev.pinned_keys = e.pinned_keys
                    dev.reported_at = max(dev.reported_at, e.reported_at)
            case m.DeviceEnrolled() if e.device_id not in self.devices:
                enrolled = self.devices[e.device_id] = DeviceState(
                    **m.facts_of(e), index=self.overlay.index_of(e.address)
                )
                if e.identity_key:
                    self.identities[e.identity_key] = e.device_id
                self.count_egress(enrolled, 1)
                self.devices_by_gateway.setdefault(e.gateway_id, {})[e.device_id] = enrolled
                self.requests[env.correlation_id] = e.device_id
                self.expiry_pending(e.device_id)
            case m.DeviceRevoked() | m.DeviceSuspended() | m.DeviceResumed():
                if dev := self.devices.get(e.device_id):
                    was_revoked = dev.status == "revoked"
                    self._transition(dev, e)
                    if dev.status == "revoked" and not was_revoked:
                        self.count_egress(dev, -1)
                    if dev.status == "revoked" and (tok := self.tokens.get(dev.token_id)):
                        tok.sessions.discard(dev.device_id)
                    if isinstance(e, m.DeviceResumed):
                        self.expiry_pending(e.device_id)  # resumed with an old key: due again
            case m.DeviceKeyRotated():
                if dev := self.devices.get(e.device_id):
                    dev.public_key = e.new_public_key
                    dev.key_expires_at = e.key_expires_at
                    self._transition(dev, e)
                    self.expiry_pending(e.device_id)
            case m.UsageReported():
                period = period_at(e.measured_at or env.occurred_at, self.usage_period)
                for delta in e.deltas:
                    key = (delta.device_id, period)
                    self.usage[key] = self.usage.get(key, 0) + delta.rx_bytes + delta.tx_bytes
                    dev = self.devices.get(delta.device_id)
                    if dev is not None and dev.egress_pool_id is not None:
                        moved = max(0, delta.rx_bytes) + max(0, delta.tx_bytes)
                        self.pool_traffic[(dev.egress_pool_id, period)] += moved
            case _:
                pass

    def count_egress(self, dev: DeviceState, delta: int) -> None:
        """A revoked device gives its egress address back; a suspended one keeps it."""
        if dev.egress_pool_id is None:
            return
        self.pool_assigned[dev.egress_pool_id] += delta
        if dev.egress_address is not None:
            self.egress_in_use.setdefault(dev.egress_pool_id, Counter())[dev.egress_address] += (
                delta
            )
