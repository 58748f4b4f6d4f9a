"""Benchmark: reconcile() over the UAPI socket versus ``wg syncconf`` on wireguard-go.

Run as root: ``.venv/bin/python bench/bench_wg_resync.py [--peers 10000] [--repeat 5]``.

(b) full resync of N peers onto an empty interface: reconcile() vs ``wg syncconf``.
(c) one peer changed in an N-peer set: reconcile() (read + diff + apply) vs ``wg syncconf`` of
    the unchanged set (the cheapest thing the stock tool can do: read and compare).
(d) one change in an N-peer set on the agent's change path (what it does for every published
    change: diff from what it applied, one ``set=1``, no read): add, update and removal (the
    removal clears the peer's allowed IPs; the removal proper follows the next metering read,
    a full read off the change path, timed separately). Target: <= 10 ms absolute.
Both sides run against the same daemon in the same run, so the ratio is what matters.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from damm.agent.runner import AgentConfig, GatewayAgent
from damm.netns import Lab, can_run_netns, run
from damm.protocol import messages as p
from damm.wireguard import reconcile
from damm.wireguard.peer_diff import Peer, diff
from damm.wireguard.uapi import UapiBackend, build_set_request, parse_get_reply


def public_key() -> str:
    """A random key a validator accepts: below 2^255 (so under p, almost surely not low order)."""
    raw = bytearray(os.urandom(32))
    raw[31] &= 0x7F
    return base64.b64encode(bytes(raw)).decode()


def make_peers(count: int) -> dict[str, Peer]:
    peers = {}
    for i in range(count):
        key = public_key()
        peers[key] = Peer(key, (f"10.{44 + i // 65536}.{i // 256 % 256}.{i % 256}/32",))
    return peers


def write_conf(path: Path, private_key: str, port: int, peers: dict[str, Peer]) -> None:
    lines = ["[Interface]", f"PrivateKey = {private_key}", f"ListenPort = {port}", ""]
    for peer in peers.values():
        lines += ["[Peer]", f"PublicKey = {peer.public_key}"]
        if peer.allowed_ips:
            lines.append(f"AllowedIPs = {', '.join(peer.allowed_ips)}")
        lines.append("")
    path.write_text("\n".join(lines))
    path.chmod(0o600)


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


async def main(count: int, repeat: int) -> int:
    ok, reason = can_run_netns()
    if not ok:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    async with Lab() as lab:
        ns = await lab.netns("bench")
        daemon = await lab.wireguard_go(ns, "b")
        backend = UapiBackend(daemon.ifname)
        private = base64.b64encode(os.urandom(32)).decode()
        await backend.set_identity(private, 51820)
        desired = make_peers(count)
        with tempfile.TemporaryDirectory(prefix="dmt-bench-") as tmp:
            full_conf, empty_conf = Path(tmp) / "full.conf", Path(tmp) / "empty.conf"
            write_conf(full_conf, private, 51820, desired)
            write_conf(empty_conf, private, 51820, {})

            async def syncconf(conf: Path) -> None:
                await run("wg", "syncconf", daemon.ifname, str(conf), time_limit=120)

            async def clear() -> None:
                await reconcile(backend, {})
                assert not (await backend.read()).peers

            # (b) full resync onto an empty interface
            rec_b: list[float] = []
            sync_b: list[float] = []
            for _ in range(repeat):
                await clear()
                rec_b.append(await timed(lambda: reconcile(backend, desired)))
                assert (await backend.read()).configured_peers() == desired
                await clear()
                sync_b.append(await timed(lambda: syncconf(full_conf)))
                assert len((await backend.read()).peers) == count

            # (c) one peer changed in a full set (interface holds `desired` now)
            await reconcile(backend, desired)
            victim = next(iter(desired))
            changed = dict(desired)
            changed[victim] = Peer(victim, ("10.250.0.1/32",))
            rec_c: list[float] = []
            for i in range(repeat * 2):
                target = changed if i % 2 == 0 else desired
                start = time.perf_counter()
                applied = await reconcile(backend, target)
                rec_c.append(time.perf_counter() - start)
                assert len(applied) == 1, applied.summary()
            assert (await backend.read()).configured_peers() == desired
            sync_c = [await timed(lambda: syncconf(full_conf)) for _ in range(repeat)]

            # (d) the agent's change path: one change at a time, from what it applied
            (Path(tmp) / "agent").mkdir()
            agent = GatewayAgent(
                AgentConfig("bench", "t", "nats://unused", Path(tmp) / "agent"), backend
            )
            async with agent._wg:
                await agent._reconcile(desired)
            revision = 0

            async def change(upserts: dict[str, Peer], removes: tuple[str, ...]) -> float:
                nonlocal revision
                agent._changes.append(
                    p.PeerSetChange(
                        "bench",
                        revision,
                        revision + 1,
                        tuple(p.PeerEntry(k, v.allowed_ips) for k, v in upserts.items()),
                        removes,
                    )
                )
                revision += 1
                return await timed(agent._apply_changes)

            d: dict[str, list[float]] = {"add": [], "update": [], "removal": [], "settle": []}
            for i in range(repeat * 2):
                fresh = public_key()
                d["add"].append(await change({fresh: Peer(fresh, (f"10.251.0.{i}/32",))}, ()))
                d["update"].append(await change({fresh: Peer(fresh, (f"10.252.0.{i}/32",))}, ()))
                d["removal"].append(await change({}, (fresh,)))

                d["settle"].append(await timed(agent.meter_and_settle))
            final = (await backend.read()).configured_peers()
            assert final == desired == agent.applied, "incremental path drifted from the set"

            # where reconcile's time goes on the one-change path
            reply = await backend._transact(b"get=1\n\n")
            t_read = statistics.median(
                [await timed(lambda: backend._transact(b"get=1\n\n")) for _ in range(repeat)]
            )
            t0 = time.perf_counter()
            state = parse_get_reply(reply)
            t_parse = time.perf_counter() - t0
            t0 = time.perf_counter()
            change = diff(state.configured_peers(), changed)
            t_diff = time.perf_counter() - t0
            payload = build_set_request(change)

    mb = len(reply) / 1e6
    print(f"peers: {count}, repeats: {repeat}, get=1 dump {mb:.1f} MB, daemon {daemon.ifname}")
    print("(b) full resync onto an empty interface (median)")
    b_rec, b_sync = statistics.median(rec_b), statistics.median(sync_b)
    print(f"    reconcile()   {ms(b_rec)}   runs: {' '.join(f'{x * 1000:.0f}' for x in rec_b)}")
    print(f"    wg syncconf   {ms(b_sync)}   runs: {' '.join(f'{x * 1000:.0f}' for x in sync_b)}")
    print(f"    ratio reconcile/syncconf = {b_rec / b_sync:.2f}x   (target <= 1.2x)")
    print("(c) one peer changed in the full set (median)")
    c_rec, c_sync = statistics.median(rec_c), statistics.median(sync_c)
    print(f"    reconcile()   {ms(c_rec)}   runs: {' '.join(f'{x * 1000:.0f}' for x in rec_c)}")
    print(f"    wg syncconf (no change) {ms(c_sync)}")
    print(
        f"    ratio reconcile/syncconf = {c_rec / c_sync:.2f}x   "
        f"(reconcile overhead vs syncconf {1000 * (c_rec - c_sync):+.1f} ms; target <= 10 ms)"
    )
    print(
        f"    breakdown: socket get=1 {ms(t_read)}, parse {ms(t_parse)}, diff {ms(t_diff)}, "
        f"set payload {len(payload)} bytes"
    )
    print("(d) one change on the agent's change path, no interface read (median)")
    for case, runs in d.items():
        label = "metering read+remove" if case == "settle" else case
        goal = "off the change path: a full read" if case == "settle" else "target <= 10 ms"
        print(f"    {label:22s}{ms(statistics.median(runs))}   max {ms(max(runs))}   ({goal})")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    sys.exit(asyncio.run(main(args.peers, args.repeat)))
