"""Client failover against a catalog served over real NATS: every refusal leaves the files alone."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from damm.catalog.document import (
    CatalogFrontDoor,
    CatalogGateway,
    SignedCatalog,
    encode_signed,
)
from damm.catalog.signing import CatalogSigner, build_catalog
from damm.catalog.verify import initial_trust
from damm.device import files
from damm.device.failover import failover
from damm.device.wgconfig import parse_endpoint, render_wg_quick
from damm.errors import Code, DammError
from damm.private_files import write_atomic
from damm.protocol import messages as p
from damm.protocol.router import ok_reply
from damm.subjects import request_subject

NOW = 1_800_000_000
KEY1 = CatalogSigner.generate()
KEY2 = CatalogSigner.generate()
FD1 = "192.0.2.1:51820"
FD2 = "192.0.2.2:51820"
FD3 = "198.51.100.9:51820"


def wg_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


GW_KEY = wg_key()


def door(fd_id: str, endpoint: str, priority: int) -> CatalogFrontDoor:
    return CatalogFrontDoor(id=fd_id, endpoint=endpoint, priority=priority)


DOORS = (door("fd1", FD1, 10), door("fd2", FD2, 20), door("fd3", FD3, 30))


def gateway(*doors: CatalogFrontDoor, gw_id: str = "gw1") -> CatalogGateway:
    return CatalogGateway(
        id=gw_id, region="eu", public_key=GW_KEY, front_doors=doors, egress_countries=("DE",)
    )


def signed_catalog(
    *,
    signer: CatalogSigner = KEY1,
    version: int = 1,
    gateways: tuple[CatalogGateway, ...] | None = None,
    now: int = NOW,
    ttl: int = 3600,
    region: str = "eu",
    announce: tuple[CatalogSigner, ...] = (),
) -> bytes:
    catalog = build_catalog(
        region, gateways if gateways is not None else (gateway(*DOORS),), version=version,
        now=now, ttl_seconds=ttl, next_keys=[s.announcement() for s in announce],
    )  # fmt: skip
    return encode_signed(signer.sign(catalog))


def make_device(state_dir: Path, *, min_version: int = 0) -> None:
    files.generate_key(state_dir)
    dev = files.DeviceFile(
        device_id="dev-1", public_key=files.public_key(state_dir), gateway_id="gw1",
        gateway_public_key=GW_KEY, front_door_id="fd1", endpoint=FD1, address="10.44.0.10",
        allowed_ips=("0.0.0.0/0",), dns=("10.44.0.1",), nats_url="nats://unused:4222",
        rotation_key=wg_key(),
        trust=initial_trust("eu", KEY1.key_id, KEY1.public_key_b64, min_version),
    )  # fmt: skip
    text = render_wg_quick(
        files.private_key(state_dir), "10.44.0.10/32", None, dev.dns, GW_KEY, FD1, dev.allowed_ips
    )
    write_atomic(state_dir / files.CONFIG, text + "# a line the user added\n")
    files.save(state_dir, dev)


class Server:
    """Stands in for the control plane: catalog.get answers whatever bytes the test sets; the
    device's check-in says "active" and its failover report is taken (both are exercised against
    the real control plane in tests/test_device_standing.py)."""

    def __init__(self) -> None:
        self.signed = b""
        self.requests: list[str] = []
        self.reports: list[p.ReportFailover] = []

    async def on_msg(self, msg: Msg) -> None:
        req = msgspec.json.decode(msg.data, type=p.GetCatalog)
        self.requests.append(req.region)
        await msg.respond(ok_reply(p.SignedCatalogReply(signed=self.signed)))

    async def on_status(self, msg: Msg) -> None:
        req = msgspec.json.decode(msg.data, type=p.DeviceCheckIn)
        standing = p.DeviceStanding(
            device_id=req.device_id, status="active", gateway_id="gw1", front_door_id="fd1"
        )
        await msg.respond(ok_reply(standing))

    async def on_report(self, msg: Msg) -> None:
        self.reports.append(msgspec.json.decode(msg.data, type=p.ReportFailover))
        await msg.respond(ok_reply(p.Done(seq=1)))

    async def subscribe(self, nc: NATS) -> list[object]:
        subs = [
            await nc.subscribe(request_subject("catalog.get"), cb=self.on_msg),
            await nc.subscribe(request_subject("device.status"), cb=self.on_status),
            await nc.subscribe(request_subject("device.failover"), cb=self.on_report),
        ]
        await nc.flush()
        return subs


@pytest.fixture
async def server(nc: NATS) -> AsyncIterator[Server]:
    srv = Server()
    subs = await srv.subscribe(nc)
    yield srv
    for sub in subs:
        await sub.unsubscribe()  # type: ignore[attr-defined]


def snapshot(state_dir: Path) -> tuple[bytes, bytes]:
    return (state_dir / files.CONFIG).read_bytes(), (state_dir / files.STATE).read_bytes()


class FakeBackend:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def set_peer_endpoint(self, public_key: str, endpoint: str) -> None:
        self.calls.append((public_key, endpoint))


async def test_failover_moves_to_next_front_door(
    server: Server, device_nc: NATS, tmp_path: Path
) -> None:
    make_device(tmp_path)
    server.signed = signed_catalog(version=7)
    before_config = (tmp_path / files.CONFIG).read_text()
    backend = FakeBackend()
    res = await failover(device_nc, tmp_path, now=NOW + 10, backend=backend)
    assert (res.old_endpoint, res.new_endpoint, res.front_door_id) == (FD1, FD2, "fd2")
    assert res.catalog_version == 7 and res.live_updated
    assert server.requests == ["eu"]
    after = (tmp_path / files.CONFIG).read_text()
    assert parse_endpoint(after) == FD2
    assert after == before_config.replace(FD1, FD2)  # nothing else changed, user line kept
    assert (tmp_path / files.CONFIG).stat().st_mode & 0o777 == 0o600
    dev = files.load(tmp_path)
    assert (dev.endpoint, dev.front_door_id) == (FD2, "fd2")
    assert dev.trust is not None and dev.trust.min_version == 7
    assert backend.calls == [(GW_KEY, FD2)]

    # a second failover cycles on to the third door, then back to the first
    res = await failover(device_nc, tmp_path, now=NOW + 20)
    assert res.new_endpoint == FD3 and not res.live_updated
    res = await failover(device_nc, tmp_path, now=NOW + 30)
    assert res.new_endpoint == FD1


REFUSALS: dict[str, tuple[Callable[[], bytes], Code, int]] = {
    "forged signature": (
        lambda: encode_signed(
            msgspec.structs.replace(
                s := msgspec.msgpack.decode(signed_catalog(), type=SignedCatalog),
                signature=bytes([s.signature[0] ^ 1]) + s.signature[1:],
            )
        ),
        Code.CATALOG_BAD_SIGNATURE,
        0,
    ),
    "tampered payload": (
        lambda: encode_signed(
            msgspec.structs.replace(
                s := msgspec.msgpack.decode(signed_catalog(), type=SignedCatalog),
                payload=s.payload.replace(FD2.encode(), b"192.0.2.66:51820"),
            )
        ),
        Code.CATALOG_BAD_SIGNATURE,
        0,
    ),
    "unknown key": (lambda: signed_catalog(signer=KEY2), Code.CATALOG_UNKNOWN_KEY, 0),
    "expired": (lambda: signed_catalog(now=NOW - 7200, ttl=3600), Code.CATALOG_STALE, 0),
    "issued in the future": (lambda: signed_catalog(now=NOW + 3600), Code.CATALOG_STALE, 0),
    "replayed older version": (lambda: signed_catalog(version=4), Code.CATALOG_ROLLBACK, 5),
    "gateway missing": (
        lambda: signed_catalog(gateways=(gateway(*DOORS, gw_id="gw2"),)),
        Code.CATALOG_NO_GATEWAY,
        0,
    ),
    "single front door": (
        lambda: signed_catalog(gateways=(gateway(DOORS[0]),)),
        Code.NO_ALTERNATE_FRONT_DOOR,
        0,
    ),
    "wrong region": (
        lambda: signed_catalog(
            region="us",
            gateways=(msgspec.structs.replace(gateway(*DOORS), region="us"),),
        ),
        Code.CATALOG_WRONG_REGION,
        0,
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_refused_catalog_leaves_files_untouched(
    case: str, server: Server, device_nc: NATS, tmp_path: Path
) -> None:
    make_bytes, code, min_version = REFUSALS[case]
    make_device(tmp_path, min_version=min_version)
    server.signed = make_bytes()
    before = snapshot(tmp_path)
    listing = sorted(os.listdir(tmp_path))
    backend = FakeBackend()
    with pytest.raises(DammError) as excinfo:
        await failover(device_nc, tmp_path, now=NOW, backend=backend)
    assert excinfo.value.code is code, excinfo.value.line()
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == listing  # no temporary file left behind
    assert backend.calls == []


async def test_same_version_is_accepted_again(
    server: Server, device_nc: NATS, tmp_path: Path
) -> None:
    """Equal to the last accepted version is not a rollback (the catalog did not change)."""
    make_device(tmp_path, min_version=5)
    server.signed = signed_catalog(version=5)
    res = await failover(device_nc, tmp_path, now=NOW)
    assert res.new_endpoint == FD2


async def test_key_rotation_followed_after_announcement(
    server: Server, device_nc: NATS, tmp_path: Path
) -> None:
    make_device(tmp_path)
    # Without the announcement, key 2 is a stranger.
    server.signed = signed_catalog(signer=KEY2, version=2)
    before = snapshot(tmp_path)
    with pytest.raises(DammError) as excinfo:
        await failover(device_nc, tmp_path, now=NOW)
    assert excinfo.value.code is Code.CATALOG_UNKNOWN_KEY
    assert snapshot(tmp_path) == before

    # Key 1 vouches for key 2; the device pins it on acceptance.
    server.signed = signed_catalog(signer=KEY1, version=1, announce=(KEY2,))
    await failover(device_nc, tmp_path, now=NOW)
    dev = files.load(tmp_path)
    assert dev.trust is not None and KEY2.key_id in dev.trust.pinned

    # Now a key-2 catalog is accepted without re-enrolling.
    server.signed = signed_catalog(signer=KEY2, version=2)
    res = await failover(device_nc, tmp_path, now=NOW)
    assert res.key_id == KEY2.key_id and res.catalog_version == 2


async def test_device_without_trust_is_refused(
    server: Server, device_nc: NATS, tmp_path: Path
) -> None:
    make_device(tmp_path)
    dev = files.load(tmp_path)
    files.save(tmp_path, msgspec.structs.replace(dev, trust=None))
    server.signed = signed_catalog()
    before = snapshot(tmp_path)
    with pytest.raises(DammError) as excinfo:
        await failover(device_nc, tmp_path, now=NOW)
    assert excinfo.value.code is Code.STATE_MISSING
    assert snapshot(tmp_path) == before
