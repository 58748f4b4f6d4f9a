"""The operator report against a known history projected by the real control plane.

Also: a replay of the log into a fresh schema yields the same report, the CLI formats, and the
HTML renders in headless Chromium with its charts and no console errors.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import msgspec
import pytest
from click.testing import CliRunner
from nats.aio.client import Client as NATS

from damm.cli.common import Target
from damm.cli.ops import report as report_cmd
from damm.control.process import ControlPlane
from damm.projections.migrate import migrate
from damm.projections.runner import Projector
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.reports.render_html import render_html
from damm.reports.render_text import render_text
from damm.reports.report import Report, Rows, build, generate, to_json
from damm.stack.nats_server import NatsServer
from damm.subjects import EVENTS_STREAM, TELEMETRY_STREAM
from tests.fleet import enroll, heartbeat, keypair, setup_fleet
from tests.test_quota import attach_reactor

CHROMIUM = "/usr/bin/chromium"
LIMIT = 1000


@dataclass
class Fleet:
    devices: dict[str, str]  # d1..d5 -> device id
    placed: dict[str, str]  # device id -> gateway id
    now: datetime


async def _usage(gw_nc: NATS, gw: str, token: str, pub: str, n: int, rid: str) -> None:
    await call(
        gw_nc,
        "gateway.usage",
        p.ReportUsage(
            gateway_id=gw, token=token, report_id=rid, entries=(p.UsageEntry(pub, n, 0),)
        ),
        p.Done,
    )


async def _health_loads(dsn: str) -> dict[str, float]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
    try:
        return {r[0]: r[1] for r in await conn.fetch("SELECT gateway_id, load FROM gateway_health")}
    finally:
        await conn.close()


@pytest.fixture
async def fleet(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS, dsn: str
) -> Fleet:
    f = await setup_fleet(
        admin_nc,
        gateway_nc,
        regions=("eu", "us"),
        byte_limit=LIMIT,
        gateways=(("gw1", "eu"), ("gw2", "eu"), ("gw3", "us")),
    )
    # gw4 registers but never heartbeats: stale.
    added = await call(
        admin_nc,
        "admin.gateway.add",
        p.AddGateway(gateway_id="gw4", region="us", front_door="192.0.2.4:51820"),
        p.GatewayAdded,
    )
    await call(
        gateway_nc,
        "gateway.register",
        p.RegisterGateway(
            gateway_id="gw4", token=added.token, public_key=keypair()[1], listen_port=51820
        ),
        p.Registered,
    )
    await call(
        admin_nc,
        "admin.gateway.front_door",
        p.SetFrontDoor(
            gateway_id="gw1", front_door_id="fd2", endpoint="198.51.100.9:443", priority=20
        ),
        p.Done,
    )
    await call(
        admin_nc,
        "admin.egress.define",
        p.DefineEgress(
            pool_id="pool-a",
            region="eu",
            countries=("DE",),
            ips=("203.0.113.0/30",),
            devices_per_address=2,  # 2 addresses x 2: four devices fill it
        ),
        p.Done,
    )
    await call(
        admin_nc,
        "admin.egress.define",
        p.DefineEgress(
            pool_id="pool-b",
            region="us",
            countries=("US",),
            ips=("203.0.113.64/28",),
        ),
        p.Done,
    )
    devices: dict[str, str] = {}
    keys: dict[str, str] = {}
    placed: dict[str, str] = {}
    for name in ("d1", "d2", "d3", "d4", "d5"):
        _, pub = keypair()
        got = await enroll(device_nc, f["token"], public_key=pub, region="eu")
        devices[name], keys[name] = got.device_id, pub
        placed[got.device_id] = got.gateway_id
    for name, n in (("d1", 1200), ("d2", 850), ("d3", 100)):
        gw = placed[devices[name]]
        await _usage(gateway_nc, gw, f[f"{gw}_token"], keys[name], n, f"r-{name}")
    await call(admin_nc, "admin.device.revoke", p.DeviceAction(device_id=devices["d4"]), p.Done)
    await call(admin_nc, "admin.device.suspend", p.DeviceAction(device_id=devices["d5"]), p.Done)
    # Loads after placement (enrollment prefers the least loaded gateway).
    for gw, load in (("gw1", 0.9), ("gw2", 0.85), ("gw3", 0.1)):
        await heartbeat(gateway_nc, gw, f[f"{gw}_token"], load=load)
    # The quota policy acts on d1 whether or not the control plane runs the reactor itself.
    reactor, owned = attach_reactor(control, dsn)
    try:
        for _ in range(200):
            await control.wait_projected()
            conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
            status = await conn.fetchval(
                "SELECT status FROM devices WHERE device_id=$1", devices["d1"]
            )
            await conn.close()
            if status == "suspended":
                break
            await asyncio.sleep(0.05)
    finally:
        if owned:
            await reactor.stop()
    await control.wait_projected()
    for _ in range(200):
        if await _health_loads(dsn) == {"gw1": 0.9, "gw2": 0.85, "gw3": 0.1}:
            break
        await asyncio.sleep(0.05)
    return Fleet(devices, placed, datetime.now(UTC))


async def test_report_content(control: ControlPlane, fleet: Fleet, dsn: str) -> None:
    rep = await generate(dsn, ttl_s=90, now=fleet.now)
    d = fleet.devices
    t = rep.totals
    assert (t.gateways, t.gateways_healthy, t.front_doors, t.egress_pools) == (4, 3, 5, 2)
    assert t.devices == 5
    assert t.devices_by_status == {"active": 2, "revoked": 1, "suspended": 2}
    assert (t.over_quota, t.near_quota, t.used_bytes) == (1, 1, 2150)

    regions = {r.region: r for r in rep.regions}
    eu, us = regions["eu"], regions["us"]
    assert (eu.gateways, eu.healthy, eu.stale, eu.load, eu.near_capacity) == (2, 2, 0, 0.875, True)
    assert (us.gateways, us.healthy, us.stale, us.load, us.near_capacity) == (2, 1, 1, 0.1, False)
    assert eu.devices_active == 2 and us.devices_active == 0

    gws = {g.gateway_id: g for g in rep.gateways}
    assert gws["gw4"].status == "stale" and gws["gw4"].heartbeat_age_s is None
    assert {g: gws[g].status for g in ("gw1", "gw2", "gw3")} == dict.fromkeys(
        ("gw1", "gw2", "gw3"), "healthy"
    )
    assert sum(g.devices_total for g in rep.gateways) == 5

    tiers = {tr.tier: tr for tr in rep.tiers}
    assert tiers["gold"].devices == {"active": 2, "revoked": 1, "suspended": 2}
    assert tiers["gold"].byte_limit == LIMIT

    assert [(u.device_id, u.used) for u in rep.top_usage] == [
        (d["d1"], 1200),
        (d["d2"], 850),
        (d["d3"], 100),
    ]
    assert [(u.device_id, u.status) for u in rep.over_quota] == [(d["d1"], "suspended")]
    assert [(u.device_id, u.share) for u in rep.near_quota] == [(d["d2"], 0.85)]

    pools = {pl.pool_id: pl for pl in rep.egress_pools}
    assert pools["pool-a"].low_headroom and not pools["pool-b"].low_headroom
    assert pools["pool-a"].ips == ["203.0.113.0/30"]
    # Measured, not typed: four devices hold an address (d4 was revoked) of a capacity of four,
    # and the pool carried the bytes its devices used this period.
    a = pools["pool-a"]
    assert (a.devices_assigned, a.addresses, a.load, a.headroom) == (4, 2, 1.0, 0.0)
    assert a.traffic_bytes == 1200 + 850 + 100
    assert (pools["pool-b"].devices_assigned, pools["pool-b"].load) == (0, 0.0)

    # Attached means not revoked (d4 is); seen means the gateway reported its traffic (d5 none).
    used_doors = {(fleet.placed[d[n]], "fd1") for n in ("d1", "d2", "d3", "d5")}
    seen_doors = {(fleet.placed[d[n]], "fd1") for n in ("d1", "d2", "d3")}
    expected_silent = {("front_door_silent", f"{gw}/{fd}") for gw, fd in used_doors - seen_doors}
    recs = {(r.kind, r.subject) for r in rep.recommendations}
    expected_unused = {
        ("front_door_unused", f"{gw}/{fd}")
        for gw, fd in {
            ("gw1", "fd1"),
            ("gw1", "fd2"),
            ("gw2", "fd1"),
            ("gw3", "fd1"),
            ("gw4", "fd1"),
        }
        - used_doors
    }
    assert (
        recs
        == {
            ("region_near_capacity", "eu"),
            ("gateway_stale", "gw4"),
            ("pool_low_headroom", "pool-a"),
            ("devices_over_quota", rep.period),
        }
        | expected_unused
        | expected_silent
    )
    assert rep.recommendations[0].severity == "warning"  # nothing critical here
    text = render_text(rep)
    for needle in ("Recommendations", "gw4", "stale", "pool-a", d["d1"], "Near quota"):
        assert needle in text


def test_pure_build_region_without_capacity() -> None:
    now = datetime(2026, 11, 25, tzinfo=UTC)
    rows = Rows(
        period="2026-11",
        gateways=[
            {
                "gateway_id": "g",
                "region": "ap",
                "active": True,
                "registered": True,
                "last_heartbeat": datetime(2026, 11, 24, tzinfo=UTC),
                "load": 0.2,
                "peer_count": 3,
                "active_peers": 1,
            },
            {
                "gateway_id": "h",
                "region": "ap",
                "active": False,
                "registered": True,
                "last_heartbeat": now,
                "load": 0.2,
                "peer_count": 0,
                "active_peers": 0,
            },
        ],
    )
    rep = build(rows, now, 90)
    assert [g.status for g in rep.gateways] == ["stale", "disabled"]
    assert rep.recommendations[0].severity == "critical"
    assert rep.recommendations[0].kind == "region_without_capacity"
    assert rep.regions[0].load == 1.0 and rep.regions[0].near_capacity


def test_pure_front_door_advice_uses_attachment_and_traffic() -> None:
    now = datetime(2026, 11, 25, tzinfo=UTC)

    def door(fd: str, devices: int, seen: int, active: bool = True) -> dict[str, object]:
        return {
            "gateway_id": "g", "front_door_id": fd, "endpoint": f"192.0.2.1:{fd[-1]}",
            "transport": "udp", "priority": 10, "active": active, "devices": devices,
            "devices_seen": seen,
        }  # fmt: skip

    doors = [door("fd1", 0, 0), door("fd2", 3, 0), door("fd3", 3, 1), door("fd4", 0, 0, False)]

    def recs(live_handshakes: int) -> set[tuple[str, str]]:
        gateway = {
            "gateway_id": "g", "region": "eu", "active": True, "registered": True,
            "last_heartbeat": now, "load": 0.1, "peer_count": 6, "active_peers": live_handshakes,
        }  # fmt: skip
        rows = Rows(
            period="2026-11",
            gateways=[gateway],
            gateway_devices=[{"gateway_id": "g", "status": "active", "n": 6}],
            front_doors=doors,
        )
        return {(r.kind, r.subject) for r in build(rows, now, 90).recommendations}

    # Two of six devices without a live handshake: the door whose devices sent nothing is flagged.
    assert recs(4) == {("front_door_unused", "g/fd1"), ("front_door_silent", "g/fd2")}
    # Every device has a live handshake: idle devices do not make a door suspect.
    assert recs(6) == {("front_door_unused", "g/fd1")}


async def test_replayed_history_yields_the_same_report(
    control: ControlPlane, fleet: Fleet, dsn: str
) -> None:
    assert control.nc is not None
    conn = await asyncpg.connect(dsn)
    await migrate(conn, "replay")
    await conn.close()
    stop = asyncio.Event()
    projectors = [
        Projector("replay-readmodels", EVENTS_STREAM, dsn, "replay"),
        Projector("replay-telemetry", TELEMETRY_STREAM, dsn, "replay"),
    ]
    tasks = [asyncio.create_task(pr.run(control.nc, stop)) for pr in projectors]
    try:
        last = (await control.nc.jetstream().stream_info(EVENTS_STREAM)).state.last_seq
        for _ in range(400):
            if projectors[0].applied_seq >= last and projectors[1].caught_up.is_set():
                break
            await asyncio.sleep(0.025)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    live = await generate(dsn, ttl_s=90, now=fleet.now)
    replayed = await generate(dsn, ttl_s=90, now=fleet.now, schema="replay")
    assert msgspec.to_builtins(replayed) == msgspec.to_builtins(live)


async def test_cli_formats(
    control: ControlPlane, fleet: Fleet, nats_server: NatsServer, dsn: str, tmp_path: Path
) -> None:
    runner = CliRunner()

    def invoke(*args: str) -> str:
        result = runner.invoke(
            report_cmd, list(args), obj=Target(nats_server.url, dsn), catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        return result.output

    data = json.loads(await asyncio.to_thread(invoke, "--format", "json"))
    assert data["totals"]["devices"] == 5 and data["recommendations"]
    assert "Regions" in await asyncio.to_thread(invoke)
    out = tmp_path / "report.html"
    await asyncio.to_thread(invoke, "--format", "html", "--out", str(out))
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html and "<script" not in html


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium not installed at /usr/bin")
async def test_html_renders_in_chromium(
    control: ControlPlane, fleet: Fleet, dsn: str, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    rep: Report = await generate(dsn, ttl_s=90, now=fleet.now)
    page_path = tmp_path / "report.html"
    page_path.write_text(render_html(rep), encoding="utf-8")
    errors: list[str] = []
    requests: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda req: requests.append(req.url))
            await page.goto(page_path.as_uri())
            assert await page.locator("figure.chart").count() >= 5
            assert await page.locator("figure.chart svg rect.bar").count() >= 10
            box = await page.locator("#regions-chart figure.chart").bounding_box()
            assert box is not None and box["width"] > 300 and box["height"] > 30
            assert await page.locator("#recommendations .rec").count() == len(rep.recommendations)
            shot = os.environ.get("DAMM_REPORT_SCREENSHOT")
            if shot:
                await page.screenshot(path=shot, full_page=True)
        finally:
            await browser.close()
    assert errors == []
    assert all(url.startswith("file://") for url in requests), requests
    assert to_json(rep)


def test_tokens_at_their_session_limit_are_reported() -> None:
    now = datetime(2026, 11, 25, tzinfo=UTC)
    rows = Rows(
        period="2026-11",
        sessions_at_limit=[
            {"token_id": "t1", "tier": "gold", "active_sessions": 3, "session_limit": 3}
        ],
    )
    rep = build(rows, now, 90)
    assert [(s.token_id, s.active_sessions) for s in rep.tokens_at_session_limit] == [("t1", 3)]
    [rec] = [r for r in rep.recommendations if r.kind == "token_at_session_limit"]
    assert rec.subject == "t1" and "refused" in rec.message


def test_text_tables_list_every_row_in_aligned_columns() -> None:
    now = datetime.now(UTC)
    rows = Rows(period="2026-12")
    for n in range(300):
        rows.gateways.append(
            {
                "gateway_id": f"gw-{n:03d}" + "x" * (n % 7),
                "region": f"r{n % 5}",
                "active": True,
                "registered": True,
                "last_heartbeat": now - timedelta(seconds=5 if n % 3 else 500),
                "peer_count": n * 37,
                "active_peers": n,
                "load": (n % 100) / 100,
            }
        )
    rep = build(rows, now, 30.0)
    text = render_text(rep)
    lines = text.splitlines()
    start = lines.index("Gateways")
    header, rule = lines[start + 1], lines[start + 2]
    rows = lines[start + 3 : start + 3 + len(rep.gateways)]
    assert [r.split()[0] for r in rows] == [g.gateway_id for g in rep.gateways]
    # every column starts where its header does
    starts = [i for i, ch in enumerate(rule) if ch == "-" and (i == 0 or rule[i - 1] == " ")]
    assert [header[i - 1 : i] in ("", " ") for i in starts] == [True] * len(starts)
    for row in rows:
        assert all(row[i - 1] == " " for i in starts[1:])


async def test_devices_json_streams_the_same_bytes_as_a_whole_list(
    fleet: Fleet, nats_server: NatsServer, dsn: str
) -> None:
    from damm.cli.admin import _LISTS, admin, stream_json

    sql = _LISTS["devices"][0]
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
    try:
        whole = msgspec.json.encode([dict(r) for r in await conn.fetch(sql)], enc_hook=str)
    finally:
        await conn.close()
    out = io.BytesIO()
    import damm.cli.admin as admin_cli

    saved = admin_cli.STREAM_PREFETCH
    admin_cli.STREAM_PREFETCH = 2  # several cursor fetches even for this small fleet
    try:
        count = await stream_json(Target(nats_server.url, dsn), sql, out)
    finally:
        admin_cli.STREAM_PREFETCH = saved
    assert count == 5 and out.getvalue() == whole + b"\n"
    result = await asyncio.to_thread(
        CliRunner().invoke, admin, ["devices", "--json"], obj=Target(nats_server.url, dsn)
    )
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == whole + b"\n"
