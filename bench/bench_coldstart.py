"""Cold start of `damm control run` on a long log: from the log alone, and from a snapshot + tail.

Method (printed with the figures):
- real nats-server (sync_interval: always) and PostgreSQL;
- the log: a tier, a token, --gateways gateways (front door, registration) and then devices, the
  four events of an enrollment each (damm.dev.fleet_log), until it holds --events events,
  written as atomic JetStream batches of 1,000 (one acknowledgement and one disk sync per batch;
  with sync_interval: always a disk sync per message caps a pipelined writer near 1.5k events/s
  here), --inflight / 1,000 batches in flight (`--writer pipeline`: one publish per event,
  --inflight acknowledgements outstanding); every acknowledgement is checked;
- ready: spawn of `damm control run` until it answers `catalog.get` (its router subscribes only
  after the fold caught up with the log);
- from the log alone: no snapshot in the store;
- snapshot: `damm control run` with DAMM_SNAPSHOT_MIN_EVENTS=1, as a control plane takes one
  (SnapshotWriter, into the JetStream object store), waited for until it covers the whole log;
  then --tail more device events are appended, and the control plane is started again:
  snapshot + tail;
- the control plane's own log lines (JSON, info) give the phases of each start;
- --baseline DAMM: another build's `damm` (e.g. main's), started in turn with this one on the
  same log and snapshot, for before/after figures from one run.

    .venv/bin/python bench/bench_coldstart.py [--events 1000000] [--tail 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nats.aio.client import Client as NATS

from damm.dev import fleet_log
from damm.dev.fleet_log import SyntheticFleet
from damm.domain.ipam import Overlay
from damm.events import codec
from damm.events.store import MAX_BATCH, Append, EventStore
from damm.events.streams import ensure_streams
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.stack.nats_server import NatsServer
from damm.stack.postgres import Postgres
from damm.subjects import EVENTS_STREAM, SNAPSHOT_BUCKET

OVERLAY = "10.32.0.0/11"
TARGET_S = 10.0


async def publish(nc: NATS, items: Iterator[Append], inflight: int) -> tuple[int, float]:
    """Every item, encoded once, with up to ``inflight`` acks outstanding; (count, seconds)."""
    inbox = nc.new_inbox()
    slots = asyncio.Semaphore(inflight)
    failed: list[str] = []
    done = asyncio.Event()
    sent = acked = 0
    finished = False

    async def on_ack(msg: Any) -> None:
        nonlocal acked
        ack = json.loads(msg.data) if msg.data else {"error": {"description": "no responders"}}
        if "error" in ack:
            failed.append(str(ack["error"]))
        acked += 1
        slots.release()
        if finished and acked == sent:
            done.set()

    sub = await nc.subscribe(f"{inbox}.*", cb=on_ack)
    t0 = time.perf_counter()
    for item in items:
        await slots.acquire()
        if failed:
            raise RuntimeError(f"append refused: {failed[0]}")
        await nc.publish(
            item.subject,
            codec.encode(item.envelope),
            reply=f"{inbox}.{sent}",
            headers=item.headers() or None,
        )
        sent += 1
    finished = True
    if acked < sent:
        await asyncio.wait_for(done.wait(), 120)
    await sub.unsubscribe()
    if failed:
        raise RuntimeError(f"append refused: {failed[0]}")
    return sent, time.perf_counter() - t0


async def publish_batches(
    store: EventStore, items: Iterator[Append], concurrency: int, size: int = MAX_BATCH
) -> tuple[int, float]:
    """Every item, in atomic batches of ``size`` (one acknowledgement, one disk sync each),
    ``concurrency`` batches in flight; (count, seconds)."""
    sent = 0
    t0 = time.perf_counter()
    inflight: set[asyncio.Task[Any]] = set()
    while batch := list(itertools.islice(items, size)):
        if len(inflight) >= concurrency:
            done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a refusal aborts the build
        inflight.add(asyncio.create_task(store.append_batch(batch, ack_timeout=120)))
        sent += len(batch)
    for task in asyncio.as_completed(inflight):
        await task
    return sent, time.perf_counter() - t0


class Control:
    """`damm control run` in its own process, its JSON log kept for the phases of a start."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.log = root / "control-0.log"

    async def start(self, probe: NATS, extra: dict[str, str], damm: str | None = None) -> float:
        self.runs += 1
        self.log = self.root / f"control-{self.runs}.log"
        t0 = time.perf_counter()
        self.spawned_at = datetime.now().astimezone()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [damm or str(Path(sys.executable).parent / "damm"), "control", "run", "--keys-dir",
                 str(self.root / "keys")],
                env={**self.env, **extra}, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"control plane exited with {self.proc.returncode}")
            try:
                await call(probe, "catalog.get", p.GetCatalog(region="eu"), p.SignedCatalogReply,
                           timeout=0.5)  # fmt: skip
                return time.perf_counter() - t0
            except Exception:  # no responders yet (still catching up), or a refusal
                await asyncio.sleep(0.02)

    def phases(self) -> str:
        """Seconds from spawn to each start-up line the control plane logged."""
        wanted = ("migrated", "started from snapshot", "caught up", "control plane ready")
        out: list[str] = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            event = str(rec.get("event", ""))
            if any(w in event for w in wanted) and "timestamp" in rec:
                at = datetime.fromisoformat(str(rec["timestamp"]).replace("Z", "+00:00"))
                out.append(f"{event} +{(at - self.spawned_at).total_seconds():.2f} s")
        return "; ".join(out) or "(no start-up lines logged)"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(120)
            self.proc = None


