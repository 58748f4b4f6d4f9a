"""Snapshots of the decision state, so start-up costs the tail of the log, not all of it.

A snapshot is the fold of the event stream up to one sequence, encoded canonically (msgspec
with sorted keys and sets) so that two replicas that folded the same log produce the same bytes
and the same digest: a snapshot can be checked by folding the log from scratch and comparing.
Heartbeat telemetry is left out (it lives in another stream and is folded again at start).

Snapshots live in a JetStream object store, so a replica starts without Postgres. One that
cannot be read, does not match its digest, was taken for another overlay or claims more of the
log than the log holds is ignored: start-up then folds from the first event, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import heapq
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import msgspec
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, ObjectStoreConfig, StorageType
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError

from damm import log
from damm.clock import sleep_or_stop
from damm.control.follower import StateFollower
from damm.control.state import (
    DecisionState,
    DeviceState,
    GatewayState,
    KeyringState,
    TokenState,
    peer_of,
)
from damm.domain import egress
from damm.domain.ipam import AddressPool
from damm.errors import DammError
from damm.events import model as m
from damm.subjects import EVENTS_STREAM, SNAPSHOT_BUCKET

_log = log.get("damm.snapshots")

BUCKET = SNAPSHOT_BUCKET
OBJECT = "decision-state"
FORMAT = 2  # 2: the sealed keyring and the published catalogs
PULL_BATCH = 64  # chunks of 128 KiB per pull


class StateImage(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a decision reads, and nothing derived from it (indices are rebuilt)."""

    seq: int
    applied_seq: int
    tiers: dict[str, m.TierDefined]
    tokens: dict[str, TokenState]
    gateways: dict[str, GatewayState]
    pools: dict[str, m.EgressPoolDefined]
    devices: dict[str, DeviceState]
    addresses: list[int]
    bound_keys: dict[str, str]
    requests: dict[str, str]
    subject_seq: dict[str, int]
    catalog_versions: dict[str, int]
    peer_revisions: dict[str, int]
    pool_traffic: list[tuple[str, str, int]]  # (pool, usage period, bytes)
    usage: list[tuple[str, str, int]]  # (device, usage period, bytes)
    announced_keys: set[str]
    # (gateway, agent ledger, highest usage report number): dedupe beyond JetStream's window
    usage_marks: list[tuple[str, str, int]] = msgspec.field(default_factory=list)
    keyring: KeyringState = msgspec.field(default_factory=KeyringState)
    catalogs: dict[str, m.CatalogPublished] = msgspec.field(default_factory=dict)


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    seq: int
    overlay: str
    usage_period: str  # usage is labelled by period: another setting would mislabel it
    digest: str  # sha256 of ``body``
    body: bytes


_encoder = msgspec.msgpack.Encoder(order="deterministic")
_image_decoder = msgspec.msgpack.Decoder(StateImage)
_snapshot_decoder = msgspec.msgpack.Decoder(Snapshot)


def _without_telemetry(gw: GatewayState) -> GatewayState:
    return replace(gw, last_heartbeat=None, load=0.0, peer_count=0)


def image(state: DecisionState, seq: int) -> StateImage:
    return StateImage(
        seq=seq,
        applied_seq=state.applied_seq,
        tiers=state.tiers,
        tokens=state.tokens,
        gateways={k: _without_telemetry(gw) for k, gw in state.gateways.items()},
        pools=state.pools,
        devices=state.devices,
        addresses=sorted(state.addresses.used_indices()),
        bound_keys=state.bound_keys,
        requests=state.requests,
        subject_seq=state.subject_seq,
        catalog_versions=state.catalog_versions,
        peer_revisions=state.peer_revisions,
        pool_traffic=sorted((pool, period, n) for (pool, period), n in state.pool_traffic.items()),
        usage=sorted((device, period, n) for (device, period), n in state.usage.items()),
        announced_keys=state.announced_keys,
        usage_marks=sorted((gw, ledger, n) for (gw, ledger), n in state.usage_marks.items()),
        keyring=state.keyring,
        catalogs=state.catalogs,
    )


def encode(state: DecisionState, seq: int) -> Snapshot:
    """The state as folded up to stream sequence ``seq`` (the caller makes sure it is exactly
    that: nothing beyond ``seq`` folded early)."""
    body = _encoder.encode(image(state, seq))
    return Snapshot(
        format=FORMAT,
        seq=seq,
        overlay=str(state.overlay.network),
        usage_period=state.usage_period,
        digest=hashlib.sha256(body).hexdigest(),
        body=body,
    )


