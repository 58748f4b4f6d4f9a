"""Failure windows per fault and p99 away from faults, on a three-node JetStream cluster with
two control planes, at a steady enrollment rate (issue 11's figures), with where the time goes.

For each fault it prints the window of failed requests (first to last failed request sent
around it), the failures in half-second buckets from the moment of injection, and the control
planes' log lines about NATS in the same span (disconnects, reconnects, follower resumes), so
what dominates a window can be read off one run. p99 outside the fault windows is set against a
single node with one control plane measured in the same run.

    .venv/bin/python bench/bench_chaos.py [--rate 200] [--gap 12] [--faults kill-follower,...]
        [--repeat 1] [--no-single] [--planes 2]

Targets: window <= 2 s for a control-plane or non-leader NATS node kill, <= 5 s for the stream
leader.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from damm import log
from damm.stack.postgres import Postgres
from damm.subjects import EVENTS_STREAM, TELEMETRY_STREAM
from tests.chaos.harness import (
    Fault,
    Load,
    Outcome,
    Stack,
    drive,
    kill_agent,
    kill_node,
    kill_plane,
    kill_postgres,
    p99_outside,
    pause_agent,
    pause_node,
    pause_plane,
    pause_postgres,
    windows_of,
)


async def kill_meta_leader(stack: Stack, down_s: float) -> Fault:
    """SIGKILL the node leading JetStream's meta group, when it does not lead the stream."""
    name = await meta_leader(stack)
    if name == await stack.stream_leader():  # move the stream's leadership off it first
        assert stack.admin is not None
        await stack.admin.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{EVENTS_STREAM}", b"", 5)
        deadline = time.monotonic() + 20
        while await stack.stream_leader() == name:
            if time.monotonic() > deadline:
                return Fault("SIGKILL meta leader (skipped: it kept the stream)", 0.0, 0.0, name)
            await asyncio.sleep(0.2)
        await asyncio.sleep(3)  # the step-down's own blip, out of the way
    node = stack.node(name)
    injected = time.monotonic()
    await asyncio.to_thread(node.kill)
    await asyncio.sleep(down_s)
    await asyncio.to_thread(node.start)
    return Fault("SIGKILL meta leader node", injected, time.monotonic(), name)


async def no_fault(stack: Stack, quiet_s: float) -> Fault:
    """Nothing injected: the failures a busy host causes on its own, measured like a fault."""
    injected = time.monotonic()
    await asyncio.sleep(quiet_s)
    return Fault("no fault", injected, time.monotonic(), "-")


FAULTS: dict[str, Callable[[Stack, Postgres], Awaitable[Fault]]] = {
    "none": lambda s, pg: no_fault(s, 2.0),
    "kill-meta": lambda s, pg: kill_meta_leader(s, 2.0),
    "kill-leader": lambda s, pg: kill_node(s, "leader", 2.0),
    "kill-follower": lambda s, pg: kill_node(s, "follower", 2.0),
    "stop-leader": lambda s, pg: pause_node(s, "leader", 3.0),
    "stop-follower": lambda s, pg: pause_node(s, "follower", 3.0),
    "kill-plane": lambda s, pg: kill_plane(s, 1, 1.0),
    "stop-plane": lambda s, pg: pause_plane(s, 1, 3.0),
    "kill-postgres": lambda s, pg: kill_postgres(pg, 1.0),
    "stop-postgres": lambda s, pg: pause_postgres(pg, 3.0),
    "kill-agent": lambda s, pg: kill_agent(s, "gw1", 2.0),
    "stop-agent": lambda s, pg: pause_agent(s, "gw2", 3.0),
}
NATS_WORDS = (
    "nats",
    "follower",
    "resum",
    "leader",
    "reconnect",
    "consumer",
    "projector",
    "enrollment group",
)


def buckets(outcomes: list[Outcome], fault: Fault, width: float = 0.5) -> list[str]:
    """Failed requests by when they were sent, relative to the injection."""
    seen: Counter[tuple[float, str]] = Counter()
    for o in outcomes:
        for a in o.attempts:
            if a.code != "ok" and fault.injected - 1.0 <= a.sent <= fault.recovered + 8.0:
                start = (a.sent - fault.injected) // width * width
                seen[(start, f"{a.code}: {a.detail.split('(')[0].strip()}"[:60])] += 1
    return [f"    {t:+5.1f}s {n:5d} {why}" for (t, why), n in sorted(seen.items())]


