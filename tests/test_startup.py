"""Start-up independent of history: no deadline on catch-up, snapshots equal to a fold from
scratch, and nothing published from a partial fold."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS

from damm.catalog.canonical import decode as decode_catalog
from damm.catalog.document import Catalog, decode_signed
from damm.clock import SkewedClock
from damm.control.process import ControlPlane
from damm.control.snapshots import SnapshotStore, verify
from damm.control.state import DecisionState
from damm.dev import fleet_log
from damm.dev.fleet_log import SyntheticFleet
from damm.domain.ipam import Overlay
from damm.events import model as m
from damm.events.store import Append, EventStore, envelope
from damm.events.streams import ensure_streams
from damm.keys.sealing import LocalKek
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.settings import ControlSettings
from damm.stack.nats_server import NatsServer
from tests.fleet import enroll, heartbeat, setup_fleet

BULK = 3_000


@pytest.fixture
def plane_factory(nats_server: NatsServer, dsn: str, tmp_path: Path) -> Callable[..., ControlPlane]:
    kek = LocalKek.generate()  # one deployment: every plane shares the KEK

    def make(**overrides: object) -> ControlPlane:
        settings = ControlSettings(
            overlay=Overlay.parse("10.44.0.0/24"), keys_dir=tmp_path / "keys", kek=kek
        )
        return ControlPlane(
            nats_server.url,
            dsn,
            replace(settings, **overrides),  # type: ignore[arg-type]
            password=nats_server.passwords["control"],
            clock=SkewedClock(),
        )

    return make


@pytest.fixture
async def planes() -> AsyncIterator[list[ControlPlane]]:
    started: list[ControlPlane] = []
    yield started
    for plane in started:
        await plane.stop()


async def bulk_tokens(nc: NATS, n: int) -> None:
    """Lengthen the log cheaply: token issues for a tier, pipelined."""
    actor = m.Actor("admin", "bench")
    items = []
    for i in range(n):
        token_id = f"bulk{i}"
        subject = f"damm.evt.token.{token_id}"
        event = m.TokenIssued(
            token_id=token_id, token_hash=hashlib.sha256(token_id.encode()).hexdigest(), tier="gold"
        )
        env = envelope(subject, event, actor=actor, correlation_id=uuid.uuid4().hex)
        items.append(Append(subject, env))
    await EventStore(nc).append_many(items)


async def test_a_restart_on_a_log_longer_than_the_deadline_answers(
    plane_factory: Callable[..., ControlPlane],
    planes: list[ControlPlane],
    nc: NATS,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
) -> None:
    first = plane_factory()
    await first.start()
    fleet = await setup_fleet(admin_nc, gateway_nc)
    await first.stop()
    await bulk_tokens(nc, BULK)
    # A request barrier this short could never fold 3k events; start-up must not use it.
    second = plane_factory(sync_timeout_s=0.001)
    await second.start()
    planes.append(second)
    assert second.ctx is not None
    assert len(second.ctx.state.tokens) == BULK + 1
    await heartbeat(gateway_nc, "gw1", fleet["gw1_token"])
    dev = await enroll(device_nc, fleet["token"])
    assert dev.gateway_id == "gw1"


async def test_a_snapshot_equals_a_fold_from_scratch_and_start_up_uses_it(
    plane_factory: Callable[..., ControlPlane],
    planes: list[ControlPlane],
    nc: NATS,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
) -> None:
    first = plane_factory()
    await first.start()
    fleet = await setup_fleet(admin_nc, gateway_nc, key_lifetime_s=3600)
    for _ in range(5):
        await enroll(device_nc, fleet["token"])
    await bulk_tokens(nc, 2_000)
    assert first.ctx is not None and first.snapshots is not None
    await first.ctx.follower.sync()
    snap = await first.snapshots.take()
    assert snap is not None
    await first.stop()

    stored = await SnapshotStore(nc.jetstream()).load()
    assert stored == snap
    bucket = await nc.jetstream().stream_info("OBJ_damm-snapshots")
    events = await nc.jetstream().stream_info("DAMM_EVENTS")
    assert bucket.config.storage == events.config.storage
    assert bucket.config.num_replicas == events.config.num_replicas
    overlay = Overlay.parse("10.44.0.0/24")
    assert await verify(nc, snap, DecisionState(overlay))

    second = plane_factory()
    await second.start()
    planes.append(second)
    assert second.started_from == snap.seq
    assert second.ctx is not None
    state = second.ctx.state
    assert len(state.devices) == 5
    assert state.key_expiries, "the expiry heap is rebuilt from the snapshot"
    await heartbeat(gateway_nc, "gw1", fleet["gw1_token"])
    dev = await enroll(device_nc, fleet["token"])
    assert dev.address == "10.44.0.15/24", "allocation continues after the snapshot's addresses"


async def test_a_tampered_snapshot_is_ignored(
    plane_factory: Callable[..., ControlPlane],
    planes: list[ControlPlane],
    nc: NATS,
    admin_nc: NATS,
    gateway_nc: NATS,
) -> None:
    first = plane_factory()
    await first.start()
    await setup_fleet(admin_nc, gateway_nc)
    assert first.ctx is not None and first.snapshots is not None
    await first.ctx.follower.sync()
    snap = await first.snapshots.take()
    assert snap is not None
    await first.stop()
    store = SnapshotStore(nc.jetstream())
    forged = msgspec.structs.replace(snap, body=snap.body.replace(b"gw1", b"gwX"))
    await store.save(forged)
    second = plane_factory()
    await second.start()
    planes.append(second)
    assert second.started_from == 0
    assert second.ctx is not None and "gw1" in second.ctx.state.gateways


async def test_no_catalog_after_a_restart_lists_fewer_gateways_than_are_healthy(
    plane_factory: Callable[..., ControlPlane],
    planes: list[ControlPlane],
    nc: NATS,
    device_nc: NATS,
) -> None:
    """Enough gateways that their heartbeats take a while to fold: a publisher that starts
    before they are folded signs a catalog listing fewer, and then another one."""
    fleet = SyntheticFleet(gateways=1000, devices=0)
    store = EventStore(nc)
    await fleet_log.write(store, fleet_log.setup_items(fleet))
    await fleet_log.beat_all(store, fleet)
    first = plane_factory()
    await first.start()
    before = await served_catalog(device_nc)
    assert len(before.gateways) == 1000
    await first.stop()
    second = plane_factory()
    await second.start()
    planes.append(second)
    # Every replica serves the last published catalog; the new leader then signs its own.
    assert len((await served_catalog(device_nc)).gateways) == 1000
    assert second.leadership is not None and second.ctx is not None
    await asyncio.wait_for(second.leadership.gained.wait(), 10)
    ctx = second.ctx
    for _ in range(500):
        if (latest := ctx.state.catalogs.get("eu")) and latest.version > before.version:
            break
        await asyncio.sleep(0.02)
    after = await served_catalog(device_nc)
    assert len(after.gateways) == 1000
    assert after.version == before.version + 1, "a catalog was published in between"


async def served_catalog(device_nc: NATS) -> Catalog:
    reply = await call(device_nc, "catalog.get", p.GetCatalog(region="eu"), p.SignedCatalogReply)
    return decode_catalog(decode_signed(reply.signed).payload)


async def test_a_snapshot_of_many_chunks_loads_back_exactly(nc: NATS) -> None:
    """The loader pulls the object's chunks itself (the client's object-store reader moves
    about 50 MB/s here); what it returns is the saved snapshot, the latest of several saves."""
    from damm.control.snapshots import Snapshot

    await ensure_streams(nc.jetstream())
    store = SnapshotStore(nc.jetstream(timeout=30))
    assert await store.load() is None
    saved = []
    for n, size in enumerate((3_000_000, 1_500_000)):  # each spans many 128 KiB chunks
        body = hashlib.shake_256(str(n).encode()).digest(size)
        snap = Snapshot(format=1, seq=n + 1, overlay="10.44.0.0/24", usage_period="month",
                        digest=hashlib.sha256(body).hexdigest(), body=body)  # fmt: skip
        await store.save(snap)
        saved.append(snap)
        assert await store.load() == snap
    assert await store.load() == saved[-1]
