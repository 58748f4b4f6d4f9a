"""Rotating the catalog signing key through the operator commands, against a real control plane."""

from __future__ import annotations

import time

import pytest
from nats.aio.client import Client as NATS

from damm.catalog.verify import initial_trust, verify
from damm.control.handlers.signing_keys import SigningKeyChanged
from damm.control.process import ControlPlane
from damm.errors import Code, DammError
from damm.protocol import messages as p
from damm.protocol.client import call
from tests.fleet import enroll, setup_fleet


async def fetch(nc: NATS) -> bytes:
    reply = await call(nc, "catalog.get", p.GetCatalog(region="eu"), p.SignedCatalogReply)
    return reply.signed


async def test_announce_then_activate(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    dev = await enroll(device_nc, fleet["token"])
    assert dev.catalog is not None
    followed = initial_trust("eu", dev.catalog.key_id, dev.catalog.public_key)
    offline = followed
    now = int(time.time())

    with pytest.raises(DammError) as info:
        await call(admin_nc, "admin.catalog.activate", p.Empty(), SigningKeyChanged)
    assert info.value.code is Code.NOT_FOUND

    announced = await call(admin_nc, "admin.catalog.announce", p.Empty(), SigningKeyChanged)
    assert announced.key_id != dev.catalog.key_id
    catalog, followed = verify(await fetch(device_nc), followed, now=now)
    assert [k.key_id for k in catalog.next_keys] == [announced.key_id]
    assert announced.key_id in followed.pinned

    activated = await call(admin_nc, "admin.catalog.activate", p.Empty(), SigningKeyChanged)
    assert activated.retired_key_id == dev.catalog.key_id
    signed = await fetch(device_nc)
    catalog, followed = verify(signed, followed, now=now)
    assert catalog.version > 1
    with pytest.raises(DammError) as info:
        verify(signed, offline, now=now)
    assert info.value.code is Code.CATALOG_UNKNOWN_KEY
    newcomer = await enroll(device_nc, fleet["token"])
    assert newcomer.catalog is not None and newcomer.catalog.key_id == activated.key_id
    await control.wait_projected()


async def test_enrollment_pins_the_current_catalog_version(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    assert control.catalogs is not None
    await control.catalogs.tick()
    published = control.catalogs.latest["eu"].version
    assert published >= 1
    dev = await enroll(device_nc, fleet["token"])
    assert dev.catalog is not None and dev.catalog.min_version == published
