"""The device under its own identity, against the real control plane: lifecycle reaches the
device (failover and diagnose refuse), failovers are recorded, and no device speaks for another."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import msgspec
import pytest
from nats.aio.client import Client as NATS

from damm.catalog.verify import TrustState
from damm.control.process import ControlPlane
from damm.device import files
from damm.device.diagnose import FAIL, PASS, SKIP, diagnose
from damm.device.failover import device_trust, failover, fetch_catalog, verify_for_device
from damm.device.profile import save_enrollment
from damm.device.standing import check_in
from damm.errors import Code, DammError
from damm.events import model as m
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.protocol.device_auth import sign
from damm.reports.report import generate
from damm.stack.nats_server import NatsServer
from tests.fleet import enroll, setup_fleet
from tests.test_lifecycle import refused

FD2 = "198.51.100.9:51820"
DAMM = str(Path(sys.executable).parent / "damm")


async def wait_for(check: object, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()  # type: ignore[operator]
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def enrolled_device(
    device_nc: NATS, token: str, state_dir: Path, nats_url: str
) -> files.DeviceFile:
    public = files.generate_key(state_dir)
    res = await enroll(device_nc, token, public_key=public)
    dev, _ = save_enrollment(state_dir, res, public, nats_url)
    return dev


async def catalog_lists(device_nc: NATS, trust: TrustState, door: str) -> bool:
    try:
        checked = verify_for_device(
            await fetch_catalog(device_nc, trust.region), trust, now=int(time.time())
        )
    except DammError:
        return False
    return any(door in {d.id for d in g.front_doors} for g in checked.catalog.gateways)


async def two_doors(
    admin_nc: NATS, gateway_nc: NATS, *, byte_limit: int | None = None
) -> dict[str, str]:
    fleet = await setup_fleet(admin_nc, gateway_nc, byte_limit=byte_limit)
    await call(
        admin_nc,
        "admin.gateway.front_door",
        p.SetFrontDoor(gateway_id="gw1", front_door_id="fd2", endpoint=FD2, priority=20),
        p.Done,
    )
    return fleet


def snapshot(state_dir: Path) -> tuple[bytes, bytes]:
    return (state_dir / files.CONFIG).read_bytes(), (state_dir / files.STATE).read_bytes()


async def test_failover_is_recorded_under_the_devices_identity(
    control: ControlPlane,
    nats_server: NatsServer,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    dsn: str,
    tmp_path: Path,
) -> None:
    assert control.ctx is not None
    fleet = await two_doors(admin_nc, gateway_nc)
    dev = await enrolled_device(device_nc, fleet["token"], tmp_path, nats_server.url)
    assert dev.front_door_id == "fd1"
    await wait_for(lambda: catalog_lists(device_nc, device_trust(dev), "fd2"))

    res = await failover(device_nc, tmp_path)

    assert res.front_door_id == "fd2" and res.reported, res.report_error
    assert control.ctx.state.devices[dev.device_id].front_door_id == "fd2"
    history, _ = await control.ctx.store.load(f"damm.evt.device.{dev.device_id}")
    moved = [e for e in history if isinstance(e.event, m.DeviceFailedOver)]
    assert len(moved) == 1 and str(moved[0].actor) == f"device:{dev.device_id}"
    assert moved[0].event.from_front_door_id == "fd1"  # type: ignore[union-attr]
    await control.wait_projected()
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
    try:
        door = await conn.fetchval(
            "SELECT front_door_id FROM devices WHERE device_id=$1", dev.device_id
        )
    finally:
        await conn.close()
    assert door == "fd2"
    # The report no longer calls the door the device moved to unused.
    rep = await generate(dsn)
    doors = {(d.gateway_id, d.front_door_id): d for d in rep.front_doors}
    assert doors[("gw1", "fd2")].devices == 1 and doors[("gw1", "fd1")].devices == 0
    kinds = {(r.kind, r.subject) for r in rep.recommendations}
    assert ("front_door_unused", "gw1/fd2") not in kinds
    assert ("front_door_unused", "gw1/fd1") in kinds


@pytest.mark.parametrize("action", ["revoke", "suspend"])
async def test_failover_and_diagnose_refuse_a_device_the_control_plane_stopped(
    control: ControlPlane,
    nats_server: NatsServer,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    tmp_path: Path,
    action: str,
) -> None:
    fleet = await two_doors(admin_nc, gateway_nc)
    dev = await enrolled_device(device_nc, fleet["token"], tmp_path, nats_server.url)
    await wait_for(lambda: catalog_lists(device_nc, device_trust(dev), "fd2"))
    await call(admin_nc, f"admin.device.{action}", p.DeviceAction(device_id=dev.device_id), p.Done)
    before = snapshot(tmp_path)
    code = Code.DEVICE_REVOKED if action == "revoke" else Code.DEVICE_SUSPENDED

    await refused(control, code, failover(device_nc, tmp_path))
    assert snapshot(tmp_path) == before
    # The CLI says so in one line and a non-zero exit, and leaves the files alone too.
    done = await asyncio.to_thread(
        subprocess.run, [DAMM, "device", "failover", "--state-dir", str(tmp_path)],
        env={**os.environ, "DAMM_HOME": str(tmp_path / "nohome")}, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"error: {code.slug}: ") and done.stderr.count("\n") == 1
    assert snapshot(tmp_path) == before

    async def dial() -> NATS:
        return await connect(nats_server.url)

    report = await diagnose(tmp_path, connect=dial, probe_endpoint=False)
    checks = {c.name: c for c in report.checks}
    assert not report.ok
    assert checks["standing"].status == FAIL
    assert checks["standing"].reason.startswith(code.slug + ":")
    assert checks["catalog"].status == SKIP


async def test_over_quota_device_is_refused_and_resume_needs_a_reset(
    control: ControlPlane,
    nats_server: NatsServer,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    tmp_path: Path,
) -> None:
    assert control.ctx is not None
    state = control.ctx.state
    fleet = await two_doors(admin_nc, gateway_nc, byte_limit=1000)
    dev = await enrolled_device(device_nc, fleet["token"], tmp_path, nats_server.url)
    usage = p.ReportUsage(
        gateway_id="gw1",
        token=fleet["gw1_token"],
        report_id="r1",
        entries=(p.UsageEntry(dev.public_key, 5000, 0),),
    )
    await call(gateway_nc, "gateway.usage", usage, p.Done)
    await wait_for(lambda: state.devices[dev.device_id].status == "suspended")
    before = snapshot(tmp_path)
    await refused(control, Code.OVER_QUOTA, failover(device_nc, tmp_path))
    assert snapshot(tmp_path) == before

    resume = p.DeviceAction(device_id=dev.device_id)
    err = await refused(
        control, Code.OVER_QUOTA, call(admin_nc, "admin.device.resume", resume, p.Done)
    )
    assert "usage reset" in err.detail
    assert state.devices[dev.device_id].status == "suspended"
    # A higher limit lets it back in (the quota reactor may resume it first: either is fine).
    await call(
        admin_nc,
        "admin.tier.define",
        p.DefineTier(tier="gold", regions=("eu",), byte_limit=10_000),
        p.Done,
    )
    await call(admin_nc, "admin.device.resume", resume, p.Done)
    await wait_for(lambda: state.devices[dev.device_id].status == "active")


async def test_resume_after_usage_reset(
    control: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
) -> None:
    assert control.ctx is not None
    state = control.ctx.state
    fleet = await setup_fleet(admin_nc, gateway_nc, byte_limit=1000)
    res = await enroll(device_nc, fleet["token"])
    await call(admin_nc, "admin.device.suspend", p.DeviceAction(device_id=res.device_id), p.Done)
    usage = p.ReportUsage(
        gateway_id="gw1",
        token=fleet["gw1_token"],
        report_id="r1",
        entries=(p.UsageEntry(state.devices[res.device_id].public_key, 5000, 0),),
    )
    await call(gateway_nc, "gateway.usage", usage, p.Done)
    resume = p.DeviceAction(device_id=res.device_id)
    await refused(control, Code.OVER_QUOTA, call(admin_nc, "admin.device.resume", resume, p.Done))
    await call(admin_nc, "admin.usage.reset", p.ResetUsage(device_id=res.device_id), p.Done)
    await call(admin_nc, "admin.device.resume", resume, p.Done)
    assert state.devices[res.device_id].status == "active"


async def test_no_device_speaks_for_another(
    control: ControlPlane,
    nats_server: NatsServer,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    tmp_path: Path,
) -> None:
    assert control.ctx is not None
    fleet = await two_doors(admin_nc, gateway_nc)
    a = await enrolled_device(device_nc, fleet["token"], tmp_path / "a", nats_server.url)
    b = await enrolled_device(device_nc, fleet["token"], tmp_path / "b", nats_server.url)
    b_private = files.private_key(tmp_path / "b")
    now = int(time.time())

    def report(device: files.DeviceFile, public_key: str, **changes: object) -> p.ReportFailover:
        req = p.ReportFailover(
            device_id=device.device_id, public_key=public_key, at=now, gateway_id="gw1",
            from_front_door_id="fd1", front_door_id="fd2", catalog_version=1, request_id="x1",
        )  # fmt: skip
        return msgspec.structs.replace(req, **changes)

    def signed_by_b(req: p.ReportFailover) -> p.ReportFailover:
        return sign(req, "device.failover", b_private, b.rotation_key)

    attempts = [
        # b names a and its own key: the key is not a's
        signed_by_b(report(a, b.public_key)),
        # b names a and a's key, but can only prove with its own private key
        signed_by_b(report(a, a.public_key)),
        # b's own report, altered after signing
        msgspec.structs.replace(signed_by_b(report(b, b.public_key)), front_door_id="fd1"),
        # b's own report, signed for another command
        sign(report(b, b.public_key), "device.status", b_private, b.rotation_key),
        # b's own report, too old to be anything but a replay
        signed_by_b(report(b, b.public_key, at=now - 3600)),
    ]
    for req in attempts:
        await refused(control, Code.UNAUTHORIZED, call(device_nc, "device.failover", req, p.Done))
    status = p.DeviceCheckIn(device_id=a.device_id, public_key=a.public_key, at=now)
    await refused(
        control,
        Code.UNAUTHORIZED,
        call(device_nc, "device.status", sign(status, "device.status", b_private, b.rotation_key),
             p.DeviceStanding),
    )  # fmt: skip
    assert control.ctx.state.devices[a.device_id].front_door_id == "fd1"
    # b's own, properly signed report is taken
    await call(device_nc, "device.failover", signed_by_b(report(b, b.public_key)), p.Done)
    assert control.ctx.state.devices[b.device_id].front_door_id == "fd2"
    assert control.ctx.state.devices[a.device_id].front_door_id == "fd1"
    # and the device's check-in answers for itself
    standing = await check_in(device_nc, tmp_path / "a", a)
    assert (standing.status, standing.front_door_id) == ("active", "fd1")


async def test_diagnose_passes_standing_for_an_active_device(
    control: ControlPlane,
    nats_server: NatsServer,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    tmp_path: Path,
) -> None:
    fleet = await two_doors(admin_nc, gateway_nc)
    await enrolled_device(device_nc, fleet["token"], tmp_path, nats_server.url)

    async def dial() -> NATS:
        return await connect(nats_server.url)

    report = await diagnose(tmp_path, connect=dial, probe_endpoint=False)
    checks = {c.name: c for c in report.checks}
    assert checks["standing"].status == PASS, checks["standing"]
    assert checks["catalog"].status == PASS, checks["catalog"]


def test_pure_standing_and_quota_decisions() -> None:
    from damm.control.handlers.admin import over_quota
    from damm.control.handlers.devices import known_keys, standing_error
    from damm.control.state import DecisionState, DeviceState
    from damm.domain.ipam import Overlay

    def dev(status: str, reason: str = "") -> DeviceState:
        return DeviceState(
            device_id="d1", public_key="k", token_id="t", tier="gold", gateway_id="gw1",
            front_door_id="fd1", egress_pool_id=None, address="10.44.0.10", index=10,
            status=status, reason=reason,
        )  # fmt: skip

    assert standing_error(dev("active")) is None
    expected = {
        ("revoked", ""): Code.DEVICE_REVOKED,
        ("suspended", "admin"): Code.DEVICE_SUSPENDED,
        ("suspended", "over_quota"): Code.OVER_QUOTA,
        ("suspended", "key_expired"): Code.KEY_EXPIRED,
    }
    for (status, reason), code in expected.items():
        err = standing_error(dev(status, reason))
        assert err is not None and err.code is code
    assert known_keys(["new", "junk", "cur"], {"new"}, "cur") == ("cur", "new")

    state = DecisionState(Overlay.parse("10.44.0.0/24"))
    state.devices["d1"] = dev("suspended", "over_quota")
    state.tiers["gold"] = m.TierDefined(tier="gold", byte_limit=1000)
    over_quota(state, "d1", "2026-12")  # no usage: fine
    state.usage[("d1", "2026-12")] = 1000
    over_quota(state, "d1", "2026-12")  # exactly at the limit: fine
    state.usage[("d1", "2026-12")] = 1001
    with pytest.raises(DammError) as info:
        over_quota(state, "d1", "2026-12")
    assert info.value.code is Code.OVER_QUOTA
    state.usage[("d1", "2026-11")] = 5000
    state.usage.pop(("d1", "2026-12"))
    over_quota(state, "d1", "2026-12")  # last period's usage does not count
    state.tiers["gold"] = m.TierDefined(tier="gold", byte_limit=None)
    state.usage[("d1", "2026-12")] = 10**12
    over_quota(state, "d1", "2026-12")  # no limit, no quota
