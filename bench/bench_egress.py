"""Benchmark: egress NAT reconcile for N devices against real nftables in a lab namespace.

Run as root: ``.venv/bin/python bench/bench_egress.py [--devices 10000] [--repeat 5]``.

(a) full: an empty namespace to N map elements (read + plan + one atomic batch).
(b) converged: a full reconcile when nothing changed (read + plan, no write).
(c) one change: one device revoked and one enrolled, as the agent applies a peer-set change
    (plan over the touched sources, one small batch, no read).
(d) the agent's change path: one peer-set change (one device revoked, one enrolled) through
    ``GatewayAgent._apply_changes`` with N peers carrying an egress address, over the in-memory
    interface and NAT table (``MemoryNat``), so what is timed is the agent's own work (building
    what the NAT map should hold, planning, bookkeeping); runs without root (``--agent-only``).
Baseline, same run, same namespace: the naive ruleset, one ``ip saddr X snat to Y`` rule per
device loaded with ``nft -f``, and one change made by rewriting that whole ruleset (the simple
way to stay exact without tracking rule handles).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from damm.agent import egress as nat
from damm.agent.runner import AgentConfig, GatewayAgent
from damm.netns import Lab, can_run_netns, exec_in
from damm.protocol import messages as p
from damm.wireguard.memory import MemoryBackend
from damm.wireguard.peer_diff import Peer


def devices(count: int, shift: int = 0) -> dict[str, str]:
    """Tunnel source → egress address, spread over a /26 of pool addresses."""
    return {
        f"10.{44 + i // 65536}.{i // 256 % 256}.{i % 256}": f"198.51.100.{1 + (i + shift) % 62}"
        for i in range(count)
    }


def naive_ruleset(want: dict[str, str]) -> str:
    lines = [
        "table ip dammnaive",
        "delete table ip dammnaive",
        "table ip dammnaive {",
        "  chain egress {",
        "    type nat hook postrouting priority srcnat; policy accept;",
    ]
    lines += [f"    ip saddr {src} snat to {dst}" for src, dst in want.items()]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def key(i: int) -> str:
    raw = bytearray(hashlib.sha256(str(i).encode()).digest())
    raw[31] &= 0x7F  # a canonical curve25519 u-coordinate
    return base64.b64encode(bytes(raw)).decode()


async def agent_change_path(count: int, repeat: int) -> list[float]:
    """Seconds per one-change apply on an agent carrying ``count`` peers with egress."""
    want = devices(count)
    with tempfile.TemporaryDirectory(prefix="dmt-bench-") as tmp:
        config = AgentConfig(gateway_id="gw1", token="t", nats_url="nats://unused",
                             state_dir=Path(tmp))  # fmt: skip
        table = nat.MemoryNat()
        agent = GatewayAgent(config, MemoryBackend(), nat.EgressReconciler(table))
        peers = {key(i): Peer(key(i), (f"{src}/32",)) for i, src in enumerate(want)}
        agent.egress_of = {key(i): dst for i, dst in enumerate(want.values())}
        async with agent._wg:
            await agent._reconcile(peers)
        out: list[float] = []
        for n in range(repeat):
            gone, new = key(n), key(count + n)
            change = p.PeerSetChange(
                "gw1", agent.revision, agent.revision + 1,
                (p.PeerEntry(new, (f"10.99.{n // 256}.{n % 256}/32",), "198.51.100.7"),),
                (gone,),
            )  # fmt: skip
            agent._changes.append(change)
            start = time.perf_counter()
            await agent._apply_changes()
            out.append(time.perf_counter() - start)
        assert table.elements == agent.nat_map()  # the change path kept the table exact
        return out


async def main(count: int, repeat: int, agent_only: bool) -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    path = await agent_change_path(count, max(repeat, 50))
    print(f"  (d) agent change path, {count:,} peers with egress, in memory: "
          f"median {ms(statistics.median(path))} max {ms(max(path))} over {len(path)}")  # fmt: skip
    if agent_only:
        return 0
    ok, reason = can_run_netns()
    if not ok:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    want = devices(count)
    changed = dict(want)
    gone = next(iter(changed))
    del changed[gone]
    changed["10.99.0.1"] = "198.51.100.7"
    touched = [gone, "10.99.0.1"]
    async with Lab() as lab:
        ns = await lab.netns("bench")
        backend = nat.Nftables(wrapper=("ip", "netns", "exec", ns), time_limit=120)
        full: list[float] = []
        converged: list[float] = []
        one: list[float] = []
        for _ in range(repeat):
            await exec_in(ns, "nft", "flush", "ruleset")
            rec = nat.EgressReconciler(backend)
            full.append(await timed(lambda r=rec: r.full(want)))  # type: ignore[misc]
            converged.append(await timed(lambda r=rec: r.full(want)))  # type: ignore[misc]
            one.append(await timed(lambda r=rec: r.change(changed, touched)))  # type: ignore[misc]
            assert nat.parse(await backend.read()).elements == changed
            await rec.change(want, touched)  # back, for the next round

        naive_full: list[float] = []
        naive_one: list[float] = []
        with tempfile.TemporaryDirectory(prefix="dmt-bench-") as tmp:
            before, after = Path(tmp) / "before.nft", Path(tmp) / "after.nft"
            before.write_text(naive_ruleset(want))
            after.write_text(naive_ruleset(changed))

            async def load(path: Path) -> None:
                await exec_in(ns, "nft", "-f", str(path), time_limit=300)

            for _ in range(repeat):
                await exec_in(ns, "nft", "flush", "ruleset")
                naive_full.append(await timed(lambda: load(before)))
                naive_one.append(await timed(lambda: load(after)))

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    print(f"egress NAT reconcile, {count:,} devices, median of {repeat}")
    print(f"  (a) full, empty -> {count:,} elements      {ms(med(full))}")
    print(f"  (b) full, nothing changed              {ms(med(converged))}")
    print(f"  (c) one change (revoke + enroll)       {ms(med(one))}")
    print(f"  baseline: one rule per device, full    {ms(med(naive_full))}")
    print(f"  baseline: one change = rewrite ruleset {ms(med(naive_one))}")
    print(
        f"  ratios: full {med(naive_full) / med(full):.1f}x faster than per-device rules; "
        f"one change {med(naive_one) / med(one):.1f}x faster than a rewrite, "
        f"{med(full) / med(one):.1f}x faster than our own full reconcile"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--agent-only", action="store_true", help="only (d): no root needed")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.devices, args.repeat, args.agent_only)))
