"""A JetStream cluster, control planes in their own processes, a steady enrollment load, faults,
and the invariants every run must keep (issue 11, "Done means").

Everything is real: three nats-server nodes on loopback, `damm control run` processes, the
session's PostgreSQL, and devices enrolling over request/reply as the anonymous device user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

from damm.errors import Code, DammError
from damm.events import codec
from damm.events import model as m
from damm.events.streams import ensure_streams
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.stack import processes
from damm.stack.control_process import spawn_control
from damm.stack.nats_cluster import NatsCluster, until_meta_leader
from damm.stack.nats_server import NatsServer
from damm.subjects import EVENT_PREFIX, EVENTS_STREAM
from tests.fleet import heartbeat, keypair, setup_fleet

OVERLAY = "10.64.0.0/16"
RETRIES = 3  # `damm device enroll` run again by a patient user, same key each time
RETRYABLE = {code.slug for code in Code if code.retryable}


@dataclass
class Attempt:
    request_id: str
    sent: float
    done: float
    code: str  # "ok" or the error code's slug
    device_id: str | None = None
    address: str | None = None
    detail: str = ""


@dataclass
class Outcome:
    public_key: str
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def enrolled(self) -> Attempt | None:
        return next((a for a in self.attempts if a.code == "ok"), None)


@dataclass
class Fault:
    name: str
    injected: float
    recovered: float


class Stack:
    """NATS (one node or a cluster), control planes as processes, the fleet's gateway."""

    def __init__(self, root: Path, dsn: str, *, nodes: int, planes: int) -> None:
        self.root = root
        self.dsn = dsn
        self.nodes = nodes
        self.cluster: NatsCluster | None = None
        self.single: NatsServer | None = None
        self.planes: list[subprocess.Popen[bytes] | None] = [None] * planes
        self.admin: NATS | None = None
        self.gateway: NATS | None = None
        self.fleet: dict[str, str] = {}
        self._beats: asyncio.Task[None] | None = None

    @property
    def servers(self) -> list[NatsServer]:
        if self.cluster is not None:
            return self.cluster.nodes
        assert self.single is not None
        return [self.single]

    @property
    def url(self) -> str:
        return ",".join(s.url for s in self.servers)

    @property
    def password(self) -> str:
        return self.servers[0].passwords["control"]

    async def start(self) -> None:
        if self.nodes > 1:
            self.cluster = NatsCluster(self.root / "cluster", self.nodes)
            await asyncio.to_thread(self.cluster.start)
        else:
            self.single = NatsServer(self.root / "nats")
            await asyncio.to_thread(self.single.start)
        nc = await connect(self.url, user="control", password=self.password, name="chaos-setup")
        try:
            await until_meta_leader(nc.jetstream())
            await ensure_streams(nc.jetstream(), min(self.nodes, 3))
        finally:
            await nc.close()
        for i in range(len(self.planes)):
            self.spawn_plane(i)
        passwords = self.servers[0].passwords
        self.admin = await connect(self.url, user="admin", password=passwords["admin"])
        # One gateway simulated over the operator's unrestricted user, as tests/conftest.py does.
        self.gateway = await connect(self.url, user="admin", password=passwords["admin"])
        await self._until_served()
        self.fleet = await setup_fleet(self.admin, self.gateway)
        self._beats = asyncio.create_task(self._heartbeats())

    def spawn_plane(self, i: int) -> None:
        self.planes[i] = spawn_control(
            self.url,
            self.dsn,
            self.password,
            self.root / "keys",  # shared: per-process catalog keys are issue 11, finding 1
            self.root / f"control-{i}.log",
            projectors=i == 0,
            stream_replicas=min(self.nodes, 3),
            log_level="warning",
            extra_env={"DAMM_OVERLAY": OVERLAY},
        )

    async def _until_served(self, timeout: float = 60.0) -> None:
        assert self.admin is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                probe = p.DefineTier(tier="gold", regions=("eu",))
                await call(self.admin, "admin.tier.define", probe, p.Done, timeout=2)
                return
            except DammError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def _heartbeats(self) -> None:
        """The gateway stays healthy for placement; a heartbeat lost to a fault is retried."""
        assert self.gateway is not None
        while True:
            with contextlib.suppress(DammError):
                await heartbeat(self.gateway, "gw1", self.fleet["gw1_token"])
            await asyncio.sleep(1.0)

    async def stream_leader(self) -> str:
        assert self.admin is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            info = await self.admin.jetstream().stream_info(EVENTS_STREAM)
            if info.cluster is not None and info.cluster.leader:
                return str(info.cluster.leader)
            if loop.time() > deadline:
                raise AssertionError("the event stream has no leader")
            await asyncio.sleep(0.1)

    def node(self, name: str) -> NatsServer:
        assert self.cluster is not None
        return self.cluster.node(name)

    async def stop(self) -> None:
        if self._beats is not None:
            self._beats.cancel()
            await asyncio.gather(self._beats, return_exceptions=True)
        for nc in (self.admin, self.gateway):
            if nc is not None:
                await nc.close()
        for proc in self.planes:
            if proc is not None:
                _resume(proc.pid)
                await asyncio.to_thread(processes.stop, proc)
        for server in self.servers:
            if server.proc is not None:
                _resume(server.proc.pid)
            await asyncio.to_thread(server.stop)


