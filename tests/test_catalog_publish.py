"""The catalog publisher against a real control plane: health, versions, re-signing, rotation."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS

from damm.catalog.canonical import decode
from damm.catalog.document import Catalog, decode_signed
from damm.catalog.verify import initial_trust, verify
from damm.control.context import Context
from damm.control.process import ControlPlane
from damm.control.publishers.catalogs import CatalogPublisher, catalog_subject, digest_of
from damm.errors import Code, DammError
from damm.events.model import Actor
from damm.events.store import EventStore
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.protocol.router import Call, Service
from tests.fleet import enroll, setup_fleet

ADMIN = Actor("admin", "test")


@pytest.fixture
async def ctx(control: ControlPlane) -> Context:
    assert control.ctx is not None
    return control.ctx


@pytest.fixture
async def publisher(control: ControlPlane, ctx: Context) -> AsyncIterator[CatalogPublisher]:
    pub = CatalogPublisher(ctx)
    assert control.nc is not None
    service = Service(control.nc, pub.routes(), queue="catalog-test")
    await service.start()
    yield pub
    await pub.stop()
    await service.stop()


def catalog_of(pub: CatalogPublisher, region: str = "eu") -> Catalog:
    signed = pub.latest[region].signed
    assert signed is not None
    return decode(signed.payload)


def doors(catalog: Catalog, gw_id: str) -> list[tuple[str, str, int]]:
    gw = next(g for g in catalog.gateways if g.id == gw_id)
    return [(fd.id, fd.endpoint, fd.priority) for fd in gw.front_doors]


async def test_catalog_lists_healthy_gateways_only(
    ctx: Context, publisher: CatalogPublisher, admin_nc: NATS, gateway_nc: NATS
) -> None:
    await setup_fleet(admin_nc, gateway_nc, gateways=(("gw1", "eu"), ("gw2", "eu"), ("gw9", "us")))
    # gw3: added, never registered. gw4: registered and heartbeating, then deactivated.
    await call(admin_nc, "admin.gateway.add",
               p.AddGateway(gateway_id="gw3", region="eu", front_door="192.0.2.30:51820"),
               p.GatewayAdded)  # fmt: skip
    await call(admin_nc, "admin.gateway.status",
               p.SetGatewayStatus(gateway_id="gw2", active=False), p.Done)  # fmt: skip
    await call(admin_nc, "admin.egress.define",
               p.DefineEgress(pool_id="p1", region="eu", countries=("NL", "DE"),
                              ips=("198.51.100.0/28",)), p.Done)  # fmt: skip
    await ctx.follower.sync()
    now = time.time()
    published = await publisher.tick(now)
    assert {c.region for c in published} == {"eu", "us"}
    eu = catalog_of(publisher)
    assert [g.id for g in eu.gateways] == ["gw1"]
    assert eu.gateways[0].egress_countries == ("DE", "NL")
    assert doors(eu, "gw1") == [("fd1", "192.0.2.1:51820", 10)]
    assert [g.id for g in catalog_of(publisher, "us").gateways] == ["gw9"]

    # Heartbeats older than heartbeat_ttl_s: nobody is healthy any more.
    await publisher.tick(now + ctx.settings.heartbeat_ttl_s + 1)
    assert catalog_of(publisher).gateways == ()


async def test_version_increments_on_change_only(
    ctx: Context,
    control: ControlPlane,
    publisher: CatalogPublisher,
    admin_nc: NATS,
    gateway_nc: NATS,
) -> None:
    await setup_fleet(admin_nc, gateway_nc)
    await ctx.follower.sync()
    now = time.time()
    [first] = await publisher.tick(now)
    assert first.version == 1
    assert await publisher.tick(now + 1) == []  # nothing changed, far from expiry
    assert publisher.latest["eu"].version == 1

    await call(admin_nc, "admin.gateway.front_door",
               p.SetFrontDoor(gateway_id="gw1", front_door_id="fd2",
                              endpoint="192.0.2.2:51820", priority=20), p.Done)  # fmt: skip
    await ctx.follower.sync()
    [second] = await publisher.tick(now + 2)
    assert second.version == 2
    assert doors(catalog_of(publisher), "gw1") == [
        ("fd1", "192.0.2.1:51820", 10), ("fd2", "192.0.2.2:51820", 20)]  # fmt: skip

    await call(admin_nc, "admin.gateway.front_door",
               p.SetFrontDoor(gateway_id="gw1", front_door_id="fd1",
                              endpoint="192.0.2.1:51820", priority=10, active=False),
               p.Done)  # fmt: skip
    await ctx.follower.sync()
    [third] = await publisher.tick(now + 3)
    assert third.version == 3
    assert doors(catalog_of(publisher), "gw1") == [("fd2", "192.0.2.2:51820", 20)]

    # Every version is on the log, with the digest of exactly the bytes that were served.
    assert control.nc is not None
    history, _ = await EventStore(control.nc).load(catalog_subject("eu"))
    assert [e.event.version for e in history] == [1, 2, 3]  # type: ignore[union-attr]
    signed = publisher.latest["eu"].signed
    assert signed is not None
    assert history[-1].event.digest == digest_of(signed.payload)  # type: ignore[union-attr]
    assert history[-1].event.key_id == ctx.signer.key_id  # type: ignore[union-attr]

    # A restarted publisher continues the sequence from the log.
    restarted = CatalogPublisher(ctx)
    [fourth] = await restarted.tick(now + 4)
    assert fourth.version == 4


async def test_resigned_before_expiry(
    ctx: Context, publisher: CatalogPublisher, admin_nc: NATS, gateway_nc: NATS
) -> None:
    await setup_fleet(admin_nc, gateway_nc)
    await ctx.follower.sync()
    ctx.settings = dataclasses.replace(ctx.settings, catalog_ttl_s=30)
    now = time.time()
    [first] = await publisher.tick(now)
    assert await publisher.tick(now + 15) == []
    # Within a third of the lifetime of expiring: a new version with the same content.
    [renewed] = await publisher.tick(now + 21)
    assert renewed.version == first.version + 1
    assert renewed.expires_at == int(now + 21) + 30
    assert renewed.content == first.content


async def test_concurrent_publishers_keep_versions_monotonic(
    ctx: Context, publisher: CatalogPublisher, admin_nc: NATS, gateway_nc: NATS
) -> None:
    await setup_fleet(admin_nc, gateway_nc)
    await ctx.follower.sync()
    other = CatalogPublisher(ctx)
    now = time.time()
    assert [c.version for c in await publisher.tick(now)] == [1]
    assert [c.version for c in await other.tick(now)] == [2]  # knows the log, not the content
    await call(admin_nc, "admin.gateway.front_door",
               p.SetFrontDoor(gateway_id="gw1", front_door_id="fd2",
                              endpoint="192.0.2.2:51820", priority=20), p.Done)  # fmt: skip
    await ctx.follower.sync()  # a change to publish
    # publisher still expects the subject at version 1's sequence: conflict, reload, retry.
    assert [c.version for c in await publisher.tick(now)] == [3]


async def test_catalog_get_over_nats_verifies_with_enrollment_trust(
    ctx: Context,
    publisher: CatalogPublisher,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    enrolled = await enroll(device_nc, fleet["token"])
    assert enrolled.catalog is not None
    trust = initial_trust(
        enrolled.catalog.region,
        enrolled.catalog.key_id,
        enrolled.catalog.public_key,
        enrolled.catalog.min_version,
    )
    await ctx.follower.sync()
    reply = await call(device_nc, "catalog.get", p.GetCatalog(region="eu"), p.SignedCatalogReply)
    catalog, _ = verify(reply.signed, trust, now=int(time.time()))
    assert [g.id for g in catalog.gateways] == ["gw1"]
    assert catalog.gateways[0].public_key == fleet["gw1_public_key"]

    with pytest.raises(DammError) as excinfo:
        await call(device_nc, "catalog.get", p.GetCatalog(region="mars"), p.SignedCatalogReply)
    assert excinfo.value.code is Code.NOT_FOUND


async def test_key_rotation_announced_then_switched(
    ctx: Context,
    control: ControlPlane,
    publisher: CatalogPublisher,
    admin_nc: NATS,
    gateway_nc: NATS,
) -> None:
    await setup_fleet(admin_nc, gateway_nc)
    await ctx.follower.sync()
    key1 = ctx.signer
    trust = initial_trust("eu", key1.key_id, key1.public_key_b64)
    now = time.time()
    await publisher.tick(now)
    keys = control.signing_keys
    assert keys is not None

    key2 = await keys.announce(p.Empty(), Call("announce", ADMIN))
    [announced] = await publisher.tick(now + 1)
    assert announced.signed is not None and announced.signed.key_id == key1.key_id
    assert [k.key_id for k in catalog_of(publisher).next_keys] == [key2.key_id]

    await keys.activate(p.Empty(), Call("activate", ADMIN))
    assert ctx.signer.key_id == key2.key_id  # new enrollments pin the new key
    [switched] = await publisher.tick(now + 2)
    assert switched.signed is not None and switched.signed.key_id == key2.key_id
    assert catalog_of(publisher).next_keys == ()

    # A device that only saw key 1 refuses key 2 ...
    with pytest.raises(DammError) as excinfo:
        verify(switched.signed, trust, now=int(now) + 2)
    assert excinfo.value.code is Code.CATALOG_UNKNOWN_KEY
    # ... until it accepts the announcing catalog.
    _, trust = verify(announced.signed, trust, now=int(now) + 2)
    catalog, _ = verify(decode_signed(switched.encoded or b""), trust, now=int(now) + 2)
    assert catalog.version == switched.version
