"""Audit straight from the log: each filter against a known history, as-of folds, follow, CLI."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import pytest
from click.testing import CliRunner
from nats.aio.client import Client as NATS

from damm.cli.common import Target
from damm.cli.ops import audit
from damm.control.process import ControlPlane
from damm.events import model as m
from damm.events.store import envelope
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.reports.audit import (
    AuditFilter,
    AuditReader,
    collect,
    device_as_of,
    parse_when,
    row_of,
)
from damm.stack.nats_server import NatsServer
from tests.fleet import enroll, keypair, setup_fleet


@dataclass
class History:
    fleet: dict[str, str]
    a: str
    b: str
    before_suspend: datetime
    suspended: datetime
    after_resume: datetime


async def _admin(nc: NATS, who: str, command: str, req: msgspec.Struct) -> None:
    await call(nc, command, req, p.Done, actor=who)


@pytest.fixture
async def history(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> History:
    fleet = await setup_fleet(admin_nc, gateway_nc, byte_limit=10_000)
    _, pub_a = keypair()
    a = (await enroll(device_nc, fleet["token"], public_key=pub_a)).device_id
    b = (await enroll(device_nc, fleet["token"])).device_id
    await call(
        gateway_nc,
        "gateway.usage",
        p.ReportUsage(
            gateway_id="gw1",
            token=fleet["gw1_token"],
            report_id="rep-1",
            entries=(p.UsageEntry(pub_a, 100, 50),),
        ),
        p.Done,
    )
    await asyncio.sleep(0.05)
    before = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await _admin(
        admin_nc, "alice", "admin.device.suspend", p.DeviceAction(device_id=a, reason="abuse")
    )
    await asyncio.sleep(0.05)
    suspended = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await _admin(admin_nc, "bob", "admin.device.resume", p.DeviceAction(device_id=a))
    await _admin(admin_nc, "bob", "admin.device.revoke", p.DeviceAction(device_id=b, reason="lost"))
    await asyncio.sleep(0.05)
    return History(fleet, a, b, before, suspended, datetime.now(UTC))


def types(envs: list[m.Envelope]) -> list[str]:
    return [e.type for e in envs]


async def test_everything_and_order(control: ControlPlane, history: History) -> None:
    assert control.nc is not None
    envs = await collect(control.nc, AuditFilter())
    seqs = [e.seq for e in envs]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
    info = await control.nc.jetstream().stream_info("DAMM_EVENTS")
    assert len(envs) == info.state.messages


async def test_device_filter(control: ControlPlane, history: History) -> None:
    assert control.nc is not None
    envs = await collect(control.nc, AuditFilter(device=history.a))
    got = types(envs)
    assert got[0] in ("device.enrolled", "token.used", "ipam.allocated", "key.bound")
    for expected in (
        "device.enrolled",
        "token.used",
        "ipam.allocated",
        "usage.reported",
        "device.suspended",
        "device.resumed",
    ):
        assert expected in got, (expected, got)
    assert "device.revoked" not in got
    for env in envs:
        event = env.event
        assert getattr(event, "device_id", None) == history.a or (
            isinstance(event, m.UsageReported)
            and any(d.device_id == history.a for d in event.deltas)
        )


async def test_gateway_token_actor_type_filters(control: ControlPlane, history: History) -> None:
    assert control.nc is not None
    nc = control.nc
    gw = types(await collect(nc, AuditFilter(gateway="gw1")))
    assert gw.count("device.enrolled") == 2
    for expected in (
        "gateway.added",
        "gateway.front_door_set",
        "gateway.registered",
        "usage.reported",
    ):
        assert expected in gw
    assert "device.suspended" not in gw
    assert await collect(nc, AuditFilter(gateway="nope")) == []

    tok = await collect(nc, AuditFilter(token=history.fleet["token_id"]))
    assert sorted(types(tok)) == sorted(
        [
            "token.issued",
            "token.used",
            "token.used",
            "device.enrolled",
            "device.enrolled",
            "device.revoked",  # a revoke frees the device's session on its token
        ]
    )

    alice = await collect(nc, AuditFilter(actor="admin:alice"))
    assert [(e.type, e.actor) for e in alice] == [("device.suspended", m.Actor("admin", "alice"))]
    bob = await collect(nc, AuditFilter(actor="admin:bob"))
    assert "device.resumed" in types(bob) and "device.revoked" in types(bob)
    assert all(e.actor == m.Actor("admin", "bob") for e in bob)
    admins = await collect(nc, AuditFilter(actor="admin"))
    assert {"tier.defined", "gateway.added", "token.issued", "device.suspended"} <= set(
        types(admins)
    )
    gateway_actor = await collect(nc, AuditFilter(actor="gateway:gw1"))
    assert "usage.reported" in types(gateway_actor)

    suspended = await collect(nc, AuditFilter(types=("device.suspended",)))
    assert len(suspended) == 1 and suspended[0].actor == m.Actor("admin", "alice")
    device_events = types(await collect(nc, AuditFilter(types=("device",))))
    assert sorted(device_events) == sorted(
        [
            "device.enrolled",
            "device.enrolled",
            "device.suspended",
            "device.resumed",
            "device.revoked",
        ]
    )
    both = await collect(
        nc, AuditFilter(device=history.a, types=("device.resumed",), actor="admin:bob")
    )
    assert types(both) == ["device.resumed"]


async def test_time_filters(control: ControlPlane, history: History) -> None:
    assert control.nc is not None
    nc = control.nc
    after = await collect(nc, AuditFilter(since=history.before_suspend))
    assert types(after) == [
        "device.suspended",
        "device.resumed",
        "device.revoked",
        "ipam.released",
    ]
    window = await collect(nc, AuditFilter(since=history.before_suspend, until=history.suspended))
    assert types(window) == ["device.suspended"]
    before = await collect(nc, AuditFilter(until=history.before_suspend))
    assert "device.suspended" not in types(before) and "device.enrolled" in types(before)
    assert await collect(nc, AuditFilter(since=datetime.now(UTC))) == []
    now = datetime(2026, 1, 2, 3, 0, tzinfo=UTC)
    assert parse_when("1h", now) == datetime(2026, 1, 2, 2, 0, tzinfo=UTC)
    assert parse_when("2026-01-02T03:00:00") == now
    assert parse_when("2026-01-02T03:00:00Z") == now


async def test_device_as_of(control: ControlPlane, history: History) -> None:
    assert control.nc is not None
    nc = control.nc
    at = await device_as_of(nc, history.a, history.suspended)
    assert (at.status, at.reason, at.changed_by) == ("suspended", "abuse", "admin:alice")
    assert at.tier == "gold" and at.gateway_id == "gw1"
    assert sum(at.usage[next(iter(at.usage))]) == 150
    now = await device_as_of(nc, history.a, history.after_resume)
    assert (now.status, now.reason, now.changed_by) == ("active", "admin", "admin:bob")
    gone = await device_as_of(nc, history.b, history.after_resume)
    assert (gone.status, gone.reason, gone.changed_by) == ("revoked", "lost", "admin:bob")
    never = await device_as_of(nc, history.a, datetime(2000, 1, 1, tzinfo=UTC))
    assert not never.exists


async def test_follow_prints_new_events(
    control: ControlPlane, history: History, admin_nc: NATS
) -> None:
    assert control.nc is not None
    seen: list[m.Envelope] = []
    got_new = asyncio.Event()

    async def follow() -> None:
        async for env in AuditReader(control.nc).read(  # type: ignore[arg-type]
            AuditFilter(device=history.a), follow=True
        ):
            seen.append(env)
            if env.type == "device.suspended" and env.actor.id == "carol":
                got_new.set()

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.5)
    assert "device.resumed" in types(seen)  # history first
    await _admin(admin_nc, "carol", "admin.device.suspend", p.DeviceAction(device_id=history.a))
    await asyncio.wait_for(got_new.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cli(
    control: ControlPlane,
    history: History,
    nats_server: NatsServer,
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DAMM_ADMIN_PASSWORD", nats_server.passwords["admin"])
    runner = CliRunner()

    def invoke(*args: str) -> str:
        result = runner.invoke(
            audit, list(args), obj=Target(nats_server.url, dsn), catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        return result.output

    out = await asyncio.to_thread(invoke, "--device", history.a, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    suspended = [r for r in rows if r["type"] == "device.suspended"]
    assert suspended[0]["actor"] == "admin:alice" and "abuse" in suspended[0]["summary"]
    assert {"seq", "occurred_at", "aggregate", "correlation_id", "event"} <= set(rows[0])
    table = await asyncio.to_thread(invoke, "--actor", "admin:bob")
    assert "admin:bob" in table and "device.revoked" in table and "alice" not in table
    lines = table.splitlines()
    assert lines[0].split() == ["time", "seq", "type", "aggregate", "actor", "summary"]
    as_of = await asyncio.to_thread(
        invoke, "--device", history.a, "--as-of", history.suspended.isoformat()
    )
    assert "suspended" in as_of and "admin:alice" in as_of
    as_of_json = json.loads(
        await asyncio.to_thread(
            invoke, "--device", history.a, "--as-of", history.suspended.isoformat(), "--json"
        )
    )
    assert as_of_json["status"] == "suspended"
    bad = await asyncio.to_thread(
        runner.invoke, audit, ["--as-of", "1h"], obj=Target(nats_server.url, dsn)
    )
    assert bad.exit_code != 0 and "--device" in bad.output


def test_audit_rows_show_sizes_not_signed_catalogs_or_sealed_seeds() -> None:
    published = m.CatalogPublished(
        region="eu", version=3, key_id="k", digest="abc", signed=b"x" * 500
    )
    sealed = m.SigningKeyAnnounced(key_id="k", public_key="p", sealed_seed=b"s" * 72, kek_id="i")
    actor = m.Actor("system", "t")
    rows = [row_of(envelope("damm.evt.catalog.eu", e, actor=actor, correlation_id="c"))
            for e in (published, sealed)]  # fmt: skip
    assert rows[0].event["signed"] == "<500 bytes>" and rows[0].event["digest"] == "abc"
    assert rows[1].event["sealed_seed"] == "<72 bytes>"
