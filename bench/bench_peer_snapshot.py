"""Benchmark: a large peer set reaching a real agent through the paged ``gateway.peers`` snapshot.

Run: ``.venv/bin/python bench/bench_peer_snapshot.py [--peers 50000] [--repeat 3]``.

A real control plane (embedded NATS with JetStream + PostgreSQL) and the gateway agent
(in-process, memory backend). The devices are appended to the log directly as
``device.enrolled`` events (enrolling 50k devices through the handler would measure enrollment,
not the snapshot); the control plane folds them like any other events. Then:

- cold: a fresh agent (empty interface) from ``run`` to its first completed resync, including
  connecting and registering;
- resync: the same agent resyncing again (pages + full read + empty diff);
- pages: how many replies the set took, and the largest reply against the bus's limit.

Target (issue 12): a 50k-peer snapshot to a real agent <= 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import structlog

from damm.agent.runner import AgentConfig, GatewayAgent
from damm.control.process import ControlPlane
from damm.domain.ipam import Overlay
from damm.events import model as m
from damm.events.store import Append, envelope
from damm.keys.sealing import LocalKek
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.settings import ControlSettings
from damm.stack.gateway_users import follow_gateways
from damm.stack.nats_server import NatsServer
from damm.stack.postgres import Postgres
from damm.subjects import event_subject
from damm.wireguard.memory import MemoryBackend

TARGET_S = 1.0


def public_key() -> str:
    """A random key a validator accepts: below 2^255 (so under p, almost surely not low order)."""
    raw = bytearray(os.urandom(32))
    raw[31] &= 0x7F
    return base64.b64encode(bytes(raw)).decode()


async def main(count: int, repeat: int, profile: bool) -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    root = Path(tempfile.mkdtemp(prefix="damm-bench-snap-", dir="/tmp"))
    nats_server = NatsServer(root / "nats")
    nats_server.start()
    pg = Postgres(root / "pgdata", delete_on_stop=True)
    dsn = pg.start()
    settings = ControlSettings(
        overlay=Overlay.parse("10.32.0.0/12"), keys_dir=root / "keys", kek=LocalKek.generate()
    )
    plane = ControlPlane(nats_server.url, dsn, settings, password=nats_server.passwords["control"])
    await plane.start()
    assert plane.ctx is not None and plane.leadership is not None
    ctx = plane.ctx
    users_stop = asyncio.Event()
    users = asyncio.create_task(follow_gateways(nats_server, ctx.state, users_stop))
    try:
        await asyncio.wait_for(plane.leadership.gained.wait(), 5)
        admin = await connect(
            nats_server.url, user="admin", password=nats_server.passwords["admin"]
        )
        await call(admin, "admin.tier.define", p.DefineTier(tier="bench", regions=("eu",)), p.Done)
        added = await call(
            admin,
            "admin.gateway.add",
            p.AddGateway(gateway_id="gw1", region="eu", front_door="192.0.2.1:51820"),
            p.GatewayAdded,
        )
        token = await call(admin, "admin.token.create", p.CreateToken(tier="bench"), p.TokenCreated)
        front_door = next(iter(ctx.state.gateways["gw1"].front_doors))

        started = time.perf_counter()
        actor = m.Actor("admin", "bench")
        items = []
        for i in range(count):
            device_id = uuid.uuid4().hex
            subject = event_subject("device", device_id)
            n = i + 10
            event = m.DeviceEnrolled(
                device_id=device_id,
                public_key=public_key(),
                token_id=token.token_id,
                tier="bench",
                gateway_id="gw1",
                front_door_id=front_door,
                egress_pool_id=None,
                address=f"10.{32 + n // 65536}.{n // 256 % 256}.{n % 256}",
                region="eu",
            )
            env = envelope(subject, event, actor=actor, correlation_id=device_id)
            items.append(Append(subject, env, expected_seq=0))
        await ctx.store.append_many(items)
        print(f"{count} devices appended in {time.perf_counter() - started:.1f} s", flush=True)
        # The follower folds in the background (its sync() has a deadline a long log outruns).
        deadline = time.monotonic() + 120
        while (folded := len(ctx.state.peer_entries("gw1"))) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"the control plane folded {folded} of {count} devices")
            await asyncio.sleep(0.05)
        print(f"{count} devices appended and folded in {time.perf_counter() - started:.1f} s")

        backend = MemoryBackend()
        agent = GatewayAgent(
            AgentConfig(
                gateway_id="gw1",
                token=added.token,
                nats_url=nats_server.url,
                state_dir=root / "agent",
                heartbeat_s=60,
                usage_s=60,
                reconcile_s=600,
            ),
            backend,
        )
        stop = asyncio.Event()
        started = time.perf_counter()
        task = asyncio.create_task(agent.run(stop))
        await asyncio.wait_for(agent.synced.wait(), 60)
        cold = time.perf_counter() - started
        assert len(backend.peers) == count, len(backend.peers)

        if profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            await agent.resync()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        resyncs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            await agent.resync()
            resyncs.append(time.perf_counter() - t0)
        assert len(backend.peers) == count

        gw_nc = await connect(  # the admin may ask anything; the control user only answers
            nats_server.url, user="admin", password=nats_server.passwords["admin"]
        )
        sizes: list[int] = []
        after: str | None = None
        while True:
            request = p.PeerSnapshotRequest(gateway_id="gw1", token=added.token, after=after)
            msg = await gw_nc.request(
                "damm.req.gateway.peers", msgspec.json.encode(request), timeout=10
            )
            sizes.append(len(msg.data))
            page = msgspec.json.decode(msg.data, type=p.Reply)
            after = msgspec.json.decode(page.result, type=p.PeerSnapshot).next_after
            if after is None:
                break
        limit = gw_nc.max_payload
        await gw_nc.close()
        await admin.close()
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        users_stop.set()
        await users
        await plane.stop()
        nats_server.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"peers: {count}; pages: {len(sizes)}; largest reply {max(sizes)} bytes (limit {limit})")
    print(
        f"cold agent (connect + register + snapshot + apply {count} peers): "
        f"{cold * 1000:.0f} ms   (target <= {TARGET_S * 1000:.0f} ms)"
    )
    print(
        f"resync of a synced agent (snapshot + full read + empty diff), median of {repeat}: "
        f"{statistics.median(resyncs) * 1000:.0f} ms   runs: "
        + " ".join(f"{x * 1000:.0f}" for x in resyncs)
    )
    return 0 if cold <= TARGET_S else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="profile one resync (cProfile)")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.peers, args.repeat, args.profile)))
