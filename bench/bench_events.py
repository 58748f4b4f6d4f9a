"""Event log throughput, end to end, against the configuration DAMM ships (fsync always).

Targets: DAMM's pipelined append >= 50% of the raw JetStream publish ceiling measured in the same
run; projection and replay >= 20,000 events/s into Postgres. The mix is what a busy control plane
logs: enrollments, the token uses that come with them, and gateway usage reports.

    .venv/bin/python bench/bench_events.py [--events 100000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from damm import log
from damm.events import model as m
from damm.events.store import Append, EventStore, envelope
from damm.events.streams import ensure_streams
from damm.projections.migrate import migrate
from damm.projections.replay import rebuild
from damm.projections.runner import Projector
from damm.protocol.bus import connect
from damm.stack.nats_server import NatsServer
from damm.stack.postgres import Postgres
from damm.subjects import EVENTS_STREAM, event_subject

APPEND_RATIO_TARGET = 0.5
PROJECT_TARGET = 20_000.0
REPLAY_TARGET = 20_000.0
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def workload(count: int, seed: int = 1) -> list[Append]:
    """Enrollment (device + token use) and usage reports of 4 devices each, in a 1:1:3 mix."""
    rng = random.Random(seed)
    admin = m.Actor("admin", "bench")
    items: list[Append] = []
    devices: list[str] = []
    tokens = [f"tok-{t}" for t in range(50)]

    def add(kind: str, ident: str, event: m.Event, actor: m.Actor = admin) -> None:
        subject = event_subject(kind, ident)
        env = envelope(
            subject,
            event,
            actor=actor,
            correlation_id=f"c{len(items)}",
            now=T0 + timedelta(seconds=len(items)),
        )
        items.append(Append(subject, env))

    for t in tokens:
        add("token", t, m.TokenIssued(token_id=t, token_hash="h" + t, tier="basic"))
    while len(items) < count:
        n = len(devices)
        if n < 4 or rng.random() < 0.4:
            dev, tok = f"dev-{n}", tokens[n % len(tokens)]
            devices.append(dev)
            add("token", tok, m.TokenUsed(token_id=tok, device_id=dev))
            add(
                "device",
                dev,
                m.DeviceEnrolled(
                    device_id=dev,
                    public_key=f"{n:043d}=",
                    token_id=tok,
                    tier="basic",
                    gateway_id=f"gw-{n % 8}",
                    front_door_id="fd0",
                    egress_pool_id="pool-de",
                    address=f"10.44.{n // 250 % 256}.{n % 250 + 2}",
                    region="eu",
                    exit_country="DE",
                ),
            )
        else:
            gw = f"gw-{rng.randrange(8)}"
            deltas = tuple(
                m.UsageDelta(d, rng.randrange(10**7), rng.randrange(10**6))
                for d in rng.sample(devices, 4)
            )
            add(
                "gateway",
                gw,
                m.UsageReported(gateway_id=gw, report_id=f"r{len(items)}", deltas=deltas),
                m.Actor("gateway", gw),
            )
    return items[:count]


async def raw_publish(nc: NATS, count: int) -> float:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH", subjects=["bench.>"], storage=StorageType.FILE))
    payload = b"x" * 200
    start = time.perf_counter()
    for i in range(count):
        await js.publish_async(f"bench.s{i % 16}", payload)
    await js.publish_async_completed()
    return time.perf_counter() - start


async def raw_fetch(nc: NATS, count: int) -> float:
    js = nc.jetstream()
    config = ConsumerConfig(
        ack_policy=AckPolicy.ALL, deliver_policy=DeliverPolicy.ALL, max_ack_pending=-1
    )
    start = time.perf_counter()
    psub = await js.pull_subscribe("bench.>", stream="BENCH", config=config)
    got = 0
    while got < count:
        msgs = await psub.fetch(1000, timeout=5)
        got += len(msgs)
        await msgs[-1].ack()
    elapsed = time.perf_counter() - start
    await psub.unsubscribe()
    return elapsed


async def damm_append(nc: NATS, items: list[Append]) -> float:
    store = EventStore(nc, timeout=30)
    start = time.perf_counter()
    for i in range(0, len(items), 10_000):
        await store.append_many(items[i : i + 10_000], window=1000)
    elapsed = time.perf_counter() - start
    assert await store.stream_last_seq() == len(items)
    return elapsed


async def project(nc: NATS, dsn: str, count: int) -> float:
    projector = Projector("readmodels", EVENTS_STREAM, dsn)
    stop = asyncio.Event()
    start = time.perf_counter()
    task = asyncio.create_task(projector.run(nc, stop))
    while projector.applied_seq < count:
        await asyncio.sleep(0.005)
        if task.done():
            task.result()
    elapsed = time.perf_counter() - start
    stop.set()
    await task
    return elapsed


async def replay(nc: NATS, dsn: str, count: int) -> float:
    start = time.perf_counter()
    seq = await rebuild(nc, dsn)
    elapsed = time.perf_counter() - start
    assert seq == count, seq
    return elapsed


async def timed(label: str, profile: bool, step: Callable[[], Awaitable[float]]) -> float:
    if not profile:
        return await step()
    prof = cProfile.Profile()
    prof.enable()
    try:
        return await step()
    finally:
        prof.disable()
        print(f"\n--- profile: {label} ---")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)


async def main(count: int, profile: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="damm-bench-", dir="/tmp"))
    nats_server, pg = NatsServer(root / "nats"), Postgres(root / "pgdata", delete_on_stop=True)
    try:
        nats_server.start()
        uri = pg.start()
        conn = await asyncpg.connect(uri)
        await migrate(conn, "damm")
        rows = await conn.fetch("SHOW synchronous_commit")
        await conn.close()
        nc = await connect(
            nats_server.url, user="admin", password=nats_server.passwords["admin"], name="bench"
        )
        await ensure_streams(nc.jetstream())
        items = workload(count)

        def row(label: str, seconds: float, note: str = "") -> float:
            rate = count / seconds
            print(f"  {label:<38} {seconds:7.2f} s {rate:>10,.0f} /s  {note}", flush=True)
            return rate

        print(
            f"{count:,} events; nats-server sync_interval=always; postgres "
            f"synchronous_commit={rows[0][0]}"
        )
        raw = row(
            "1 raw publish_async 200 B", await timed("raw", profile, lambda: raw_publish(nc, count))
        )
        row("2 raw pull fetch(1000)", await timed("fetch", profile, lambda: raw_fetch(nc, count)))
        damm = count / await timed("append", profile, lambda: damm_append(nc, items))
        ratio = damm / raw
        print(
            f"  {'3 DAMM append_many (envelopes)':<38} {count / damm:7.2f} s {damm:>10,.0f} /s"
            f"  {ratio:.0%} of raw (target >= {APPEND_RATIO_TARGET:.0%})",
            flush=True,
        )
        proj = row(
            "4 projection (Projector, from 0)",
            await timed("project", profile, lambda: project(nc, uri, count)),
            f"target >= {PROJECT_TARGET:,.0f}/s",
        )
        rep = row(
            "5 replay (rebuild into shadow)",
            await timed("replay", profile, lambda: replay(nc, uri, count)),
            f"target >= {REPLAY_TARGET:,.0f}/s",
        )
        await nc.close()
        misses = [
            name
            for name, ok in (
                ("append ratio", ratio >= APPEND_RATIO_TARGET),
                ("projection", proj >= PROJECT_TARGET),
                ("replay", rep >= REPLAY_TARGET),
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
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true", help="cProfile each step")
    return parser.parse_args()


if __name__ == "__main__":
    log.configure("warning", json=False)
    args = _args()
    asyncio.run(main(args.events, args.profile))
