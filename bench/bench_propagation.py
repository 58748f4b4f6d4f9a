"""Benchmark (a): peer-set propagation latency at a steady change rate.

Run: ``.venv/bin/python bench/bench_propagation.py [--changes 400] [--rate 100] [--backend uapi]``
(uapi needs root + wireguard-go; ``--backend memory`` runs anywhere).

A real control plane (embedded NATS with JetStream + PostgreSQL) and the gateway agent
(in-process) following its peer set. Changes alternate enroll / revoke at ``--rate`` per second.
Measured on the gateway side, when the backend has applied the diff:
  enroll: enrollment reply received -> peer present on the interface (can be < 0: applied
          before the reply reached the client; reported as 0)
  revoke: revoke request sent -> peer removed (includes the control plane's commit, which
          retries on optimistic-concurrency conflicts with enrollments on the same token), and
          revoke reply received -> peer removed (propagation alone; < 0 reported as 0)
Targets (issue 4): p99 <= 100 ms (enroll) and <= 200 ms (revoke).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import structlog

from damm.agent.runner import AgentConfig, GatewayAgent
from damm.control.process import ControlPlane
from damm.domain.ipam import Overlay
from damm.errors import Code, DammError
from damm.keys.sealing import LocalKek
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.settings import ControlSettings
from damm.stack.gateway_users import follow_gateways
from damm.stack.nats_server import NatsServer
from damm.stack.postgres import Postgres
from damm.wireguard.base import WireGuardBackend
from damm.wireguard.memory import MemoryBackend
from damm.wireguard.peer_diff import PeerDiff

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fleet import keypair

TARGET_ENROLL_MS, TARGET_REVOKE_MS = 100.0, 200.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def main(changes: int, rate: float, backend_kind: str) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    root = Path(tempfile.mkdtemp(prefix="damm-bench-prop-", dir="/tmp"))
    nats_server = NatsServer(root / "nats")
    nats_server.start()
    pg = Postgres(root / "pgdata", delete_on_stop=True)
    dsn = pg.start()
    settings = ControlSettings(
        overlay=Overlay.parse("10.40.0.0/16"), keys_dir=root / "keys", kek=LocalKek.generate()
    )
    plane = ControlPlane(nats_server.url, dsn, settings, password=nats_server.passwords["control"])
    await plane.start()
    assert plane.ctx is not None
    users_stop = asyncio.Event()
    users = asyncio.create_task(follow_gateways(nats_server, plane.ctx.state, users_stop))
    lab = None
    try:
        assert plane.leadership is not None
        await asyncio.wait_for(plane.leadership.gained.wait(), 5)
        admin = await connect(
            nats_server.url, user="admin", password=nats_server.passwords["admin"]
        )
        device = await connect(nats_server.url)
        await call(admin, "admin.tier.define", p.DefineTier(tier="bench", regions=("eu",)), p.Done)
        added = await call(
            admin,
            "admin.gateway.add",
            p.AddGateway(gateway_id="gw1", region="eu", front_door="192.0.2.1:51820"),
            p.GatewayAdded,
        )
        token = (
            await call(admin, "admin.token.create", p.CreateToken(tier="bench"), p.TokenCreated)
        ).token
        backend: WireGuardBackend
        if backend_kind == "uapi":
            from damm.netns import Lab
            from damm.wireguard.uapi import UapiBackend

            lab = Lab()
            ns = await lab.netns("gw")
            daemon = await lab.wireguard_go(ns, "b")
            backend = UapiBackend(daemon.ifname)
        else:
            backend = MemoryBackend()
        agent = GatewayAgent(
            AgentConfig(
                gateway_id="gw1",
                token=added.token,
                nats_url=nats_server.url,
                state_dir=root / "agent",
                heartbeat_s=2.0,
                usage_s=5.0,
            ),
            backend,
        )
        added_at: dict[str, float] = {}
        removed_at: dict[str, float] = {}

        def on_applied(change: PeerDiff, at: float) -> None:
            for peer in change.add:
                added_at[peer.public_key] = at
            for key in change.remove:
                removed_at.setdefault(key, at)
            for peer in change.update:  # a leaving peer is cleared first: its traffic stops here
                if not peer.allowed_ips:
                    removed_at[peer.public_key] = at

        agent.on_applied.append(on_applied)
        stop = asyncio.Event()
        agent_task = asyncio.create_task(agent.run(stop))
        await asyncio.wait_for(agent.synced.wait(), 10)
        while plane.ctx.state.gateways["gw1"].last_heartbeat is None:  # type: ignore[union-attr]  # noqa: ASYNC110
            await asyncio.sleep(0.01)

        replied: dict[str, float] = {}
        revoke_sent: dict[str, float] = {}
        revoke_done: dict[str, float] = {}
        enrolled: list[tuple[str, str]] = []  # (device_id, public_key) not yet revoked
        conflicts: list[str] = []

        async def do_enroll() -> None:
            _, pub = keypair()
            res = await call(
                device,
                "enroll",
                p.Enroll(token=token, public_key=pub, request_id=uuid.uuid4().hex),
                p.Enrolled,
            )
            replied[pub] = time.monotonic()
            enrolled.append((res.device_id, pub))

        async def do_revoke(device_id: str, pub: str) -> None:
            revoke_sent[pub] = time.monotonic()
            for _ in range(20):  # revoke and enroll race on the token aggregate (OCC)
                try:
                    await call(
                        admin, "admin.device.revoke", p.DeviceAction(device_id=device_id), p.Done
                    )
                    revoke_done[pub] = time.monotonic()
                    return
                except DammError as err:
                    if err.code is not Code.CONFLICT:
                        raise
                    conflicts.append(pub)

        tasks: list[asyncio.Task[None]] = []
        start = time.monotonic()
        for i in range(changes):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            if i % 2 == 1 and len(enrolled) > 5:
                device_id, pub = enrolled.pop(0)
                tasks.append(asyncio.create_task(do_revoke(device_id, pub)))
            else:
                tasks.append(asyncio.create_task(do_enroll()))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 10

        def pending() -> bool:
            return any(k not in added_at for k in replied) or any(
                k not in removed_at for k in revoke_sent
            )

        # polling what the watcher task records, bounded by a deadline
        while pending() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        enroll_ms = [max(0.0, added_at[k] - t) * 1000 for k, t in replied.items() if k in added_at]
        revoke_ms = [(removed_at[k] - t) * 1000 for k, t in revoke_sent.items() if k in removed_at]
        committed_ms = [
            max(0.0, removed_at[k] - t) * 1000 for k, t in revoke_done.items() if k in removed_at
        ]
        missing = (len(replied) - len(enroll_ms), len(revoke_sent) - len(revoke_ms))
        print(
            f"backend={backend_kind} changes={changes} offered={rate:g}/s "
            f"achieved={changes / elapsed:.1f}/s resyncs={agent.resyncs} missing={missing} "
            f"revoke-conflict-retries={len(conflicts)}"
        )
        for name, values, target in (
            ("enroll->applied", enroll_ms, TARGET_ENROLL_MS),
            ("revoke sent->removed", revoke_ms, TARGET_REVOKE_MS),
            ("revoke reply->removed", committed_ms, TARGET_REVOKE_MS),
        ):
            p50, p99 = statistics.median(values), pct(values, 99)
            print(
                f"  {name}: n={len(values)} p50={p50:.1f} ms p99={p99:.1f} ms "
                f"max={max(values):.1f} ms  target p99<={target:.0f} ms "
                f"ratio={p99 / target:.2f}"
            )
        stop.set()
        await asyncio.wait_for(agent_task, 10)
        await admin.close()
        await device.close()
    finally:
        users_stop.set()
        await users
        await plane.stop()
        if lab is not None:
            await lab.close()
        nats_server.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--changes", type=int, default=400)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--backend", choices=("uapi", "memory"), default="uapi")
    args = parser.parse_args()
    asyncio.run(main(args.changes, args.rate, args.backend))
