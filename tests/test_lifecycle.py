"""Device lifecycle and every enrollment failure the architecture lists, on the real stack.

Each failure must leave nothing half-written: the stream's last sequence does not move.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncpg
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS

from damm.clock import SkewedClock
from damm.control.process import ControlPlane
from damm.errors import Code, DammError
from damm.events import codec
from damm.events.model import Envelope
from damm.keys.rotation import prove
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.stack.nats_server import NatsServer
from damm.subjects import EVENTS_STREAM
from tests.fleet import enroll, heartbeat, keypair, setup_fleet
from tests.planes import plane_on, settings_for

DAMM = str(Path(sys.executable).parent / "damm")
T = TypeVar("T")
BACKGROUND_ACTORS = ("system", "policy")


async def _through_reloads(call: Callable[[], Awaitable[T]], wait_s: float = 10.0) -> T:
    """A JetStream API call, retried while nats-server answers "service unavailable": the
    fixtures reload its configuration whenever a gateway user is added (tests/conftest.py), and
    its JetStream API does not answer for that moment (as damm.reports.audit waits it out)."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        try:
            return await call()
        except nats.js.errors.ServiceUnavailableError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def last_seq(control: ControlPlane) -> int:
    assert control.nc is not None
    js = control.nc.jetstream()
    info = await _through_reloads(lambda: js.stream_info(EVENTS_STREAM))
    return int(info.state.last_seq)


async def appended_since(control: ControlPlane, seq: int) -> list[Envelope]:
    assert control.nc is not None
    js = control.nc.jetstream()
    out = []
    for n in range(seq + 1, await last_seq(control) + 1):
        raw = await _through_reloads(lambda n=n: js.get_msg(EVENTS_STREAM, n))  # type: ignore[misc]
        out.append(codec.decode(raw.data, seq=n))
    return out


async def refused(control: ControlPlane, code: Code, coro: object) -> DammError:
    before = await last_seq(control)
    with pytest.raises(DammError) as info:
        await coro  # type: ignore[misc]
    assert info.value.code is code, info.value.line()
    # The catalog publisher and the policy reactors may append meanwhile; the request may not.
    meanwhile = await appended_since(control, before)
    by_request = [e for e in meanwhile if e.actor.kind not in BACKGROUND_ACTORS]
    assert by_request == [], "a refused request appended events"
    return info.value


