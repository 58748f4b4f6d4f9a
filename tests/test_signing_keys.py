"""Rotating the catalog signing key through the operator commands, against a real control plane."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from damm.catalog.verify import initial_trust, verify
from damm.cli.admin import activation_warning
from damm.control.handlers.signing_keys import CatalogKeyStatus, KeyReach, SigningKeyChanged
from damm.control.process import ControlPlane
from damm.device.failover import device_trust, failover, verify_for_device
from damm.device.standing import check_in
from damm.errors import Code, DammError
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.reports.render_text import render_text
from damm.reports.report import generate
from damm.stack.nats_server import NatsServer
from tests.fleet import enroll, setup_fleet
from tests.test_device_standing import enrolled_device, two_doors, wait_for


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


async def test_operators_see_who_fetched_the_announced_key(
    control: ControlPlane,
    nats_server: NatsServer,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    dsn: str,
    tmp_path: Path,
) -> None:
    """Only a device that accepted a catalog announcing the key holds it; status, activate and
    the report all say how many active devices that is."""
    fleet = await two_doors(admin_nc, gateway_nc)
    a = await enrolled_device(device_nc, fleet["token"], tmp_path / "a", nats_server.url)
    b = await enrolled_device(device_nc, fleet["token"], tmp_path / "b", nats_server.url)
    await enrolled_device(device_nc, fleet["token"], tmp_path / "c", nats_server.url)
    announced = await call(admin_nc, "admin.catalog.announce", p.Empty(), SigningKeyChanged)

    async def announces() -> bool:
        checked = verify_for_device(await fetch(device_nc), device_trust(a), now=int(time.time()))
        return announced.key_id in checked.trust.pinned and any(
            "fd2" in {d.id for d in g.front_doors} for g in checked.catalog.gateways
        )

    await wait_for(announces)
    await failover(device_nc, tmp_path / "a")  # accepts the catalog: pins the next key
    await check_in(device_nc, tmp_path / "b", b)  # still on the old key only

    status = await call(admin_nc, "admin.catalog.status", p.Empty(), CatalogKeyStatus)
    assert status.announced == (KeyReach(announced.key_id, 1, 3),)
    await control.wait_projected()
    rep = await generate(dsn)
    assert [(k.key_id, k.devices_with_key, k.devices_active) for k in rep.catalog_keys] == [
        (announced.key_id, 1, 3)
    ]
    assert ("catalog_key_not_fetched", announced.key_id) in {
        (r.kind, r.subject) for r in rep.recommendations
    }
    assert "Announced catalog signing keys" in render_text(rep)
    activated = await call(admin_nc, "admin.catalog.activate", p.Empty(), SigningKeyChanged)
    assert activated.reach == KeyReach(announced.key_id, 1, 3)
    assert "2 of 3 active devices" in (activation_warning(activated) or "")
