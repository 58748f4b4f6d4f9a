"""What device identities cost an enrollment: auth callout against anonymous access, same run.

Each enrollment is what a device really does once: connect, enroll, close. Before: the static
accounts layout, where a device connects anonymously (no_auth_user). After: the shipped
callout layout, where the device connects with its own nkey, the server asks the control
plane's callout who it is, and the reply comes to an inbox only it may read. Both run against
a control plane in its own process (`damm control run`), sync_interval always. The throttle on
unauthenticated requests is opened wide here: this measures the identity scheme, not the
limit (which an honest device never meets). Budget: at most 10% of throughput.

    .venv/bin/python bench/bench_identity.py [--n 1500] [--concurrency 32] [--rounds 2]
        [--spy DIR]

--spy DIR samples the control plane and the client with py-spy (installed separately) while
they enroll, and writes collapsed stacks to DIR, one file per process and layout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from nacl.public import PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from damm import log
from damm.events.streams import ensure_streams
from damm.keys import nats_identity
from damm.private_files import write_atomic
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.stack.nats_server import NatsServer
from damm.stack.postgres import Postgres
from tests.fleet import setup_fleet


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spy(
    directory: str | None, name: str, pid: int, identities: bool
) -> subprocess.Popen[bytes] | None:
    """py-spy sampling a Python process of the bench, until SIGINT; None if not asked for."""
    if directory is None or name == "nats":
        return None
    out = Path(directory) / f"{name}-{'identities' if identities else 'anonymous'}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["py-spy", "record", "--pid", str(pid), "--rate", "200", "--format", "raw"]
    return subprocess.Popen([*cmd, "--nonblocking", "-o", str(out)], stdout=subprocess.DEVNULL)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def closed_loop(
    fn: Callable[[int], Awaitable[None]], n: int, concurrency: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    next_i = 0

    async def worker() -> None:
        nonlocal next_i
        while next_i < n:
            i, next_i = next_i, next_i + 1
            started = time.perf_counter()
            await fn(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - started), latencies


async def measure(args: argparse.Namespace, *, identities: bool) -> tuple[float, float]:
    """Enrollments per second and p99 (ms), each a fresh connection, on a fresh stack."""
    label = "callout identities (shipped)" if identities else "anonymous devices (before)"
    root = Path(tempfile.mkdtemp(prefix="damm-bench-id-", dir="/tmp"))
    server = NatsServer(root / "nats", callout=identities)
    url = server.start()
    pg = Postgres(root / "pg", delete_on_stop=True)
    dsn = pg.start()
    env = {
        **os.environ,
        "DAMM_NATS_URL": url,
        "DAMM_DATABASE_URL": dsn,
        "DAMM_CONTROL_PASSWORD": server.passwords["control"],
        "DAMM_OVERLAY": "10.40.0.0/14",
        "DAMM_KEK": base64.b64encode(os.urandom(32)).decode(),
        "DAMM_LOG_LEVEL": "error",
        "DAMM_THROTTLE_CONNECTION": "100000/100000",
        "DAMM_THROTTLE_SOURCE": "100000/100000",
    }
    if identities:
        seed_file = root / "callout.seed"
        write_atomic(seed_file, server.callout_seed, mode=0o600)
        env["DAMM_CALLOUT_SEED_FILE"] = str(seed_file)
    damm = str(Path(sys.executable).parent / "damm")
    control = subprocess.Popen([damm, "control", "run", "--keys-dir", str(root / "keys")], env=env)
    try:
        admin = await connect(url, user="admin", password=server.passwords["admin"])
        await ensure_streams(admin.jetstream())
        for _ in range(100):
            try:
                await setup_fleet(admin, admin)
                break
            except Exception:
                await asyncio.sleep(0.2)
        token = (
            await call(admin, "admin.token.create", p.CreateToken(tier="gold"), p.TokenCreated)
        ).token
        pubs = [
            base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
            for _ in range(args.n)
        ]
        seeds = [nats_identity.new_user_seed() for _ in range(args.n)] if identities else []

        connects: list[float] = []

        async def enroll(i: int) -> None:
            started = time.perf_counter()
            nc = await connect(url, reconnect=False, identity_seed=seeds[i] if identities else None)
            connects.append(time.perf_counter() - started)
            try:
                body = p.Enroll(token=token, public_key=pubs[i], request_id=uuid.uuid4().hex)
                await call(nc, "enroll", body, p.Enrolled, timeout=30)
            finally:
                await nc.close()

        assert server.proc is not None
        pids = {"nats": server.proc.pid, "control": control.pid, "client": os.getpid()}
        spies = [spy(args.spy, name, pid, identities) for name, pid in pids.items()]
        cpu_before = {k: cpu_s(v) for k, v in pids.items()}
        rate, lat = await closed_loop(enroll, args.n, args.concurrency)
        for proc in spies:
            if proc is not None:
                proc.send_signal(signal.SIGINT)
                proc.wait(60)
        cpu = "  ".join(
            f"{k} {(cpu_s(v) - cpu_before[k]) / args.n * 1000:.2f}" for k, v in pids.items()
        )
        print(
            f"{label:34} {rate:8.0f} enrollments/s   p50 {statistics.median(lat) * 1000:6.1f} ms"
            f"   p99 {pct(lat, 0.99) * 1000:6.1f} ms"
            f"   connect p50 {statistics.median(connects) * 1000:5.1f} ms   CPU ms/enrollment: {cpu}"
        )
        await admin.close()
        return rate, pct(lat, 0.99) * 1000
    finally:
        control.terminate()
        control.wait(30)
        pg.stop()
        server.stop()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="before/after pairs, interleaved")
    ap.add_argument("--spy", metavar="DIR", help="py-spy the control plane and the client")
    args = ap.parse_args()
    log.configure("error", json=True)
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for r in range(args.rounds):
        for identities in (False, True) if r % 2 == 0 else (True, False):
            runs[identities].append(await measure(args, identities=identities))
    before = [statistics.median(col) for col in zip(*runs[False], strict=True)]
    after = [statistics.median(col) for col in zip(*runs[True], strict=True)]
    print()
    print(f"{'identities vs anonymous (same run, medians)':44} {'before':>9} {'after':>9}")
    print(f"{'enrollments/s (connect, enroll, close)':44} {before[0]:9.0f} {after[0]:9.0f}")
    print(f"{'p99 ms':44} {before[1]:9.1f} {after[1]:9.1f}")
    print(f"throughput cost of identities: {1 - after[0] / before[0]:.1%} (budget 10%)")


if __name__ == "__main__":
    asyncio.run(main())