def to_bytes(snap: Snapshot) -> bytes:
    return _encoder.encode(snap)


def restore(snap: Snapshot, state: DecisionState) -> None:
    """Fill a fresh state from a snapshot and rebuild every index the fold keeps."""
    if snap.format != FORMAT:
        raise ValueError(f"snapshot format {snap.format}, this build reads {FORMAT}")
    if snap.overlay != str(state.overlay.network):
        raise ValueError(f"snapshot for overlay {snap.overlay}, not {state.overlay.network}")
    if snap.usage_period != state.usage_period:
        raise ValueError(f"snapshot usage period {snap.usage_period}, not {state.usage_period}")
    if hashlib.sha256(snap.body).hexdigest() != snap.digest:
        raise ValueError("snapshot digest does not match its body")
    img = _image_decoder.decode(snap.body)
    addresses = AddressPool.restore(state.overlay, img.addresses)
    state.tiers = dict(img.tiers)
    state.tokens = dict(img.tokens)
    state.tokens_by_hash = {t.token_hash: t for t in state.tokens.values()}
    state.gateways = dict(img.gateways)
    state.pools = dict(img.pools)
    state.pool_addresses = {}
    for pool_id, pool in state.pools.items():
        try:
            state.pool_addresses[pool_id] = egress.addresses(pool.ips)
        except DammError:  # as the fold does: recorded before the inventory was checked
            state.pool_addresses[pool_id] = ()
    state.pool_traffic = Counter({(pool, period): n for pool, period, n in img.pool_traffic})
    state.usage = {(device, period): n for device, period, n in img.usage}
    state.announced_keys = set(img.announced_keys)
    state.usage_marks = {(gw, ledger): n for gw, ledger, n in img.usage_marks}
    state.keyring = img.keyring
    state.catalogs = dict(img.catalogs)
    state.pool_assigned = Counter()
    state.egress_in_use = {}
    state.devices = dict(img.devices)
    state.addresses = addresses
    state.bound_keys = dict(img.bound_keys)
    state.requests = dict(img.requests)
    state.subject_seq = dict(img.subject_seq)
    state.catalog_versions = dict(img.catalog_versions)
    state.peer_revisions = dict(img.peer_revisions)
    state.applied_seq = img.applied_seq
    state.devices_by_gateway = {}
    state.active_on.clear()
    expiries: list[tuple[Any, str]] = []
    state.identities = {}
    for dev in state.devices.values():
        state.devices_by_gateway.setdefault(dev.gateway_id, {})[dev.device_id] = dev
        if dev.identity_key and (
            dev.status != "revoked" or dev.identity_key not in state.identities
        ):
            state.identities[dev.identity_key] = dev.device_id
        if dev.status != "revoked":
            state.count_egress(dev, 1)
        if peer_of(dev) is not None:
            state.active_on[dev.gateway_id] += 1
        if dev.status == "active" and dev.key_expires_at is not None:
            expiries.append((dev.key_expires_at, dev.device_id))
    heapq.heapify(expiries)
    state.key_expiries = expiries
    for gateway_id in state.gateways:
        state.reindex(gateway_id)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Millions of objects allocated at once, none of them garbage: the cyclic collector would
    walk them again and again (about a third of a restore's time at 1M events)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def digest_of(state: DecisionState, seq: int) -> str:
    return encode(state, seq).digest


async def verify(nc: Any, snap: Snapshot, state: DecisionState) -> bool:
    """Fold the log from its first event up to the snapshot's sequence into ``state`` (empty,
    same overlay) and check the result has the snapshot's digest."""
    follower = StateFollower(nc, state, until_seq=snap.seq)
    try:
        await follower.start()
    finally:
        await follower.stop()
    return digest_of(state, snap.seq) == snap.digest


class SnapshotStore:
    """The latest snapshot in a JetStream object store (created on first save)."""

    def __init__(self, js: Any) -> None:
        self.js = js

    async def _bucket(self, create: bool) -> Any:
        try:
            return await self.js.object_store(BUCKET)
        except BucketNotFoundError:
            if not create:
                return None
            # As durable as the log it abbreviates: file storage, the event stream's replicas.
            events = await self.js.stream_info(EVENTS_STREAM)
            config = ObjectStoreConfig(
                description="DAMM decision-state snapshots",
                storage=StorageType.FILE,
                replicas=int(events.config.num_replicas or 1),
            )
            return await self.js.create_object_store(BUCKET, config=config)

    async def save(self, snap: Snapshot) -> None:
        bucket = await self._bucket(create=True)
        await bucket.put(OBJECT, to_bytes(snap))

    async def load(self) -> Snapshot | None:
        """The latest snapshot, its chunks pulled in large batches.

        nats-py's ``ObjectStore.get`` takes a push consumer and a thread hop per 128 KiB chunk:
        about 2.5 s for the 133 MB of a 1M-event log, against 0.6 s pulled. The object's own
        digest is not checked here: ``restore`` checks the snapshot's, over the whole body.
        """
        bucket = await self._bucket(create=False)
        if bucket is None:
            return None
        try:
            info = await bucket.get_info(OBJECT)
        except (ObjectNotFoundError, NotFoundError):
            return None
        chunks = int(info.chunks or 0)
        if not info.nuid or not chunks:
            return None
        sub = await self.js.pull_subscribe(
            f"$O.{BUCKET}.C.{info.nuid}",
            stream=f"OBJ_{BUCKET}",
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL,
                mem_storage=True,
                inactive_threshold=30.0,
            ),
        )
        parts: list[bytes] = []
        try:
            while len(parts) < chunks:
                msgs = await sub.fetch(min(PULL_BATCH, chunks - len(parts)), timeout=10)
                parts += [msg.data for msg in msgs]
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        data = b"".join(parts)
        if len(data) != info.size:
            raise ValueError(f"snapshot object holds {len(data)} bytes, not {info.size}")
        return _snapshot_decoder.decode(data)