async def test_policy_failures(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(
        admin_nc,
        gateway_nc,
        regions=("eu", "us"),
        countries=("DE", "US"),
        gateways=(("gw-eu", "eu"),),
    )
    tok = fleet["token"]
    await refused(control, Code.OUT_OF_POLICY, enroll(device_nc, tok, region="ap"))
    await refused(control, Code.OUT_OF_POLICY, enroll(device_nc, tok, exit_country="FR"))
    await refused(control, Code.NO_HEALTHY_GATEWAY, enroll(device_nc, tok, region="us"))
    await refused(control, Code.NO_EGRESS, enroll(device_nc, tok, exit_country="DE"))
    await call(
        admin_nc,
        "admin.egress.define",
        p.DefineEgress(pool_id="eu-de", region="eu", countries=("DE",), ips=("198.51.100.0/28",)),
        p.Done,
    )
    placed = await enroll(device_nc, tok, exit_country="DE")
    assert placed.egress_pool_id == "eu-de"


async def test_stale_heartbeat_means_no_healthy_gateway(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    assert isinstance(control.clock, SkewedClock) and control.ctx is not None
    control.clock.advance(control.ctx.settings.heartbeat_ttl_s + 1)
    await refused(control, Code.NO_HEALTHY_GATEWAY, enroll(device_nc, fleet["token"]))
    await heartbeat(gateway_nc, "gw1", fleet["gw1_token"])
    await enroll(device_nc, fleet["token"])


async def test_session_limit_and_release(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc, session_limit=2)
    first = await enroll(device_nc, fleet["token"])
    await enroll(device_nc, fleet["token"])
    await refused(control, Code.SESSION_LIMIT, enroll(device_nc, fleet["token"]))
    await call(admin_nc, "admin.device.revoke", p.DeviceAction(device_id=first.device_id), p.Done)
    await enroll(device_nc, fleet["token"])


async def test_suspend_resume_and_revoked_actions(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    dev = await enroll(device_nc, fleet["token"])
    action = p.DeviceAction(device_id=dev.device_id, reason="abuse report")
    await call(admin_nc, "admin.device.suspend", action, p.Done)
    assert control.ctx.state.devices[dev.device_id].status == "suspended"  # type: ignore[union-attr]
    await call(admin_nc, "admin.device.resume", action, p.Done)
    await call(admin_nc, "admin.device.revoke", action, p.Done)
    with pytest.raises(DammError) as info:
        await call(admin_nc, "admin.device.resume", action, p.Done)
    assert info.value.code is Code.DEVICE_REVOKED
    with pytest.raises(DammError) as info:
        await call(admin_nc, "admin.device.suspend", p.DeviceAction(device_id="nope"), p.Done)
    assert info.value.code is Code.NOT_FOUND


async def test_pool_exhausted(
    nats_server: NatsServer,
    dsn: str,
    tmp_path: Path,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
) -> None:
    plane = plane_on(nats_server, dsn, settings_for(tmp_path, overlay="10.44.0.0/28"))
    await plane.start()
    try:
        fleet = await setup_fleet(admin_nc, gateway_nc)
        got = await asyncio.gather(*(enroll(device_nc, fleet["token"]) for _ in range(5)))
        assert sorted(g.address for g in got) == [f"10.44.0.{i}/28" for i in range(10, 15)]
        await refused(plane, Code.POOL_EXHAUSTED, enroll(device_nc, fleet["token"]))
    finally:
        await plane.stop()


async def test_key_rotation(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc, key_lifetime_s=3600)
    old_priv, old_pub = keypair()
    dev = await enroll(device_nc, fleet["token"], public_key=old_pub)
    assert dev.key_expires_at is not None
    _, new_pub = keypair()
    rid = uuid.uuid4().hex
    bad = prove(keypair()[0], dev.rotation_key, dev.device_id, new_pub, rid)
    with pytest.raises(DammError) as info:
        await call(
            device_nc,
            "device.rotate_key",
            p.RotateKey(
                device_id=dev.device_id,
                old_public_key=old_pub,
                new_public_key=new_pub,
                proof=bad,
                request_id=rid,
            ),
            p.KeyRotated,
        )
    assert info.value.code is Code.UNAUTHORIZED
    proof = prove(old_priv, dev.rotation_key, dev.device_id, new_pub, rid)
    req = p.RotateKey(
        device_id=dev.device_id,
        old_public_key=old_pub,
        new_public_key=new_pub,
        proof=proof,
        request_id=rid,
    )
    rotated = await call(device_nc, "device.rotate_key", req, p.KeyRotated)
    assert rotated.public_key == new_pub
    assert (await call(device_nc, "device.rotate_key", req, p.KeyRotated)).public_key == new_pub
    state = control.ctx.state  # type: ignore[union-attr]
    assert state.devices[dev.device_id].public_key == new_pub
    assert state.devices[dev.device_id].address == dev.address.split("/")[0]
    # the old key is retired for good: it cannot enroll again either
    with pytest.raises(DammError) as info:
        await enroll(device_nc, fleet["token"], public_key=old_pub)
    assert info.value.code is Code.KEY_REUSED


async def test_500_concurrent_enrollments(
    control: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    dsn: str,
    tmp_path: Path,
) -> None:
    from damm.domain.ipam import Overlay
    from damm.settings import ControlSettings

    # a second control-plane process shares the queue group: the decisions race for real
    assert control.nc is not None
    other = ControlPlane(
        control.nats_url,
        dsn,
        ControlSettings(
            overlay=Overlay.parse("10.44.0.0/16"),
            keys_dir=tmp_path / "k2",
            kek=control.settings.kek,
        ),
        password=control.password,
        run_projectors=False,
    )
    control.ctx.settings.__dict__["overlay"] = Overlay.parse("10.44.0.0/16")  # type: ignore[union-attr]
    keyring = control.ctx.state.keyring  # type: ignore[union-attr]
    control.ctx.state.__init__(Overlay.parse("10.44.0.0/16"))  # type: ignore[union-attr, misc]
    control.ctx.state.keyring = keyring  # type: ignore[union-attr]
    await control._follower.sync()  # type: ignore[union-attr]
    await other.start()
    try:
        fleet = await setup_fleet(admin_nc, gateway_nc, uses=500)
        results = await asyncio.gather(
            *(enroll(device_nc, fleet["token"]) for _ in range(500)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        got = [r for r in results if not isinstance(r, BaseException)]
        assert len({r.address for r in got}) == 500
        await refused(control, Code.TOKEN_USED_UP, enroll(device_nc, fleet["token"]))
        await control.wait_projected(30)
        conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
        uses = await conn.fetchval("SELECT uses FROM tokens WHERE token_id=$1", fleet["token_id"])
        devices = await conn.fetchval("SELECT count(*) FROM devices")
        addresses = await conn.fetchval("SELECT count(DISTINCT address) FROM addresses")
        await conn.close()
        assert (uses, devices, addresses) == (500, 500, 500)
        js = control.nc.jetstream()
        enrolled = await js.subscribe("damm.evt.device.>", ordered_consumer=True)
        seen = 0
        try:
            while True:
                await enrolled.next_msg(timeout=1)
                seen += 1
        except Exception:
            pass
        await enrolled.unsubscribe()
        assert seen == 500, "duplicate or missing device events"
    finally:
        await other.stop()


async def test_no_private_key_anywhere(
    control: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    nats_server: object,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Enroll through the real CLI, then scan the stream, logs and reply for the private key."""
    fleet = await setup_fleet(admin_nc, gateway_nc)
    state_dir = tmp_path / "dev"
    env = {
        **os.environ,
        "DAMM_NATS_URL": nats_server.url,  # type: ignore[attr-defined]
        "DAMM_LOG_LEVEL": "debug",
        "DAMM_HOME": str(tmp_path / "nohome"),
    }
    proc = await asyncio.create_subprocess_exec(
        DAMM,
        "--json",
        "device",
        "enroll",
        "--token",
        fleet["token"],
        "--state-dir",
        str(state_dir),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    private = (state_dir / "private.key").read_text().strip()
    assert oct((state_dir / "private.key").stat().st_mode & 0o777) == "0o600"
    assert oct((state_dir / "wg0.conf").stat().st_mode & 0o777) == "0o600"
    raw = base64.b64decode(private)
    needles = [private.encode(), raw.hex().encode(), raw]
    assert control.nc is not None
    sub = await control.nc.jetstream().subscribe(
        "damm.>", ordered_consumer=True, stream=EVENTS_STREAM
    )
    blobs = [out, err]
    try:
        while True:
            blobs.append((await sub.next_msg(timeout=1)).data)
    except Exception:
        pass
    await sub.unsubscribe()
    captured = capfd.readouterr()
    blobs += [
        captured.out.encode(),
        captured.err.encode(),
        (state_dir / "device.json").read_bytes(),
    ]
    for blob in blobs:
        for needle in needles:
            assert needle not in blob
    reply = json.loads(out)
    assert reply["address"] == "10.44.0.10/24"


@pytest.mark.skipif(shutil.which("wg-quick") is None, reason="wg-quick (wireguard-tools) missing")
async def test_cli_config_passes_wg_quick_strip(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, nats_server: object, tmp_path: Path
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    env = {
        **os.environ,
        "DAMM_NATS_URL": nats_server.url,  # type: ignore[attr-defined]
        "DAMM_HOME": str(tmp_path / "nohome"),
    }
    state_dir = tmp_path / "dev"
    # in a thread: the control plane answering it runs on this test's event loop
    done = await asyncio.to_thread(
        subprocess.run,
        [DAMM, "device", "enroll", "--token", fleet["token"], "--state-dir", str(state_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    stripped = await asyncio.to_thread(
        subprocess.run,
        ["wg-quick", "strip", str(state_dir / "wg0.conf")],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert "PublicKey = " + fleet["gw1_public_key"] in stripped.stdout
    assert "Endpoint = 192.0.2.1:51820" in stripped.stdout


def test_cli_errors_are_one_line(tmp_path: Path, nats_server: object) -> None:
    env = {
        **os.environ,
        "DAMM_NATS_URL": nats_server.url,  # type: ignore[attr-defined]
        "DAMM_HOME": str(tmp_path / "nohome"),
    }
    done = subprocess.run(
        [DAMM, "device", "enroll", "--token", "dmt_x", "--state-dir", str(tmp_path / "d")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith(
        "error: unavailable: the control plane is unavailable: nothing serves"
    )
    assert "Traceback" not in done.stderr


async def test_suspended_device_gets_its_own_answer(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    _, pub = keypair()
    dev = await enroll(device_nc, fleet["token"], public_key=pub)
    await call(admin_nc, "admin.device.suspend", p.DeviceAction(device_id=dev.device_id), p.Done)
    err = await refused(
        control, Code.DEVICE_SUSPENDED, enroll(device_nc, fleet["token"], public_key=pub)
    )
    assert dev.device_id in err.detail


async def test_admin_device_show(
    control: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    nats_server: object,
    tmp_path: Path,
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc, byte_limit=10_000)
    dev = await enroll(device_nc, fleet["token"])
    await control.wait_projected()
    env = {
        **os.environ,
        "DAMM_NATS_URL": nats_server.url,  # type: ignore[attr-defined]
        "DAMM_DATABASE_URL": control.database_url,
        "DAMM_HOME": str(tmp_path / "nohome"),
    }
    shown = await asyncio.to_thread(
        subprocess.run,
        [DAMM, "admin", "device", dev.device_id, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    row = json.loads(shown.stdout)
    assert (row["status"], row["address"], row["byte_limit"]) == ("active", "10.44.0.10", 10_000)
    assert row["endpoint"] == "192.0.2.1:51820" and row["usage"] == []
    missing = await asyncio.to_thread(
        subprocess.run,
        [DAMM, "admin", "device", "nope"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 1 and missing.stderr.startswith("error: not_found")


async def test_usage_under_a_rotated_away_key_still_counts(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    """The gateway's last counters for the old peer arrive after the rotation, under the old key."""
    fleet = await setup_fleet(admin_nc, gateway_nc)
    old_priv, old_pub = keypair()
    dev = await enroll(device_nc, fleet["token"], public_key=old_pub)
    _, new_pub = keypair()
    rid = uuid.uuid4().hex
    proof = prove(old_priv, dev.rotation_key, dev.device_id, new_pub, rid)
    await call(
        device_nc,
        "device.rotate_key",
        p.RotateKey(
            device_id=dev.device_id,
            old_public_key=old_pub,
            new_public_key=new_pub,
            proof=proof,
            request_id=rid,
        ),
        p.KeyRotated,
    )
    done = await call(
        gateway_nc,
        "gateway.usage",
        p.ReportUsage(
            gateway_id="gw1",
            token=fleet["gw1_token"],
            report_id="r-old-key",
            entries=(p.UsageEntry(old_pub, 100, 200), p.UsageEntry(new_pub, 1, 2)),
        ),
        p.Done,
    )
    assert done.seq > 0
    await control.wait_projected()
    conn = await asyncpg.connect(control.database_url, server_settings={"search_path": "damm"})
    row = await conn.fetchrow(
        "SELECT sum(rx_bytes) rx, sum(tx_bytes) tx FROM usage_totals WHERE device_id = $1",
        dev.device_id,
    )
    await conn.close()
    assert (row["rx"], row["tx"]) == (101, 202)


async def test_a_replayed_request_id_is_checked(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    _, pub = keypair()
    dev = await enroll(device_nc, fleet["token"], public_key=pub, request_id="same")
    await refused(control, Code.CONFLICT, enroll(device_nc, fleet["token"], request_id="same"))
    await call(admin_nc, "admin.device.revoke", p.DeviceAction(device_id=dev.device_id), p.Done)
    await refused(
        control,
        Code.DEVICE_REVOKED,
        enroll(device_nc, fleet["token"], public_key=pub, request_id="same"),
    )
