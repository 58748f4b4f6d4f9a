"""Usage metering and the operator report, at fleet scale.

1. Ingestion: 10,000 devices on 50 gateways; every gateway reports the deltas of all its devices
   each round. The reports are appended to the event log as the usage handler does (pipelined,
   one ``UsageReported`` per gateway report, Msg-Id per report) and then projected into
   ``usage_totals`` by the real ``Projector``. Target: >= 20,000 usage deltas/s ingested.
2. Report: 100,000 devices (plus tiers, gateways, health, front doors, pools, usage) copied
   straight into the read-model tables; then ``generate()`` (gather + build) and the three
   renderings are timed. Target: report <= 2 s.

    .venv/bin/python bench/bench_usage.py [--devices 10000] [--gateways 50] [--rounds 20]
                                          [--report-devices 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS

from damm import log
from damm.events import model as m
from damm.events.store import Append, EventStore, envelope
from damm.events.streams import ensure_streams
from damm.projections.migrate import migrate
from damm.projections.runner import Projector
from damm.protocol.bus import connect
from damm.reports.render_html import render_html
from damm.reports.render_text import render_text
from damm.reports.report import generate, period_at, to_json
from damm.subjects import EVENTS_STREAM, usage_subject

DELTAS_TARGET = 20_000.0
REPORT_TARGET_S = 2.0


def usage_reports(devices: int, gateways: int, rounds: int, seed: int = 7) -> list[Append]:
    rng = random.Random(seed)
    per_gw: dict[str, list[str]] = {}
    for n in range(devices):
        per_gw.setdefault(f"gw-{n % gateways:03d}", []).append(f"dev-{n:06d}")
    t0 = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    items: list[Append] = []
    for r in range(rounds):
        at = t0 + timedelta(minutes=r)
        for gw, devs in per_gw.items():
            subject = usage_subject(gw)
            event = m.UsageReported(
                gateway_id=gw,
                report_id=f"{gw}-{r}",
                measured_at=at,
                deltas=tuple(
                    m.UsageDelta(d, rng.randrange(10**6), rng.randrange(10**5)) for d in devs
                ),
            )
            env = envelope(
                subject, event, actor=m.Actor("gateway", gw), correlation_id=f"{gw}-{r}", now=at
            )
            items.append(Append(subject, env, msg_id=f"usage-{gw}-{r}"))
    return items


async def ingest(nc: NATS, dsn: str, items: list[Append]) -> tuple[float, float, int]:
    store = EventStore(nc, timeout=60)
    start = time.perf_counter()
    for i in range(0, len(items), 1000):
        await store.append_many(items[i : i + 1000], window=200)
    appended = time.perf_counter() - start
    last = await store.stream_last_seq()
    projector = Projector("readmodels", EVENTS_STREAM, dsn, batch_size=200)
    stop = asyncio.Event()
    start = time.perf_counter()
    task = asyncio.create_task(projector.run(nc, stop))
    while projector.applied_seq < last:
        await asyncio.sleep(0.005)
        if task.done():
            task.result()
    projected = time.perf_counter() - start
    stop.set()
    await task
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
    rows = int(await conn.fetchval("SELECT count(*) FROM usage_totals"))
    await conn.close()
    return appended, projected, rows


async def fill(dsn: str, devices: int, now: datetime, seed: int = 11) -> None:
    """100k-device fleet straight into the read models (COPY)."""
    rng = random.Random(seed)
    regions = ["eu", "us", "ap", "sa", "af"]
    gateways = [(f"gw-{n:03d}", regions[n % len(regions)]) for n in range(50)]
    tiers = [("free", 5 * 10**9), ("gold", 50 * 10**9), ("team", None)]
    pools = [(f"pool-{n}", regions[n % len(regions)]) for n in range(10)]
    period = period_at(now)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
    try:
        await conn.copy_records_to_table(
            "tiers",
            records=[
                (t, ["eu", "us"], [], 5, limit, None, "active", "admin:bench", now)
                for t, limit in tiers
            ],
            columns=[
                "tier",
                "regions",
                "exit_countries",
                "session_limit",
                "byte_limit",
                "key_lifetime_s",
                "status",
                "defined_by",
                "updated_at",
            ],
        )
        await conn.copy_records_to_table(
            "gateways",
            records=[
                (g, r, "h" + g, "k" + g, 51820, "bench", now, True, None, now) for g, r in gateways
            ],
            columns=[
                "gateway_id",
                "region",
                "token_hash",
                "public_key",
                "listen_port",
                "agent_version",
                "registered_at",
                "active",
                "status_reason",
                "added_at",
            ],
        )
        await conn.copy_records_to_table(
            "gateway_health",
            records=[
                (
                    g,
                    now - timedelta(seconds=300 if n % 17 == 0 else 5),
                    2000,
                    1500,
                    10**12,
                    10**11,
                    rng.random(),
                    n,
                )
                for n, (g, _) in enumerate(gateways)
            ],
        )
        await conn.copy_records_to_table(
            "front_doors",
            records=[
                (g, fd, f"192.0.2.{n % 250}:{51820 + k}", "udp", 10 * (k + 1), True)
                for n, (g, _) in enumerate(gateways)
                for k, fd in enumerate(("fd1", "fd2"))
            ],
        )
        await conn.copy_records_to_table(
            "egress_pools",
            records=[
                (
                    p,
                    "static",
                    r,
                    ["DE"],
                    [f"198.51.100.{n * 16}/28"],
                    rng.random(),
                    rng.random(),
                    True,
                )
                for n, (p, r) in enumerate(pools)
            ],
        )
        statuses = ["active"] * 90 + ["suspended"] * 7 + ["revoked"] * 3
        device_rows: list[tuple[Any, ...]] = []
        usage_rows: list[tuple[Any, ...]] = []
        for n in range(devices):
            g, region = gateways[n % len(gateways)]
            tier = tiers[n % len(tiers)][0]
            device_id = f"dev-{n:06d}"
            device_rows.append(
                (
                    device_id,
                    f"{n:043d}=",
                    f"tok-{n % 100}",
                    tier,
                    g,
                    "fd1",
                    pools[n % 10][0],
                    f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}",
                    None,
                    region,
                    "DE",
                    rng.choice(statuses),
                    None,
                    None,
                    now,
                    now,
                )
            )
            usage_rows.append((device_id, period, rng.randrange(6 * 10**9), rng.randrange(10**9)))
        await conn.copy_records_to_table("devices", records=device_rows)
        await conn.copy_records_to_table("usage_totals", records=usage_rows)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def main(devices: int, gateways: int, rounds: int, report_devices: int) -> None:
    from damm.stack.nats_server import NatsServer
    from damm.stack.postgres import Postgres

    root = Path(tempfile.mkdtemp(prefix="damm-bench-usage-", dir="/tmp"))
    nats_server, pg = NatsServer(root / "nats"), Postgres(root / "pgdata", delete_on_stop=True)
    try:
        nats_server.start()
        uri = pg.start()
        admin = await asyncpg.connect(uri)
        await admin.execute("CREATE DATABASE ingest")
        await admin.execute("CREATE DATABASE report")
        await admin.close()
        base, _, query = uri.partition("?")
        head = base.rsplit("/", 1)[0]
        ingest_dsn = f"{head}/ingest" + (f"?{query}" if query else "")
        report_dsn = f"{head}/report" + (f"?{query}" if query else "")
        for dsn in (ingest_dsn, report_dsn):
            conn = await asyncpg.connect(dsn)
            await migrate(conn, "damm")
            await conn.close()
        nc = await connect(
            nats_server.url,
            user="control",
            password=nats_server.passwords["control"],
            name="bench-usage",
        )
        await ensure_streams(nc.jetstream())

        items = usage_reports(devices, gateways, rounds)
        reports = len(items)
        deltas = reports * (devices // gateways)
        print(
            f"1. usage ingestion: {devices:,} devices on {gateways} gateways, {rounds} rounds "
            f"= {reports:,} reports, {deltas:,} deltas"
        )
        appended, projected, rows = await ingest(nc, ingest_dsn, items)
        assert rows == devices, rows
        total = appended + projected
        for label, seconds in (
            ("append (log, pipelined)", appended),
            ("projection into usage_totals", projected),
            ("end to end (append + project)", total),
        ):
            print(
                f"   {label:<32} {seconds:6.2f} s {reports / seconds:>9,.0f} reports/s "
                f"{deltas / seconds:>11,.0f} deltas/s"
            )
        ingest_rate = deltas / projected
        print(
            f"   projection {ingest_rate:,.0f} deltas/s vs target {DELTAS_TARGET:,.0f}: "
            f"ratio {ingest_rate / DELTAS_TARGET:.2f}x"
        )
        await nc.close()

        now = datetime.now(UTC)
        start = time.perf_counter()
        await fill(report_dsn, report_devices, now)
        print(
            f"2. report over {report_devices:,} devices (fill by COPY "
            f"{time.perf_counter() - start:.1f} s)"
        )
        timings: list[float] = []
        for _ in range(3):
            start = time.perf_counter()
            rep = await generate(report_dsn, ttl_s=90, now=now)
            timings.append(time.perf_counter() - start)
        best = min(timings)
        start = time.perf_counter()
        text, html, js = render_text(rep), render_html(rep), to_json(rep)
        render = time.perf_counter() - start
        print(
            f"   generate (gather + build)        {best:6.3f} s best of 3 "
            f"({', '.join(f'{t:.3f}' for t in timings)})"
        )
        print(
            f"   render text+html+json            {render:6.3f} s "
            f"({len(text):,} / {len(html):,} / {len(js):,} bytes)"
        )
        full = best + render
        print(
            f"   report total {full:.3f} s vs target {REPORT_TARGET_S:.1f} s: "
            f"ratio {REPORT_TARGET_S / full:.1f}x headroom; devices {rep.totals.devices:,}, "
            f"over quota {rep.totals.over_quota:,}, near {rep.totals.near_quota:,}, "
            f"recommendations {len(rep.recommendations)}"
        )
        misses = [
            name
            for name, ok in (
                ("ingestion", ingest_rate >= DELTAS_TARGET),
                ("report", full <= REPORT_TARGET_S),
            )
            if not ok
        ]
        print("all targets met" if not misses else f"MISSED: {', '.join(misses)}")
    finally:
        pg.stop()
        nats_server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _args() -> Any:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--gateways", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--report-devices", type=int, default=100_000)
    return parser.parse_args()


if __name__ == "__main__":
    log.configure("warning", json=False)
    args = _args()
    asyncio.run(main(args.devices, args.gateways, args.rounds, args.report_devices))
