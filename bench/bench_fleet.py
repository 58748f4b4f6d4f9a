"""Fleet scale: a control plane over 100k devices and 1,000 gateways, looking for cliffs.

Method (printed with the figures):
- real nats-server (sync_interval: always) and PostgreSQL; `damm control run` in its own process,
  so its RSS is its own; the bench process drives it over the bus;
- the fleet is written straight into the event log with `append_many` (damm.dev.fleet_log: the
  four events of each enrollment, gateways added, given a front door and registered), then
  heartbeats come from a driver: every gateway calls `gateway.heartbeat` every 10 s;
- enrollment latency: open loop at 200/s for --seconds, over the bus, at --small devices and
  again after the log grew to --devices (same control plane binary, restarted);
- each latency run starts once the read models caught up with the log (so a projector
  replaying a freshly written history does not share the CPU with it);
- closed loop: --concurrency requesters enrolling as fast as answered, against the ceiling
  measured in the same run (as bench_enroll.py): a NATS request whose responder publishes one
  message to a JetStream stream and replies;
- cold start: spawn of `damm control run` until it answers a request (the router subscribes only
  after catch-up), from the first event and from a snapshot;
- placement spread: 500 concurrent enrollments into a region of 100 idle gateways, largest share;
- RSS: VmRSS and VmHWM of the control-plane process at the end.

    .venv/bin/python bench/bench_fleet.py [--devices 100000] [--gateways 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
from nats.aio.client import Client as NATS
from nats.js.api import StorageType, StreamConfig

from damm import log
from damm.dev import fleet_log
from damm.dev.fleet_log import SyntheticFleet
from damm.domain.ipam import Overlay
from damm.events.store import EventStore
from damm.events.streams import ensure_streams
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.stack.nats_server import NatsServer
from damm.stack.postgres import Postgres

OVERLAY = "10.32.0.0/12"
SPARE = 400_000  # address indices of the bulk-written devices start past the ones enrolled live


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:6.1f} ms  p99 {pct(values, 0.99) * 1000:6.1f} ms"


def device_key() -> str:
    """Random, and canonical: the top bit clear (enrollment refuses a key spelled above p)."""
    raw = bytearray(hashlib.sha256(uuid.uuid4().bytes).digest())
    raw[31] &= 0x7F
    return base64.b64encode(bytes(raw)).decode()


async def open_loop(fn: Callable[[], Awaitable[Any]], rate: float, seconds: float) -> list[float]:
    latencies: list[float] = []
    start = time.perf_counter()

    async def one() -> None:
        t0 = time.perf_counter()
        await fn()
        latencies.append(time.perf_counter() - t0)

    tasks = []
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return latencies


async def closed_loop(
    fn: Callable[[], Awaitable[Any]], n: int, concurrency: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    left = iter(range(n))

    async def worker() -> None:
        for _ in left:
            t0 = time.perf_counter()
            await fn()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0), latencies


class Control:
    """`damm control run` in its own process."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, probe: NATS) -> float:
        """Spawn and wait until it answers; the seconds that took."""
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "damm"), "control", "run", "--keys-dir",
             str(self.root / "keys")],
            env=self.env,
        )  # fmt: skip
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"control plane exited with {self.proc.returncode}")
            try:
                await call(probe, "catalog.get", p.GetCatalog(region="eu"), p.SignedCatalogReply,
                           timeout=0.5)  # fmt: skip
                return time.perf_counter() - t0
            except Exception:  # no responders yet (still catching up), or a refusal
                await asyncio.sleep(0.05)

    def rss_mb(self) -> tuple[float, float]:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return (
            int(fields["VmRSS"].split()[0]) / 1024,
            int(fields["VmHWM"].split()[0]) / 1024,
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)
            self.proc = None


async def heartbeats(gw_nc: NATS, fleets: list[SyntheticFleet], stop: asyncio.Event) -> None:
    """Every gateway beats every 10 s, spread evenly."""
    gateways = [(f, n) for f in fleets for n in range(f.gateways)]
    period = 10.0
    inflight: set[asyncio.Task[None]] = set()
    while not stop.is_set():
        t0 = time.perf_counter()
        for i, (f, n) in enumerate(gateways):
            if stop.is_set():
                return
            delay = t0 + i * period / len(gateways) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(beat(gw_nc, f, n))
            inflight.add(task)
            task.add_done_callback(inflight.discard)


