"""Egress in the control plane: assignment at enrollment, the fold, the peer set, pool load."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import UTC, datetime

import msgspec
import pytest
from click.testing import CliRunner
from nats.aio.client import Client as NATS

from damm.cli.admin import admin
from damm.cli.common import Target
from damm.control.follower import StateFollower
from damm.control.process import ControlPlane
from damm.control.state import DecisionState
from damm.domain.ipam import Overlay
from damm.errors import Code, DammError
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.reports.report import generate
from damm.stack.nats_server import NatsServer
from damm.subjects import peers_subject
from tests.fleet import enroll, keypair, setup_fleet
from tests.test_peersets import snapshot, wait_for


async def define(admin: NATS, pool_id: str, *ips: str, **kw: object) -> p.Done:
    done: p.Done = await call(
        admin,
        "admin.egress.define",
        p.DefineEgress(pool_id=pool_id, region="eu", countries=("DE",), ips=ips, **kw),  # type: ignore[arg-type]
        p.Done,
    )
    return done


def egress_of(control: ControlPlane, device_id: str) -> str | None:
    return control.ctx.state.devices[device_id].egress_address  # type: ignore[union-attr]


async def test_addresses_fill_evenly_and_reach_the_peer_set(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS, nc: NATS
) -> None:
    assert control.leadership is not None
    await asyncio.wait_for(control.leadership.gained.wait(), 5)
    fleet = await setup_fleet(admin_nc, gateway_nc, countries=("DE",))
    await define(admin_nc, "eu-de", "198.51.100.0/30")  # hosts .1 and .2
    changes: list[p.PeerSetChange] = []

    async def on_change(msg: object) -> None:
        changes.append(msgspec.json.decode(msg.data, type=p.PeerSetChange))  # type: ignore[attr-defined]

    await gateway_nc.subscribe(peers_subject("gw1"), cb=on_change)
    await gateway_nc.flush()
    # Concurrent enrollments land in one group commit: the group counts its own assignments.
    devs = await asyncio.gather(
        *(enroll(device_nc, fleet["token"], exit_country="DE") for _ in range(4))
    )
    used = Counter(egress_of(control, d.device_id) for d in devs)
    assert used == {"198.51.100.1": 2, "198.51.100.2": 2}

    snap = await snapshot(gateway_nc, "gw1", fleet["gw1_token"])
    by_ip = {e.allowed_ips[0]: e.egress for e in snap.peers}
    assert by_ip == {d.address.replace("/24", "/32"): egress_of(control, d.device_id) for d in devs}
    await wait_for(lambda: len(changes) == 4)
    assert {u.egress for ch in changes for u in ch.upserts} == set(used)

    # Revoking frees the address: the next device takes the least used one.
    await call(admin_nc, "admin.device.revoke", p.DeviceAction(device_id=devs[0].device_id), p.Done)
    freed = egress_of(control, devs[0].device_id)
    later = await enroll(device_nc, fleet["token"], exit_country="DE")
    assert egress_of(control, later.device_id) == freed

    # Another replica folding the same log derives the same assignments and counts.
    replica = DecisionState(Overlay.parse("10.44.0.0/24"))
    follower = StateFollower(nc, replica)
    await follower.start()
    try:
        await follower.sync()
        state = control.ctx.state  # type: ignore[union-attr]
        assert {k: d.egress_address for k, d in replica.devices.items()} == {
            k: d.egress_address for k, d in state.devices.items()
        }
        assert replica.egress_in_use == state.egress_in_use
        assert replica.pool_assigned == state.pool_assigned
    finally:
        await follower.stop()


async def test_a_pool_cannot_drop_an_address_devices_leave_from(
    control: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    nats_server: NatsServer,
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc, countries=("DE",))
    await define(admin_nc, "eu-de", "198.51.100.1", "198.51.100.2")
    dev = await enroll(device_nc, fleet["token"], exit_country="DE")
    assert egress_of(control, dev.device_id) == "198.51.100.1"
    # The operator sees it too: the read model records the address.
    await control.wait_projected()
    monkeypatch.setenv("DAMM_ADMIN_PASSWORD", nats_server.passwords["admin"])
    shown = await asyncio.to_thread(
        CliRunner().invoke,
        admin,
        ["device", dev.device_id, "--json"],
        obj=Target(nats_server.url, dsn),
        catch_exceptions=False,
    )
    assert shown.exit_code == 0, shown.output
    row = json.loads(shown.output)
    assert (row["egress_pool_id"], row["egress_address"]) == ("eu-de", "198.51.100.1")
    with pytest.raises(DammError) as info:
        await define(admin_nc, "eu-de", "198.51.100.2", "198.51.100.3")
    assert info.value.code is Code.EGRESS_IN_USE and "198.51.100.1 (1 devices)" in info.value.detail
    await define(admin_nc, "eu-de", "198.51.100.1", "198.51.100.3")  # keeping it is fine
    with pytest.raises(DammError) as huge:
        await define(admin_nc, "eu-de", "10.0.0.0/8")
    assert huge.value.code is Code.INVALID_ARGUMENT
    await call(admin_nc, "admin.device.revoke", p.DeviceAction(device_id=dev.device_id), p.Done)
    await define(admin_nc, "eu-de", "198.51.100.3")  # nobody uses .1 any more


async def test_pool_load_comes_from_assignments_not_typed_numbers(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc, countries=("DE",))
    # Typed figures say "small is idle, big is full"; the log says both are empty.
    await define(admin_nc, "a-small", "198.51.100.1", load=0.0, headroom=1.0)
    await define(admin_nc, "b-big", "203.0.113.0/28", load=0.9, headroom=0.1)
    pools = []
    for _ in range(3):
        dev = await enroll(device_nc, fleet["token"], exit_country="DE")
        pools.append(dev.egress_pool_id)
    # Tie, then a-small carries 1 of 128, then b-big carries 1 of 14 x 128: b-big again.
    assert pools == ["a-small", "b-big", "b-big"]
    state = control.ctx.state  # type: ignore[union-attr]
    now = datetime.now(UTC)
    assert state.pool_load("a-small", now) == pytest.approx(1 / 128)
    assert state.pool_load("b-big", now) == pytest.approx(2 / (14 * 128))


async def test_traffic_against_a_declared_allowance_feeds_placement_and_the_report(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS, dsn: str
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc, countries=("DE",))
    await define(admin_nc, "a-metered", "198.51.100.1", transfer_per_address=1000)
    await define(admin_nc, "b-plain", "198.51.100.2")
    keys = [keypair() for _ in range(3)]
    first = await enroll(device_nc, fleet["token"], public_key=keys[0][1], exit_country="DE")
    second = await enroll(device_nc, fleet["token"], public_key=keys[1][1], exit_country="DE")
    assert (first.egress_pool_id, second.egress_pool_id) == ("a-metered", "b-plain")
    await call(
        gateway_nc,
        "gateway.usage",
        p.ReportUsage(
            gateway_id="gw1",
            token=fleet["gw1_token"],
            report_id="r1",
            entries=(p.UsageEntry(keys[0][1], 600, 300),),
        ),
        p.Done,
    )
    state = control.ctx.state  # type: ignore[union-attr]
    await wait_for(lambda: state.pool_load("a-metered", datetime.now(UTC)) == pytest.approx(0.9))
    # One device each; a-metered would win the tie on its id, but 900 of 1000 bytes are gone.
    third = await enroll(device_nc, fleet["token"], public_key=keys[2][1], exit_country="DE")
    assert third.egress_pool_id == "b-plain"
    res = await call(
        admin_nc,
        "admin.explain_placement",
        p.ExplainPlacement(tier="gold", exit_country="DE"),
        p.PlacementExplained,
    )
    assert res.candidates[0].egress_pool_id == "b-plain"
    await control.wait_projected()
    rep = await generate(dsn)
    pools = {row.pool_id: row for row in rep.egress_pools}
    metered = pools["a-metered"]
    assert (metered.traffic_bytes, metered.transfer_per_address) == (900, 1000)
    assert metered.load == pytest.approx(0.9) and metered.headroom == pytest.approx(0.1)
    assert metered.low_headroom and pools["b-plain"].devices_assigned == 2
    advice = [r.message for r in rep.recommendations if r.subject == "a-metered"]
    assert len(advice) == 1 and "900 B of 1000 B" in advice[0]
