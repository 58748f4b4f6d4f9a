"""CPU the auth callout spends per connection, in process, on requests a real nats-server made.

A nats-server in the shipped callout layout is asked to admit devices (half of them enrolled,
so both the DEV and the ANON grant are measured); every authorization request it sends is kept.
Then, without a server, each kept request goes through what the callout does with it: read the
server's JWT, decide from the fold (the nonce signature checked), build and sign the answer.
Prints microseconds per connection (median of rounds) and, with --profile, where they go.
--live N measures connections as they really run: a child process opens and closes N of them,
anonymous in the static layout and with identities through the CalloutService in this process
(nats-py reading, dispatching, writing included), A B B A; CPU per connection of each party.

    .venv/bin/python bench/bench_callout.py [--n 200] [--rounds 30] [--profile] [--live 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nats.aio.msg import Msg

from damm import log
from damm.control import callout
from damm.control.state import DecisionState, DeviceState
from damm.domain.ipam import Overlay
from damm.errors import DammError
from damm.keys import nats_identity
from damm.protocol.bus import connect
from damm.stack.nats_server import NatsServer


def _state(identities: list[str]) -> DecisionState:
    state = DecisionState(Overlay.parse("10.40.0.0/14"))
    for i, identity in enumerate(identities):
        device_id = f"d{i}"
        state.devices[device_id] = DeviceState(
            device_id=device_id, public_key="pk", token_id="t", tier="gold", gateway_id="gw1",
            front_door_id="fd1", egress_pool_id=None, address=f"10.40.0.{i % 250 + 2}/14",
            index=i + 2, status="active", identity_key=identity,
        )  # fmt: skip
        state.identities[identity] = device_id
    return state


async def capture(n: int) -> tuple[list[bytes], DecisionState, bytes]:
    """``n`` authorization requests as nats-server sends them, and a fold knowing half the keys."""
    root = Path(tempfile.mkdtemp(prefix="damm-bench-callout-", dir="/tmp"))
    server = NatsServer(root / "nats", callout=True)
    url = server.start()
    seeds = [nats_identity.new_user_seed() for _ in range(n)]
    keys = [nats_identity.public_key(seed) for seed in seeds]
    state = _state(keys[: n // 2])
    service = callout.CalloutService(
        await connect(url, user="control", password=server.passwords["control"]),
        state,
        server.callout_seed,
    )
    kept: list[bytes] = []
    answer = service._on_request

    async def keep(msg: Msg) -> None:
        kept.append(bytes(msg.data))
        await answer(msg)

    service._on_request = keep  # type: ignore[method-assign]
    try:
        await service.start()
        for seed in seeds:
            nc = await connect(url, reconnect=False, identity_seed=seed)
            await nc.close()
        await service.stop()
        await service.nc.close()
    finally:
        server.stop()
    return kept, state, server.callout_seed


_ROOT = str(Path(__file__).resolve().parent.parent)
_CONNECTER = """
import asyncio, resource, sys
from damm import log
from damm.keys import nats_identity
from damm.protocol.bus import connect
log.configure("error", json=True)
url, n, concurrency, identities = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
seeds = [nats_identity.new_user_seed() if identities == "1" else None for _ in range(n)]
print("ready", flush=True)
sys.stdin.readline()
async def main():
    todo = iter(seeds)
    async def worker():
        for seed in todo:
            nc = await connect(url, reconnect=False, identity_seed=seed)
            await nc.close()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
before = resource.getrusage(resource.RUSAGE_SELF)
asyncio.run(main())
after = resource.getrusage(resource.RUSAGE_SELF)
print(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, flush=True)
"""


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def live(n: int, concurrency: int, identities: bool) -> dict[str, float]:
    """CPU per connection (us) of nats-server, the callout (this process) and the connecting
    client, while ``n`` connections are opened and closed, ``concurrency`` at a time: with
    identities through the callout, or without, anonymous in the static layout."""
    root = Path(tempfile.mkdtemp(prefix="damm-bench-callout-", dir="/tmp"))
    server = NatsServer(root / "nats", callout=identities)
    url = server.start()
    assert server.proc is not None
    service = None
    if identities:
        nc = await connect(url, user="control", password=server.passwords["control"])
        service = callout.CalloutService(nc, _state([]), server.callout_seed)
        await service.start()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CONNECTER, url, str(n), str(concurrency), str(int(identities)),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": _ROOT},
    )  # fmt: skip
    try:
        assert child.stdin is not None and child.stdout is not None
        await child.stdout.readline()
        before = resource.getrusage(resource.RUSAGE_SELF)
        nats_before = _cpu_s(server.proc.pid)
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        client_s = float((await child.stdout.readline()).decode())
        await child.wait()
        after = resource.getrusage(resource.RUSAGE_SELF)
        nats_s = _cpu_s(server.proc.pid) - nats_before
    finally:
        if service is not None:
            await service.stop()
            await service.nc.close()
        server.stop()
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "nats-server": nats_s / n * 1e6,
        "callout": used / n * 1e6 if identities else 0.0,
        "client": client_s / n * 1e6,
    }


def handle(data: bytes, state: DecisionState, service: callout.CalloutService) -> bytes:
    """The callout's work for one request, minus the network: what _on_request/_answer do."""
    req = nats_identity.unverified_claims(data, callout._RequestClaims)
    outcome: callout.Grant | Exception
    try:
        outcome = callout.decide(req.nats, state, service.passwords)
    except DammError as err:
        outcome = err
    assert not isinstance(outcome, Exception), outcome
    return callout.response(req.nats, outcome, service.issuer, time.time())


def main() -> None:
    log.configure("error", json=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--live", type=int, default=0, metavar="N", help="N real connections too")
    args = ap.parse_args()
    requests, state, seed = asyncio.run(capture(args.n))
    service = callout.CalloutService(None, state, seed)  # type: ignore[arg-type]
    for data in requests:
        handle(data, state, service)
    per_call: list[float] = []
    for _ in range(args.rounds):
        started = time.process_time()
        for data in requests:
            handle(data, state, service)
        per_call.append((time.process_time() - started) / len(requests) * 1e6)
    print(
        f"callout CPU per connection: median {statistics.median(per_call):.0f} us"
        f"  (min {min(per_call):.0f}, max {max(per_call):.0f};"
        f" {len(requests)} real server requests x {args.rounds} rounds;"
        f" request JWT {statistics.median(len(r) for r in requests):.0f} bytes)"
    )
    if args.live:
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for r in range(4):
            for identities in (False, True) if r % 2 == 0 else (True, False):
                runs[identities].append(asyncio.run(live(args.live, 8, identities)))
        print(
            f"live, CPU us per connection (connect, close), median of 4:  {'anonymous':>10} {'callout':>10}"
        )
        for part in ("nats-server", "callout", "client"):
            anon, ident = (statistics.median(run[part] for run in runs[i]) for i in (False, True))
            print(f"{part:58} {anon:10.0f} {ident:10.0f}")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.rounds):
            for data in requests:
                handle(data, state, service)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