async def beat(gw_nc: NATS, fleet: SyntheticFleet, n: int) -> None:
    # A control plane restarting misses some; the next beat follows.
    with contextlib.suppress(Exception):
        await call(
            gw_nc,
            "gateway.heartbeat",
            p.Heartbeat(
                gateway_id=fleet.gateway_id(n), token=fleet.gateway_token(n), peer_count=0,
                active_peers=0, rx_bytes=0, tx_bytes=0, load=0.0,
            ),
            p.HeartbeatAck,
            timeout=5,
        )  # fmt: skip


async def build_devices(
    store: EventStore, fleet: SyntheticFleet, overlay: Overlay, first: int, count: int
) -> tuple[int, float]:
    t0 = time.perf_counter()
    written = await fleet_log.write(
        store, fleet_log.device_items(fleet, overlay, first, count, index_offset=SPARE)
    )
    return written, time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--small", type=int, default=1_000)
    ap.add_argument("--gateways", type=int, default=1_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--closed", type=int, default=3_000)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    log.configure("error", json=True)
    root = Path(tempfile.mkdtemp(prefix="damm-bench-fleet-", dir="/tmp"))
    nats_server = NatsServer(root / "nats")
    url = nats_server.start()
    pg = Postgres(root / "pg", delete_on_stop=True)
    dsn = pg.start()
    env = {
        **os.environ,
        "DAMM_NATS_URL": url,
        "DAMM_DATABASE_URL": dsn,
        "DAMM_CONTROL_PASSWORD": nats_server.passwords["control"],
        "DAMM_OVERLAY": OVERLAY,
        "DAMM_KEK": base64.b64encode(os.urandom(32)).decode(),
        "DAMM_LOG_LEVEL": "error",
        "DAMM_SNAPSHOT_INTERVAL": "5",
        "DAMM_SNAPSHOT_MIN_EVENTS": "1000000000",  # no snapshot until asked for
    }
    overlay = Overlay.parse(OVERLAY)
    fleet = SyntheticFleet(tier="bulk", region="eu", gateways=args.gateways)
    burst = SyntheticFleet(tier="burst", region="burst", gateways=100, prefix="bx")
    out: list[str] = []

    def report(line: str) -> None:
        print(line, flush=True)
        out.append(line)

    control = Control(root, env)
    try:
        nc = await connect(url, user="control", password=nats_server.passwords["control"])
        await ensure_streams(nc.jetstream())
        store = EventStore(nc, timeout=60)
        device = await connect(url)
        gw_nc = await connect(url, user="control", password=nats_server.passwords["control"])

        t0 = time.perf_counter()
        setup = [*fleet_log.setup_items(fleet), *fleet_log.setup_items(burst)]
        await fleet_log.write(store, iter(setup))
        written, took = await build_devices(store, fleet, overlay, 0, args.small)
        report(f"build: {len(setup)} setup + {written} device events in "
               f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        await fleet_log.beat_all(store, fleet)
        await fleet_log.beat_all(store, burst)

        stop_beats = asyncio.Event()
        beats = asyncio.create_task(heartbeats(gw_nc, [fleet, burst], stop_beats))

        async def enroll() -> None:
            await call(
                device,
                "enroll",
                p.Enroll(token=fleet.token, public_key=device_key(), request_id=uuid.uuid4().hex),
                p.Enrolled,
                timeout=30,
            )

        async def projected() -> float:
            """Seconds until the read models hold the whole log (measure enrollment after it)."""
            t1 = time.perf_counter()
            target = (await nc.jetstream().stream_info("DAMM_EVENTS")).state.last_seq
            conn = await asyncpg.connect(dsn)
            try:
                while True:
                    done = await conn.fetchval(
                        "SELECT last_seq FROM damm.checkpoint WHERE projector = 'readmodels'"
                    )
                    if done is not None and done >= target:
                        return time.perf_counter() - t1
                    await asyncio.sleep(0.2)
            finally:
                await conn.close()

        async def enroll_burst() -> str:
            done = await call(
                device,
                "enroll",
                p.Enroll(token=burst.token, public_key=device_key(), request_id=uuid.uuid4().hex),
                p.Enrolled,
                timeout=30,
            )
            return done.gateway_id

        started = await control.start(device)
        report(f"cold start at {args.small} devices (no snapshot): {started:.2f} s")
        await projected()
        await open_loop(enroll, 50, 2)  # warm up
        small = await open_loop(enroll, 200, args.seconds)
        report(f"enrollment at 200/s offered, {args.small} devices, {args.gateways} gateways: "
               f"{ms(small)}")  # fmt: skip
        placed = await asyncio.gather(*(enroll_burst() for _ in range(500)))
        top = Counter(placed).most_common(1)[0]
        report(f"placement: 500 concurrent enrollments over 100 idle gateways: largest share "
               f"{top[1]} on {top[0]} = {top[1] / 500:.1%} (target <= 3%); "
               f"{len(set(placed))} gateways used")  # fmt: skip
        control.stop()

        count = args.devices - args.small
        written, took = await build_devices(store, fleet, overlay, args.small, count)
        report(f"build: {written} more events ({count} devices) in {took:.1f} s "
               f"= {written / took:.0f} events/s")  # fmt: skip
        info = (await nc.jetstream().stream_info("DAMM_EVENTS")).state
        try:
            started = await control.start(device)
        except SystemExit as exc:
            report(f"cold start at {args.devices} devices, {info.last_seq} events: {exc}")
            raise
        report(f"cold start at {args.devices} devices, {info.last_seq} events, no snapshot: "
               f"{started:.2f} s = {info.last_seq / started:.0f} events/s incl. process start")  # fmt: skip
        report(f"  read models caught up {await projected():.1f} s later")
        await open_loop(enroll, 50, 2)
        large = await open_loop(enroll, 200, args.seconds)
        report(f"enrollment at 200/s offered, {args.devices} devices, {args.gateways} gateways: "
               f"{ms(large)}")  # fmt: skip
        ratio = statistics.median(large) / statistics.median(small)
        ratio99 = pct(large, 0.99) / pct(small, 0.99)
        report(f"  ratio {args.devices}/{args.small}: p50 {ratio:.2f}x  p99 {ratio99:.2f}x "
               "(target <= 1.5)")  # fmt: skip

        # closed loop against the bare ceiling (as bench_enroll.py measures it)
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(name="BENCH", subjects=["bench.js.>"], storage=StorageType.FILE)
        )

        async def responder(msg: Any) -> None:
            await js.publish("bench.js.one", msg.data)
            await nc.publish(msg.reply, b"ok")

        inflight: set[asyncio.Task[None]] = set()

        async def spawn(msg: Any) -> None:
            task = asyncio.create_task(responder(msg))
            inflight.add(task)
            task.add_done_callback(inflight.discard)

        await nc.subscribe("bench.ceiling", cb=spawn)
        await nc.flush()

        async def bare() -> None:
            await gw_nc.request("bench.ceiling", b"x" * 300, timeout=30)

        ceiling, _ = await closed_loop(bare, args.closed, args.concurrency)
        rate, lat = await closed_loop(enroll, args.closed, args.concurrency)
        report(f"closed loop c={args.concurrency}, {args.gateways} gateways, {args.devices} "
               f"devices: enrollment {rate:.0f}/s ({ms(lat)}) = {rate / ceiling:.0%} of the "
               f"ceiling, a request + one JetStream publish ({ceiling:.0f}/s; target >= 50%)")  # fmt: skip

        rss, hwm = control.rss_mb()
        report(f"control-plane RSS {rss:.0f} MB, peak {hwm:.0f} MB (target <= 500 MB)")

        # snapshot, then cold start from it
        control.stop()
        env["DAMM_SNAPSHOT_MIN_EVENTS"] = "1"
        env["DAMM_SNAPSHOT_INTERVAL"] = "1"
        await control.start(device)
        size = 0
        for _ in range(240):
            with contextlib.suppress(Exception):
                obs = await nc.jetstream().object_store("damm-snapshots")
                size = (await obs.get_info("decision-state")).size or 0
            if size:
                break
            await asyncio.sleep(0.5)
        control.stop()
        if not size:
            report("no snapshot was written")
        else:
            env["DAMM_SNAPSHOT_MIN_EVENTS"] = "1000000000"
            info = (await nc.jetstream().stream_info("DAMM_EVENTS")).state
            started = await control.start(device)
            report(f"cold start at {info.last_seq} events from a snapshot: {started:.2f} s "
                   f"(snapshot {size / 1e6:.1f} MB)")  # fmt: skip
        control.stop()
        stop_beats.set()
        await beats
        for c in (device, gw_nc, nc):
            await c.close()
    finally:
        control.stop()
        pg.stop()
        nats_server.stop()
    print("\n".join(["", "summary:", *out]))


if __name__ == "__main__":
    asyncio.run(main())