def _resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


# --- faults ---------------------------------------------------------------------------------------


async def kill_node(stack: Stack, name: str, down_s: float) -> Fault:
    node = stack.node(name)
    injected = time.monotonic()
    await asyncio.to_thread(node.kill)
    await asyncio.sleep(down_s)  # the outage itself
    await asyncio.to_thread(node.start)
    return Fault(f"SIGKILL {name}", injected, time.monotonic())


async def pause_node(stack: Stack, name: str, paused_s: float) -> Fault:
    node = stack.node(name)
    assert node.proc is not None
    injected = time.monotonic()
    os.kill(node.proc.pid, signal.SIGSTOP)
    await asyncio.sleep(paused_s)
    os.kill(node.proc.pid, signal.SIGCONT)
    return Fault(f"SIGSTOP {name}", injected, time.monotonic())


async def kill_plane(stack: Stack, i: int, down_s: float) -> Fault:
    proc = stack.planes[i]
    assert proc is not None
    injected = time.monotonic()
    proc.kill()
    await asyncio.to_thread(proc.wait)
    await asyncio.sleep(down_s)
    stack.spawn_plane(i)
    return Fault(f"SIGKILL control-{i}", injected, time.monotonic())


async def pause_plane(stack: Stack, i: int, paused_s: float) -> Fault:
    proc = stack.planes[i]
    assert proc is not None
    injected = time.monotonic()
    os.kill(proc.pid, signal.SIGSTOP)
    await asyncio.sleep(paused_s)
    os.kill(proc.pid, signal.SIGCONT)
    return Fault(f"SIGSTOP control-{i}", injected, time.monotonic())