async def snapshot_seq(nc: NATS) -> int:
    from damm.control.snapshots import OBJECT, _snapshot_decoder

    with contextlib.suppress(Exception):
        obs = await nc.jetstream().object_store(SNAPSHOT_BUCKET)
        buf = io.BytesIO()
        await obs.get(OBJECT, writeinto=buf)
        return int(_snapshot_decoder.decode(buf.getvalue()).seq)
    return 0


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--gateways", type=int, default=1_000)
    ap.add_argument("--tail", type=int, default=10_000, help="events after the snapshot")
    ap.add_argument("--inflight", type=int, default=8_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", help="another build's `damm`, started in turn on the same log")
    ap.add_argument("--writer", choices=("batches", "pipeline"), default="batches")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="damm-bench-cold-", dir="/tmp"))
    nats_server = NatsServer(root / "nats")
    url = nats_server.start()
    pg = Postgres(root / "pg", delete_on_stop=True)
    dsn = pg.start()
    env = {
        **os.environ,
        "DAMM_NATS_URL": url,
        "DAMM_DATABASE_URL": dsn,
        "DAMM_CONTROL_PASSWORD": nats_server.passwords["control"],
        "DAMM_KEK": base64.b64encode(os.urandom(32)).decode(),  # signing keys are sealed
        "DAMM_OVERLAY": OVERLAY,
        "DAMM_LOG_LEVEL": "info",
        "DAMM_LOG_FORMAT": "json",
    }
    no_snapshots = {"DAMM_SNAPSHOT_MIN_EVENTS": "1000000000", "DAMM_SNAPSHOT_INTERVAL": "3600"}
    out: list[str] = []

    def report(line: str) -> None:
        print(line, flush=True)
        out.append(line)

    report(f"method: see `{Path(__file__).name}` docstring; --events {args.events} --gateways "
           f"{args.gateways} --tail {args.tail} --inflight {args.inflight}")  # fmt: skip
    control = Control(root, env)
    overlay = Overlay.parse(OVERLAY)
    fleet = SyntheticFleet(tier="bulk", region="eu", gateways=args.gateways)
    try:
        nc = await connect(url, user="control", password=nats_server.passwords["control"])
        await ensure_streams(nc.jetstream())
        device = await connect(url)
        setup = list(fleet_log.setup_items(fleet))
        devices = (args.events - len(setup)) // 4
        store = EventStore(nc, timeout=120)
        everything = itertools.chain(setup, fleet_log.device_items(fleet, overlay, 0, devices))
        if args.writer == "batches":
            n, took = await publish_batches(store, everything, args.inflight // MAX_BATCH or 1)
        else:
            n, took = await publish(nc, everything, args.inflight)
        last = (await nc.jetstream().stream_info(EVENTS_STREAM)).state.last_seq
        report(f"build: {n} events ({devices} devices) in {took:.1f} s = {n / took:.0f} events/s "
               f"(log ends at {last})")  # fmt: skip
        await fleet_log.beat_all(store, fleet)

        alone = await control.start(device, no_snapshots)
        report(f"cold start from the log alone, {last} events: {alone:.2f} s "
               f"= {last / alone:.0f} events/s (target <= {TARGET_S:.0f} s)")  # fmt: skip
        report(f"  phases: {control.phases()}")
        control.stop()

        await control.start(
            device, {"DAMM_SNAPSHOT_MIN_EVENTS": "1", "DAMM_SNAPSHOT_INTERVAL": "1"}
        )
        t0 = time.perf_counter()
        while (seq := await snapshot_seq(nc)) < last:
            if time.perf_counter() - t0 > 600:
                raise SystemExit(f"no snapshot covering {last} (have {seq})")
            await asyncio.sleep(0.5)
        control.stop()
        info = await nc.jetstream().object_store(SNAPSHOT_BUCKET)
        size = (await info.get_info("decision-state")).size or 0
        report(f"snapshot at {seq}: {size / 1e6:.1f} MB, taken by the control plane "
               f"{time.perf_counter() - t0:.1f} s after it was ready")  # fmt: skip

        tail_devices = args.tail // 4
        n, took = await publish_batches(
            store, fleet_log.device_items(fleet, overlay, devices, tail_devices), 4
        )
        last = (await nc.jetstream().stream_info(EVENTS_STREAM)).state.last_seq
        report(f"tail: {n} events after the snapshot (log ends at {last})")
        builds = [("this build", None)]
        if args.baseline:
            builds.insert(0, ("baseline", args.baseline))
        for _ in range(args.repeat):
            for name, damm in builds:
                started = await control.start(device, no_snapshots, damm)
                report(f"cold start from snapshot {seq} + {last - seq} events of tail, {name}: "
                       f"{started:.2f} s (target <= {TARGET_S:.0f} s)")  # fmt: skip
                report(f"  phases: {control.phases()}")
                control.stop()
        await device.close()
        await nc.close()
    finally:
        control.stop()
        pg.stop()
        nats_server.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n".join(["", "summary:", *out]))


if __name__ == "__main__":
    asyncio.run(main())