def plane_lines(root: Path, fault: Fault, offset: float) -> list[str]:
    """The control planes' lines about NATS from 1 s before the fault to 10 s after."""
    out = []
    for path in sorted(root.glob("control-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            text = f"{rec.get('event', '')} {rec.get('error', '')}"
            if not any(w in text.lower() for w in NATS_WORDS):
                continue
            when = _wall(rec.get("timestamp", "")) - offset
            if fault.injected - 1 <= when <= fault.injected + 10:
                out.append(f"    {when - fault.injected:+6.2f}s {path.stem}: {text[:110]}")
    return sorted(out, key=lambda s: float(s.split("s ")[0]))


async def consumers(stack: Stack) -> dict[str, str]:
    """Every consumer of the two streams and the node that leads it (ordered consumers are
    the control planes' followers; durable ones the projectors')."""
    assert stack.admin is not None
    js = stack.admin.jetstream(timeout=2)
    out: dict[str, str] = {}
    for stream in (EVENTS_STREAM, TELEMETRY_STREAM):
        try:
            infos = await js.consumers_info(stream)
        except Exception as exc:  # a node may be down: say so rather than stop the run
            out[f"{stream}: {exc!r}"] = ""
            continue
        for info in infos:
            leader = info.cluster.leader if info.cluster else ""
            kind = "durable" if info.config.durable_name else "ordered"
            out[f"{stream}/{kind}/{info.name[:8]}"] = str(leader)
    out["JetStream meta leader"] = await meta_leader(stack)
    return out


async def meta_leader(stack: Stack) -> str:
    return await stack.meta_leader()


def _wall(stamp: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


async def run(args: argparse.Namespace) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="damm-bench-chaos-", dir="/tmp"))
    pg = Postgres(root / "pgdata")
    dsn = await asyncio.to_thread(pg.start)
    figures: dict[str, object] = {"rate": args.rate, "load_average": os.getloadavg()}
    try:
        if not args.no_single:
            conn = await asyncpg.connect(dsn)
            await conn.execute("CREATE DATABASE single_node")
            await conn.close()
            single = Stack(
                root / "single", dsn.replace("/postgres?", "/single_node?"), nodes=1, planes=1
            )
            await single.start()
            try:
                base = await drive(single, args.rate, 10.0)
            finally:
                await single.stop()
            p99, n = p99_outside(base.outcomes, [])
            figures["single_node_p99_ms"] = round(p99 * 1000, 1)
            figures["single_node_samples"] = n
        stack = Stack(root / "cluster", dsn, nodes=3, planes=args.planes, pg=pg)
        stack.log_level = "info"
        await stack.start()
        names = [f for f in args.faults.split(",") if f for _ in range(args.repeat)]
        offset = time.time() - time.monotonic()
        try:
            duration = 4 + len(names) * args.gap + args.gap if names else args.gap
            task = asyncio.create_task(drive(stack, args.rate, duration))
            faults: list[Fault] = []
            await asyncio.sleep(4)
            for name in names:
                started = time.monotonic()
                placed = await consumers(stack)
                try:
                    fault = await FAULTS[name](stack, pg)
                except Exception as exc:  # a restart slower than its own timeout on a busy host
                    print(f"{name}: not measured, the injection failed: {exc!r}"[:300], flush=True)
                    await asyncio.sleep(max(0.0, args.gap - (time.monotonic() - started)))
                    continue
                if not fault.injected:
                    print(f"{name}: {fault.name}", flush=True)
                    continue
                faults.append(fault)
                hosted = [c for c, where in placed.items() if where == faults[-1].target]
                print(f"{name} on {faults[-1].target}: it hosted consumers {hosted}", flush=True)
                await asyncio.sleep(max(0.0, args.gap - (time.monotonic() - started)))
            load: Load = await task
        finally:
            await stack.stop()
        outcomes = load.outcomes
        p99, n = p99_outside(outcomes, faults)
        figures["cluster_p99_ms"] = round(p99 * 1000, 1)
        figures["cluster_samples"] = n
        rows = []
        for f, window in zip(faults, windows_of(outcomes, faults), strict=True):
            rows.append({"fault": f.name, "target": f.target, "window_s": round(window, 2)})
            print(f"{f.name} ({f.target}): window {window:.2f}s", flush=True)
            print("\n".join(buckets(outcomes, f)))
            print("\n".join(plane_lines(root / "cluster", f, offset)))
        figures["faults"] = rows
        figures["load_average_after"] = os.getloadavg()
        figures["unenrolled"] = sum(1 for o in outcomes if o.enrolled is None)
    finally:
        await asyncio.to_thread(pg.stop)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--gap", type=float, default=12.0)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-single", action="store_true")
    parser.add_argument("--planes", type=int, default=2, help="control planes on the cluster")
    args = parser.parse_args()
    log.configure("warning", json=True)
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