def _family(pid: int) -> list[int]:
    """A process and its children (PostgreSQL's backends), for signalling them together."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return [pid]
    return [pid, *(int(c) for c in text.split())]


def postmaster(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


async def pause_postgres(pgdata: Path, paused_s: float) -> Fault:
    family = _family(postmaster(pgdata))
    injected = time.monotonic()
    for pid in family:
        os.kill(pid, signal.SIGSTOP)
    await asyncio.sleep(paused_s)
    for pid in family:
        _resume(pid)
    return Fault("SIGSTOP postgres", injected, time.monotonic())


# --- load ----------------------------------------------------------------------------------------


async def _enroll_until_answered(
    nc: NATS, token: str, out: Outcome, timeout: float, tries: int = RETRIES
) -> None:
    for _ in range(tries):
        request_id = uuid.uuid4().hex
        sent = time.monotonic()
        try:
            done = await call(
                nc,
                "enroll",
                p.Enroll(token=token, public_key=out.public_key, request_id=request_id),
                p.Enrolled,
                timeout=timeout,
            )
        except DammError as err:
            out.attempts.append(
                Attempt(request_id, sent, time.monotonic(), err.code.slug, detail=err.detail)
            )
            if not err.code.retryable:
                return
            continue
        out.attempts.append(
            Attempt(request_id, sent, time.monotonic(), "ok", done.device_id, done.address)
        )
        return


async def drive(
    stack: Stack, rate: float, duration: float, *, timeout: float = 5.0, connections: int = 4
) -> list[Outcome]:
    """Open-loop load: a new device every 1/rate seconds, whatever the answers are doing."""
    ncs = [await connect(stack.url, name=f"chaos-device-{i}") for i in range(connections)]
    outcomes: list[Outcome] = []
    tasks: list[asyncio.Task[None]] = []
    token = stack.fleet["token"]
    start = time.monotonic()
    try:
        for n in range(int(rate * duration)):
            wait = start + n / rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            out = Outcome(keypair()[1])
            outcomes.append(out)
            tasks.append(
                asyncio.create_task(
                    _enroll_until_answered(ncs[n % connections], token, out, timeout)
                )
            )
        await asyncio.gather(*tasks)
        # Later, each user whose every attempt failed runs `damm device enroll` once more: the
        # issue's invariant allows an enrollment recorded after its client was told it failed
        # only if such a retry returns it.
        settle = [o for o in outcomes if o.enrolled is None and o.attempts[-1].code in RETRYABLE]
        await asyncio.gather(
            *(
                _enroll_until_answered(ncs[n % connections], token, o, 10.0, tries=1)
                for n, o in enumerate(settle)
            )
        )
    finally:
        for nc in ncs:
            await nc.close()
    return outcomes


# --- invariants ----------------------------------------------------------------------------------


async def read_log(nc: NATS) -> list[m.Envelope]:
    js = nc.jetstream()
    last = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
    envs: list[m.Envelope] = []
    if last == 0:
        return envs
    sub = await js.subscribe(
        f"{EVENT_PREFIX}.>", stream=EVENTS_STREAM, ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )  # fmt: skip
    try:
        while True:
            msg = await sub.next_msg(timeout=10)
            seq = int(msg.metadata.sequence.stream)
            envs.append(codec.decode(msg.data, seq=seq))
            if seq >= last:
                return envs
    finally:
        await sub.unsubscribe()


def check_invariants(envs: Sequence[m.Envelope], outcomes: Sequence[Outcome]) -> list[str]:
    """Every broken invariant, in words; empty when the run kept them all."""
    problems: list[str] = []
    enrolled = [e for e in envs if isinstance(e.event, m.DeviceEnrolled)]
    by_key: dict[str, list[m.Envelope]] = {}
    for env in enrolled:
        by_key.setdefault(env.event.public_key, []).append(env)  # type: ignore[union-attr]

    def twice(what: str, values: list[str]) -> None:
        dup = [v for v, n in Counter(values).items() if n > 1]
        if dup:
            problems.append(f"{what} recorded twice: {dup[:5]} ({len(dup)})")

    twice("device", [e.event.device_id for e in enrolled])  # type: ignore[union-attr]
    twice("address", [e.event.address for e in enrolled])  # type: ignore[union-attr]
    twice("key", [e.event.public_key for e in enrolled])  # type: ignore[union-attr]
    twice("request", [e.correlation_id for e in enrolled])
    allocated = [e.event for e in envs if isinstance(e.event, m.AddressAllocated)]
    twice("address allocation", [a.address for a in allocated])
    bound = [e.event for e in envs if isinstance(e.event, m.KeyBound)]
    twice("key binding", [b.public_key for b in bound])
    used = [e for e in envs if isinstance(e.event, m.TokenUsed)]
    if len(used) != len(enrolled):
        problems.append(f"{len(used)} token uses for {len(enrolled)} enrollments")
    for out in outcomes:
        recorded = by_key.get(out.public_key, [])
        ok = out.enrolled
        if ok is None:
            if recorded:
                codes = [a.code for a in out.attempts]
                problems.append(f"enrollment recorded but its client was told {codes}")
            continue
        if not recorded:
            problems.append(f"acknowledged enrollment {ok.device_id} missing from the log")
            continue
        event = recorded[0].event
        address = (ok.address or "").split("/")[0]
        if event.device_id != ok.device_id or event.address != address:  # type: ignore[union-attr]
            problems.append(f"client got {ok.device_id} {address}, log has {event}")
    return problems


# --- figures -------------------------------------------------------------------------------------


def failure_window(outcomes: Sequence[Outcome], fault: Fault, slack: float = 6.0) -> float:
    """Seconds between the first and the last failed request sent around the fault (0 when
    none failed): how long a client would have seen errors."""
    failed = [
        a.sent
        for o in outcomes
        for a in o.attempts
        if a.code != "ok" and fault.injected - 1.0 <= a.sent <= fault.recovered + slack
    ]
    return max(failed) - min(failed) if failed else 0.0


def p99_outside(
    outcomes: Sequence[Outcome], faults: Sequence[Fault], slack: float = 6.0
) -> tuple[float, int]:
    """The 99th percentile latency of first attempts sent away from every fault, and how many."""
    latencies = sorted(
        o.attempts[0].done - o.attempts[0].sent
        for o in outcomes
        if o.attempts
        and not any(f.injected - 6.0 <= o.attempts[0].sent <= f.recovered + slack for f in faults)
    )
    if not latencies:
        return 0.0, 0
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], len(latencies)


def codes(outcomes: Sequence[Outcome]) -> Counter[str]:
    return Counter(a.code for o in outcomes for a in o.attempts)


def details(outcomes: Sequence[Outcome]) -> Counter[str]:
    """Why requests failed, with ids and correlation ids folded away."""
    return Counter(
        f"{a.code}: {a.detail.split('(')[0].strip()}"
        for o in outcomes
        for a in o.attempts
        if a.code != "ok"
    )


def unretried_failures(outcomes: Sequence[Outcome]) -> list[Outcome]:
    return [
        o for o in outcomes if o.enrolled is None and o.attempts[-1].code != Code.TOKEN_USED_UP.slug
    ]