async def start_state(store: SnapshotStore, state: DecisionState, last_seq: int) -> int:
    """Restore the latest usable snapshot into ``state``; return the sequence it covers (0 when
    none was usable, and ``state`` is left empty)."""
    try:
        snap = await store.load()
    except Exception as exc:  # an unreadable snapshot only costs a longer start
        _log.warning("snapshot not readable; folding from the start", error=repr(exc))
        return 0
    if snap is None:
        return 0
    if snap.seq > last_seq:
        _log.warning("snapshot is ahead of the log; ignored", seq=snap.seq, last_seq=last_seq)
        return 0
    try:
        with _collector_paused():
            restore(snap, state)  # checks everything before it changes ``state``
    except (ValueError, msgspec.DecodeError, DammError) as exc:
        _log.warning("snapshot rejected; folding from the start", error=str(exc))
        return 0
    _log.info("started from snapshot", seq=snap.seq, devices=len(state.devices))
    return snap.seq


class SnapshotWriter:
    """Takes a snapshot every ``interval_s`` once ``min_events`` more have been folded.

    Any replica may write one (they are identical for the same sequence); the process runs it on
    the leader only. A snapshot is taken only at a moment when the state holds exactly the
    stream up to the follower's position, so it equals a fold from scratch to that sequence.
    """

    def __init__(
        self,
        state: DecisionState,
        follower: Any,
        store: SnapshotStore,
        *,
        is_leader: Any = lambda: True,
        interval_s: float = 60.0,
        min_events: int = 10_000,
    ) -> None:
        self.state = state
        self.follower = follower
        self.store = store
        self.is_leader = is_leader
        self.interval_s = interval_s
        self.min_events = min_events
        self.last_seq = 0

    async def take(self, attempts: int = 5) -> Snapshot | None:
        """Snapshot at the next clean point of the fold; None if none came in ``attempts``.

        Own appends are folded ahead of the stream (read-your-writes), and then the state is
        not a prefix of the log; right after a ``sync`` it usually is, and nothing awaits
        between the check and the encoding.
        """
        for _ in range(attempts):
            await self.follower.sync()
            seq = self.follower.followed_seq
            if self.state.applied_seq <= seq:
                break
        else:
            return None
        snap = encode(self.state, seq)
        await self.store.save(snap)
        self.last_seq = seq
        _log.info("snapshot saved", seq=seq, bytes=len(snap.body))
        return snap

    async def run(self, stop: asyncio.Event) -> None:
        while not await sleep_or_stop(self.interval_s, stop):
            if not self.is_leader():
                continue
            if self.follower.followed_seq - self.last_seq < self.min_events:
                continue
            try:
                await self.take()
            except Exception:  # the next interval tries again
                _log.exception("snapshot failed")
