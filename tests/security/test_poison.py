"""A poisoned or undecodable message already in the log blocks nothing: the fold advances past
it, the projectors quarantine it and go on, and replay --verify says so with its own exit code."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
from nats.aio.client import Client as NATS

from damm.control.process import ControlPlane
from damm.errors import Code
from damm.events import model as m
from damm.events.store import Append, EventStore, envelope
from damm.projections import replay as rp
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.reports.render_text import render_text
from damm.reports.report import generate
from damm.stack.nats_server import NatsServer
from damm.subjects import address_subject, event_subject, usage_subject
from tests.fleet import enroll, keypair, setup_fleet
from tests.security.conftest import last_seq, wait_for


async def test_poisoned_aggregates_and_projector(
    control: ControlPlane,
    nc: NATS,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    nats_server: NatsServer,
    tmp_path: Path,
) -> None:
    assert control.leadership is not None
    await asyncio.wait_for(control.leadership.gained.wait(), 5)
    fleet = await setup_fleet(admin_nc, gateway_nc)
    _, pub = keypair()
    victim = await enroll(device_nc, fleet["token"], public_key=pub)
    js = nc.jetstream()
    poisoned = [
        event_subject("device", victim.device_id),
        event_subject("token", fleet["token_id"]),
        event_subject("catalog", "eu"),
        *(address_subject(i) for i in range(11, 16)),
    ]
    # What an answer written by the control plane's own credentials looked like in the log.
    for subject in poisoned:
        await js.publish(subject, b'{"ok":true,"result":{"signed":"aGVsbG8="}}')
    # A well-formed event whose number no bigint column can hold (accepted by an older edge).
    store = EventStore(nc)
    huge = m.UsageReported(
        gateway_id="gw1",
        report_id="huge",
        deltas=(m.UsageDelta(victim.device_id, 2**63, 0),),
    )
    subject = usage_subject("gw1")
    await store.append(
        Append(
            subject,
            envelope(subject, huge, actor=m.Actor("gateway", "gw1"), correlation_id="poison"),
        )
    )

    # Every aggregate still takes appends: suspend, revoke, enroll, rotate catalogs.
    await call(admin_nc, "admin.device.suspend", p.DeviceAction(device_id=victim.device_id), p.Done)
    await call(admin_nc, "admin.device.revoke", p.DeviceAction(device_id=victim.device_id), p.Done)
    later = [await enroll(device_nc, fleet["token"]) for _ in range(3)]
    version = control.ctx.state.catalog_versions.get("eu", 0) if control.ctx else 0
    await call(
        admin_nc,
        "admin.gateway.front_door",
        p.SetFrontDoor(gateway_id="gw1", front_door_id="fd2", endpoint="192.0.2.99:51820"),
        p.Done,
    )
    assert control.ctx is not None
    await wait_for(lambda: control.ctx.state.catalog_versions.get("eu", 0) > version, 10)  # type: ignore[union-attr]

    # The projector went past the garbage, set it aside, and projected what came after.
    head = await last_seq(nc)
    await wait_for(lambda: control.projectors[0].applied_seq >= head, 10)
    conn = await asyncpg.connect(control.database_url)
    try:
        rows = await conn.fetch("SELECT seq, subject, event_type, error FROM damm.quarantine")
        known = await conn.fetchval(
            "SELECT count(*) FROM damm.devices WHERE device_id = ANY($1::text[])",
            [d.device_id for d in later],
        )
    finally:
        await conn.close()
    assert {r["subject"] for r in rows} >= set(poisoned)
    assert any("int64" in r["error"] or "out of range" in r["error"] for r in rows), rows
    assert len(rows) == len(poisoned) + 1
    assert known == 3

    fleet_report = await generate(control.database_url)
    assert len(fleet_report.quarantined) == len(poisoned) + 1
    assert {r.kind for r in fleet_report.recommendations if r.severity == "critical"} >= {
        "events_quarantined"
    }
    assert "events_quarantined" in render_text(fleet_report)

    report = await rp.verify(nc, control.database_url)
    assert not report.ok and len(report.quarantined) == len(poisoned) + 1
    assert any(line.startswith("event_quarantined:") for line in rp.describe(report))
    env = {
        **os.environ,
        "DAMM_NATS_URL": nats_server.url,
        "DAMM_DATABASE_URL": control.database_url,
        "DAMM_ADMIN_PASSWORD": nats_server.passwords["admin"],
        "DAMM_HOME": str(tmp_path / "nohome"),
    }
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "damm.cli.main", "admin", "replay", "--verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == Code.EVENT_QUARANTINED.exit_status, done.stdout + done.stderr
    assert "event_quarantined" in done.stdout + done.stderr


async def test_fold_advances_past_undecodable_messages(
    control: ControlPlane, nc: NATS, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    """Across a restart too: a second process folds the same log and still decides."""
    fleet = await setup_fleet(admin_nc, gateway_nc)
    victim = await enroll(device_nc, fleet["token"])
    await nc.jetstream().publish(event_subject("device", victim.device_id), b"\xff garbage")
    assert control.ctx is not None
    await control.ctx.follower.sync()
    replica = ControlPlane(
        control.nats_url,
        control.database_url,
        control.settings,
        password=control.password,
        run_projectors=False,
    )
    await replica.start()
    try:
        assert replica.ctx is not None
        subject = event_subject("device", victim.device_id)
        assert replica.ctx.state.seq_of(subject) == control.ctx.state.seq_of(subject)
        assert replica.ctx.state.seq_of(subject) == await EventStore(nc).last_seq(subject)
    finally:
        await replica.stop()
    await call(admin_nc, "admin.device.revoke", p.DeviceAction(device_id=victim.device_id), p.Done)
