"""Orchestrator: plan time at fleet scale, and apply-to-healthy on the netns provider.

1. ``plan`` over 1,000 gateways in 10 regions (a mix of healthy, stale and dead, loads over and
   under target, front doors and egress to fix). Target: <= 50 ms.
2. From ``apply`` to the new gateway healthy (registered and heartbeating, as the control plane
   decides placement), one gateway per apply, on the netns provider: p50 and p99 over 10.
   Needs root and wireguard-go; skipped with a reason otherwise.

    .venv/bin/python bench/bench_orchestrator.py [--gateways 1000] [--regions 10] [--boots 10]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from damm import log
from damm.orchestrator import topology as t
from damm.orchestrator.fleet import Fleet, GatewayNow, PoolNow
from damm.orchestrator.plan import plan


def big_fleet(gateways: int, regions: int) -> tuple[t.Topology, Fleet]:
    rnd = random.Random(7)
    names = [f"r{n}" for n in range(regions)]
    topology = t.Topology(
        providers={"lab": t.Provider(kind="netns", price_per_gateway_month=5.0)},
        regions={
            name: t.Region(
                provider="lab",
                min_gateways=gateways // regions - 10,
                max_gateways=gateways // regions + 20,
                target_load=0.6,
                front_doors=("fd1", "fd2"),
                egress=(t.Egress(country="DE"), t.Egress(country="NL")),
            )
            for name in names
        },
        guardrails=t.Guardrails(max_changes_per_apply=50, cooldown_s=0, max_monthly_cost=1e9),
    )
    out = []
    for n in range(gateways):
        region = names[n % regions]
        status = rnd.choices(("healthy", "stale", "unregistered"), (90, 7, 3))[0]
        out.append(
            GatewayNow(
                gateway_id=f"{region}-{n // regions + 1}",
                region=region,
                status=status,  # type: ignore[arg-type]
                load=rnd.random(),
                devices_active=rnd.randint(0, 50),
                silent_s=rnd.choice((1.0, 30.0, 600.0)),
                front_doors={"fd1": True, "fd2": rnd.random() > 0.1},
                provider="lab",
                host="running" if rnd.random() > 0.02 else "missing",
            )
        )
    pools = tuple(
        PoolNow(pool_id=f"{r}-de", region=r, countries=("DE",), headroom=rnd.random())
        for r in names
    )
    return topology, Fleet(gateways=tuple(out), pools=pools)


def bench_plan(gateways: int, regions: int) -> None:
    topology, fleet = big_fleet(gateways, regions)
    now = datetime.now(UTC)
    times = []
    result = plan(topology, fleet, [], now)
    for _ in range(30):
        t0 = time.perf_counter()
        result = plan(topology, fleet, [], now)
        times.append((time.perf_counter() - t0) * 1000)
    print(
        f"plan: {gateways} gateways in {regions} regions -> {len(result.actions)} actions, "
        f"{len(result.refusals)} refusals; median {statistics.median(times):.1f} ms, "
        f"max {max(times):.1f} ms (target <= 50 ms)"
    )


async def bench_boot(boots: int) -> None:
    from damm import netns
    from damm.control.process import ControlPlane
    from damm.domain.ipam import Overlay
    from damm.keys.sealing import LocalKek
    from damm.orchestrator.loop import Orchestrator, build_providers
    from damm.orchestrator.providers.netns import NetnsProvider
    from damm.protocol.bus import connect
    from damm.settings import ControlSettings
    from damm.stack.gateway_users import follow_gateways
    from damm.stack.nats_server import NatsServer
    from damm.stack.postgres import Postgres

    ok, why = netns.can_run_netns()
    if not ok:
        print(f"apply-to-healthy: skipped ({why})")
        return
    root = Path(tempfile.mkdtemp(prefix="damm-bench-orch-", dir="/tmp"))
    nats = NatsServer(root / "nats")
    nats.start()
    pg = Postgres(root / "pg", delete_on_stop=True)
    dsn = pg.start()
    settings = ControlSettings(
        overlay=Overlay.parse("10.44.0.0/24"), keys_dir=root / "keys", kek=LocalKek.generate()
    )
    plane = ControlPlane(nats.url, dsn, settings, password=nats.passwords["control"])
    await plane.start()
    assert plane.ctx is not None
    stop = asyncio.Event()
    users = asyncio.create_task(follow_gateways(nats, plane.ctx.state, stop))
    admin = await connect(nats.url, user="admin", password=nats.passwords["admin"])
    spec = t.Provider(kind="netns", subnet="172.31.0.0/24", heartbeat_s=1.0)
    providers = {}
    try:
        latencies = []
        for n in range(1, boots + 1):
            topology = t.Topology(
                providers={"lab": spec},
                regions={"eu": t.Region(provider="lab", gateways=n, max_gateways=boots)},
                guardrails=t.Guardrails(cooldown_s=0),
            )
            providers = build_providers(topology, root / "orch")
            orch = Orchestrator(admin, dsn, topology, providers, root / "orch", nats.url)
            t0 = time.perf_counter()
            current = await orch.plan()
            await orch.apply(current)
            gid = f"eu-{n}"
            while True:
                gw = plane.ctx.state.gateways.get(gid)
                if gw is not None and gw.registered and gw.last_heartbeat is not None:
                    break
                if time.perf_counter() - t0 > 60:
                    raise TimeoutError(f"{gid} not healthy in 60 s")
                await asyncio.sleep(0.01)
            latencies.append(time.perf_counter() - t0)
        ordered = sorted(latencies)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        print(
            f"apply -> gateway healthy (netns, wireguard-go, heartbeat 1 s) over {boots}: "
            f"p50 {statistics.median(latencies):.2f} s, p99 {p99:.2f} s, "
            f"min {min(latencies):.2f} s"
        )
    finally:
        lab = providers.get("lab")
        if isinstance(lab, NetnsProvider):
            await lab.teardown()
        await admin.close()
        stop.set()
        await users
        await plane.stop()
        nats.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gateways", type=int, default=1000)
    parser.add_argument("--regions", type=int, default=10)
    parser.add_argument("--boots", type=int, default=10)
    args = parser.parse_args()
    log.configure("error", json=False)
    bench_plan(args.gateways, args.regions)
    asyncio.run(bench_boot(args.boots))


if __name__ == "__main__":
    main()
