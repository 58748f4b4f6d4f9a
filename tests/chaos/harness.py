"""A JetStream cluster, control planes in their own processes, a steady enrollment load, faults,
and the invariants every run must keep (issue 11, "Done means").

Everything is real: three nats-server nodes on loopback, `damm control run` processes, the
session's PostgreSQL, and devices enrolling over request/reply as the anonymous device user.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

from damm.catalog.verify import TrustState, initial_trust
from damm.device.failover import fetch_catalog, verify_for_device
from damm.errors import Code, DammError
from damm.events import codec
from damm.events import model as m
from damm.events.streams import ensure_streams
from damm.private_files import load_or_create_seed
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.stack import processes
from damm.stack.control_process import spawn_control
from damm.stack.nats_cluster import NatsCluster, until_meta_leader
from damm.stack.nats_server import NatsServer
from damm.stack.postgres import Postgres
from damm.subjects import EVENT_PREFIX, EVENTS_STREAM
from tests.chaos.interface_db import Network
from tests.fleet import keypair

OVERLAY = "10.64.0.0/16"
RETRIES = 3  # `damm device enroll` run again by a patient user, same key each time
RETRYABLE = {code.slug for code in Code if code.retryable}
GATEWAYS = ("gw1", "gw2")
# What a device refuses in a catalog; any of these during a run is a broken invariant. Other
# failures (unavailable while a fault lasts) are a fetch that did not happen, not a bad catalog.
CATALOG_REFUSALS = {
    c.slug
    for c in (
        Code.CATALOG_STALE,
        Code.CATALOG_BAD_SIGNATURE,
        Code.CATALOG_UNKNOWN_KEY,
        Code.CATALOG_ROLLBACK,
        Code.CATALOG_WRONG_REGION,
        Code.INVALID_ARGUMENT,
    )
}


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
    trust: TrustState | None = None  # what the device pinned at enrollment, then each catalog

    @property
    def enrolled(self) -> Attempt | None:
        return next((a for a in self.attempts if a.code == "ok"), None)


@dataclass
class Fetch:
    """One device fetching its region's catalog and checking it, as `damm device failover`."""

    sent: float
    code: str  # "ok" or the error code's slug
    key_id: str = ""
    version: int = 0
    detail: str = ""


@dataclass
class Load:
    outcomes: list[Outcome]
    fetches: list[Fetch]


@dataclass
class Fault:
    name: str
    injected: float
    recovered: float
    target: str = ""


class Stack:
    """NATS (one node or a cluster), control planes and gateway agents as processes."""

    def __init__(
        self,
        root: Path,
        dsn: str,
        *,
        nodes: int,
        planes: int,
        pg: Postgres | None = None,
        log_level: str = "warning",  # of the control planes; "info" shows reconnects and resumes
    ) -> None:
        self.root = root
        self.log_level = log_level
        self.dsn = dsn
        self.pg = pg  # the run's own PostgreSQL, when a fault may kill it
        self.nodes = nodes
        self.cluster: NatsCluster | None = None
        self.single: NatsServer | None = None
        self.planes: list[subprocess.Popen[bytes] | None] = [None] * planes
        self.agents: dict[str, subprocess.Popen[bytes] | None] = dict.fromkeys(GATEWAYS)
        self.admin: NATS | None = None
        self.fleet: dict[str, str] = {}
        self.networks: dict[str, Network] = {}
        self._traffic: asyncio.Task[None] | None = None

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
    def kek_file(self) -> Path:
        return self.root / "kek"

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
        # Every replica opens the one keyring sealed in the log, so all share one KEK.
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        load_or_create_seed(self.kek_file, "key-encryption key")
        for i in range(len(self.planes)):
            self.spawn_plane(i)
        self.admin = await connect(
            self.url, user="admin", password=self.servers[0].passwords["admin"]
        )
        await self._until_served()
        await self._setup_fleet()
        for gw in GATEWAYS:
            self.networks[gw] = Network(self.root / f"{gw}.interface.db")
            self.spawn_agent(gw)
        await self._until_placing()
        self._traffic = asyncio.create_task(self._move_traffic())

    def spawn_plane(self, i: int) -> None:
        self.planes[i] = spawn_control(
            self.url,
            self.dsn,
            self.password,
            self.root / "keys",
            self.root / f"control-{i}.log",
            projectors=i == 0,
            stream_replicas=min(self.nodes, 3),
            log_level=self.log_level,
            extra_env={"DAMM_OVERLAY": OVERLAY},
            kek_file=self.kek_file,
        )

    def spawn_agent(self, gw: str) -> None:
        """The gateway's agent, on the same state directory (key, usage ledger) and interface.

        It logs in as the operator's user rather than its own gw-<id>: per-gateway NATS users
        are how the stack provisions accounts, which is not what these runs are about.
        """
        argv = [sys.executable, "-m", "tests.chaos.agent_proc", gw, self.fleet[f"{gw}_token"]]
        argv += [self.url, str(self.root / f"{gw}-state"), str(self.root / f"{gw}.interface.db")]
        argv += ["admin", self.servers[0].passwords["admin"]]
        cwd = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": cwd}
        self.agents[gw] = processes.spawn(argv, log=self.root / f"{gw}-agent.log", env=env)

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

    async def _setup_fleet(self) -> None:
        """A tier, gateways added but not registered (their agents register), and a token."""
        assert self.admin is not None
        for n, gw in enumerate(GATEWAYS):
            added = await call(
                self.admin,
                "admin.gateway.add",
                p.AddGateway(gateway_id=gw, region="eu", front_door=f"192.0.2.{n + 1}:51820"),
                p.GatewayAdded,
            )
            self.fleet[f"{gw}_token"] = added.token
        created = await call(
            self.admin, "admin.token.create", p.CreateToken(tier="gold"), p.TokenCreated
        )
        self.fleet["token"] = created.token

    async def _until_placing(self, timeout: float = 60.0) -> None:
        """Until both agents have registered and heartbeated: a probe device is placed on each."""
        assert self.admin is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        placed: set[str] = set()
        while placed != set(GATEWAYS):
            try:
                done = await call(
                    self.admin,
                    "enroll",
                    p.Enroll(
                        token=self.fleet["token"],
                        public_key=keypair()[1],
                        request_id=uuid.uuid4().hex,
                    ),
                    p.Enrolled,
                    timeout=5,
                )
                placed.add(done.gateway_id)
            except DammError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def _move_traffic(self) -> None:
        """Bytes over every live peer of every gateway, each second, whatever else happens.

        A tick the interface cannot take (its agent paused inside a write) is skipped whole.
        """
        tick = 0
        while True:
            tick += 1
            for net in self.networks.values():
                with contextlib.suppress(sqlite3.OperationalError):
                    await asyncio.to_thread(net.move, 1000 + tick, 500 + tick)
            await asyncio.sleep(1.0)

    async def stop_traffic(self) -> None:
        if self._traffic is not None:
            self._traffic.cancel()
            await asyncio.gather(self._traffic, return_exceptions=True)
            self._traffic = None

    async def stream_leader(self) -> str:
        assert self.admin is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            with contextlib.suppress(Exception):  # a node may be down or paused
                js = self.admin.jetstream(timeout=2)
                info = await js.stream_info(EVENTS_STREAM)
                if info.cluster is not None and info.cluster.leader:
                    return str(info.cluster.leader)
            if loop.time() > deadline:
                raise AssertionError("the event stream has no leader")
            await asyncio.sleep(0.1)

    async def meta_leader(self) -> str:
        """The node leading JetStream's meta group (consumer and stream creation go through
        it), or the error's repr while a node is down or paused."""
        sys_password = self.servers[0].passwords["sys"]
        nc = await connect(self.url, user="sys", password=sys_password, name="chaos-meta")
        try:
            msg = await nc.request("$SYS.REQ.SERVER.PING.JSZ", b"", timeout=2)
            return str(json.loads(msg.data)["data"]["meta_cluster"].get("leader", ""))
        except Exception as exc:
            return repr(exc)
        finally:
            await nc.close()

    async def follower(self) -> str:
        """A NATS node that does not lead the event stream."""
        leader = await self.stream_leader()
        return next(n.server_name for n in self.servers if n.server_name != leader)

    def node(self, name: str) -> NatsServer:
        assert self.cluster is not None
        return self.cluster.node(name)

    async def stop(self) -> None:
        await self.stop_traffic()
        if self.admin is not None:
            await self.admin.close()
        for proc in (*self.agents.values(), *self.planes):
            if proc is not None:
                _resume(proc.pid)
                await asyncio.to_thread(processes.stop, proc)
        for net in self.networks.values():
            net.close()
        for server in self.servers:
            if server.proc is not None:
                _resume(server.proc.pid)
            await asyncio.to_thread(server.stop)


def _resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


# --- faults ---------------------------------------------------------------------------------------


async def kill_node(stack: Stack, role: str, down_s: float) -> Fault:
    """SIGKILL the event stream's leader (``role="leader"``) or another node, then restart it."""
    name = await stack.stream_leader() if role == "leader" else await stack.follower()
    node = stack.node(name)
    injected = time.monotonic()
    await asyncio.to_thread(node.kill)
    await asyncio.sleep(down_s)  # the outage itself
    await asyncio.to_thread(node.start)
    return Fault(f"SIGKILL {role} node", injected, time.monotonic(), name)


async def pause_node(stack: Stack, role: str, paused_s: float) -> Fault:
    name = await stack.stream_leader() if role == "leader" else await stack.follower()
    node = stack.node(name)
    assert node.proc is not None
    injected = time.monotonic()
    os.kill(node.proc.pid, signal.SIGSTOP)
    await asyncio.sleep(paused_s)
    os.kill(node.proc.pid, signal.SIGCONT)
    return Fault(f"SIGSTOP {role} node", injected, time.monotonic(), name)


async def kill_plane(stack: Stack, i: int, down_s: float) -> Fault:
    proc = stack.planes[i]
    assert proc is not None
    injected = time.monotonic()
    proc.kill()
    await asyncio.to_thread(proc.wait)
    await asyncio.sleep(down_s)
    stack.spawn_plane(i)
    return Fault("SIGKILL control plane", injected, time.monotonic(), f"control-{i}")


async def pause_plane(stack: Stack, i: int, paused_s: float) -> Fault:
    proc = stack.planes[i]
    assert proc is not None
    injected = time.monotonic()
    os.kill(proc.pid, signal.SIGSTOP)
    await asyncio.sleep(paused_s)
    os.kill(proc.pid, signal.SIGCONT)
    return Fault("SIGSTOP control plane", injected, time.monotonic(), f"control-{i}")


async def kill_agent(stack: Stack, gw: str, down_s: float) -> Fault:
    """SIGKILL a gateway agent; its interface keeps the peers and counts bytes meanwhile."""
    proc = stack.agents[gw]
    assert proc is not None
    injected = time.monotonic()
    proc.kill()
    await asyncio.to_thread(proc.wait)
    await asyncio.sleep(down_s)
    stack.spawn_agent(gw)
    return Fault("SIGKILL gateway agent", injected, time.monotonic(), gw)


async def pause_agent(stack: Stack, gw: str, paused_s: float) -> Fault:
    proc = stack.agents[gw]
    assert proc is not None
    injected = time.monotonic()
    os.kill(proc.pid, signal.SIGSTOP)
    await asyncio.sleep(paused_s)
    os.kill(proc.pid, signal.SIGCONT)
    return Fault("SIGSTOP gateway agent", injected, time.monotonic(), gw)


def _family(pid: int) -> list[int]:
    """A process and its children (PostgreSQL's backends), for signalling them together."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return [pid]
    return [pid, *(int(c) for c in text.split())]


def postmaster(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


async def pause_postgres(pg: Postgres, paused_s: float) -> Fault:
    family = _family(postmaster(pg.pgdata))
    injected = time.monotonic()
    for pid in family:
        with contextlib.suppress(ProcessLookupError):  # a backend that just ended
            os.kill(pid, signal.SIGSTOP)
    await asyncio.sleep(paused_s)
    for pid in family:
        _resume(pid)
    return Fault("SIGSTOP postgres", injected, time.monotonic(), "postgres")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie holds nothing


def _gone(pids: Sequence[int]) -> bool:
    return not any(_alive(pid) for pid in pids)


async def kill_postgres(pg: Postgres, down_s: float) -> Fault:
    """SIGKILL the postmaster and every backend (a crashed host), then start it again: it runs
    crash recovery from its WAL, as after a power cut."""
    family = _family(postmaster(pg.pgdata))
    injected = time.monotonic()
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not _gone(family):
        if time.monotonic() > deadline:
            raise AssertionError(f"postgres processes {family} outlived SIGKILL")
        await asyncio.sleep(0.05)
    # The lock files name a dead postmaster; one not yet reaped by its parent still looks alive
    # to the next start's check, which a crashed host would not have.
    for lock in (pg.pgdata / "postmaster.pid", *pg.pgdata.glob(".s.PGSQL.*.lock")):
        lock.unlink()
    await asyncio.sleep(down_s)
    await asyncio.to_thread(pg._server.ensure_postgres_running)
    return Fault("SIGKILL postgres", injected, time.monotonic(), "postgres")


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
        if done.catalog is not None:
            c = done.catalog
            out.trust = initial_trust(c.region, c.key_id, c.public_key, c.min_version)
        return


async def _fetch_catalogs(
    nc: NATS, outcomes: list[Outcome], fetches: list[Fetch], rate: float
) -> None:
    """Enrolled devices fetch their catalog and check it, as failover would, ``rate`` a second.

    Each accepted catalog moves the device's trust on (its version floor, announced keys), so
    a later fetch of an older version is refused as a rollback: what a real device would see.
    """
    rng = random.Random(11)
    while True:
        await asyncio.sleep(1 / rate)
        enrolled = [o for o in outcomes[-2000:] if o.trust is not None]
        if not enrolled:
            continue
        out = rng.choice(enrolled)
        trust = out.trust
        assert trust is not None
        sent = time.monotonic()
        try:
            signed = await fetch_catalog(nc, trust.region, timeout=2.0)
            checked = verify_for_device(signed, trust, now=int(time.time()))
        except DammError as err:
            fetches.append(Fetch(sent, err.code.slug, detail=err.detail))
            continue
        out.trust = checked.trust
        fetches.append(Fetch(sent, "ok", checked.key_id, checked.catalog.version))


async def drive(
    stack: Stack,
    rate: float,
    duration: float,
    *,
    timeout: float = 5.0,
    connections: int = 4,
    fetch_rate: float = 10.0,
) -> Load:
    """Open-loop load: a new device every 1/rate seconds, whatever the answers are doing, and
    devices checking their catalog meanwhile."""
    ncs = [await connect(stack.url, name=f"chaos-device-{i}") for i in range(connections)]
    load = Load([], [])
    outcomes = load.outcomes
    tasks: list[asyncio.Task[None]] = []
    token = stack.fleet["token"]
    fetcher = asyncio.create_task(_fetch_catalogs(ncs[0], outcomes, load.fetches, fetch_rate))
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
        fetcher.cancel()
        await asyncio.gather(fetcher, return_exceptions=True)
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
        fetcher.cancel()
        await asyncio.gather(fetcher, return_exceptions=True)
        for nc in ncs:
            await nc.close()
    return load


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


def check_catalogs(fetches: Sequence[Fetch]) -> list[str]:
    """Every catalog a device fetched verified, all under one key; a version that went back
    is a refusal too (``catalog_rollback``), since each device's trust remembers its floor."""
    problems: list[str] = []
    refused = Counter(
        f"{f.code}: {f.detail.split('(')[0].strip()}" for f in fetches if f.code in CATALOG_REFUSALS
    )
    if refused:
        problems.append(f"devices refused catalogs: {dict(refused.most_common(5))}")
    accepted = [f for f in fetches if f.code == "ok"]
    if not accepted:
        problems.append(f"no device fetched a catalog ({len(fetches)} tries)")
    keys = Counter(f.key_id for f in accepted)
    if len(keys) > 1:
        problems.append(f"catalogs signed by several keys: {dict(keys)}")
    return problems


def log_peer_sets(envs: Sequence[m.Envelope]) -> dict[str, dict[str, str]]:
    """Each gateway's peers as the log has them: public key -> tunnel address."""
    sets: dict[str, dict[str, str]] = {}
    where: dict[str, tuple[str, str]] = {}
    for env in envs:
        e = env.event
        if isinstance(e, m.DeviceEnrolled):
            sets.setdefault(e.gateway_id, {})[e.public_key] = e.address
            where[e.device_id] = (e.gateway_id, e.public_key)
        elif isinstance(e, m.DeviceRevoked) and e.device_id in where:
            gw, key = where.pop(e.device_id)
            sets[gw].pop(key, None)
    return sets


async def converge_peers(
    stack: Stack, envs: Sequence[m.Envelope], timeout: float = 60.0
) -> list[str]:
    """Wait until every gateway's interface holds exactly the log's peer set for it."""
    want = log_peer_sets(envs)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        problems = []
        for gw, net in stack.networks.items():
            have = await asyncio.to_thread(net.peers)
            expect = want.get(gw, {})
            missing = expect.keys() - have.keys()
            extra = have.keys() - expect.keys()
            wrong = [k for k in expect.keys() & have.keys() if f"{expect[k]}/32" not in have[k]]
            if missing or extra or wrong:
                problems.append(
                    f"peers on {gw} never converged: {len(missing)} missing, {len(extra)} extra,"
                    f" {len(wrong)} with another address, of {len(expect)}"
                )
        if not problems or loop.time() > deadline:
            return problems
        await asyncio.sleep(0.5)


async def moved_bytes(stack: Stack) -> dict[str, tuple[int, int]]:
    moved: dict[str, tuple[int, int]] = {}
    for net in stack.networks.values():
        moved.update(await asyncio.to_thread(net.moved))
    return {k: v for k, v in moved.items() if v != (0, 0)}


async def exact_usage(stack: Stack, envs: Sequence[m.Envelope], timeout: float = 60.0) -> list[str]:
    """Wait until the read models' usage totals equal the bytes the network moved, device by
    device (traffic stopped first). Over is a double count, under a loss."""
    key_of = {
        e.event.device_id: e.event.public_key for e in envs if isinstance(e.event, m.DeviceEnrolled)
    }
    moved = await moved_bytes(stack)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    error = ""
    while True:
        have: dict[str, tuple[int, int]] = {}
        try:
            conn = await asyncpg.connect(stack.dsn, server_settings={"search_path": "damm"})
            try:
                rows = await conn.fetch(
                    "SELECT device_id, sum(rx_bytes) AS rx, sum(tx_bytes) AS tx"
                    " FROM usage_totals GROUP BY device_id"
                )
            finally:
                await conn.close()
            have = {key_of.get(r["device_id"], r["device_id"]): (r["rx"], r["tx"]) for r in rows}
            have = {k: (int(rx), int(tx)) for k, (rx, tx) in have.items() if (rx, tx) != (0, 0)}
        except (OSError, asyncpg.PostgresError) as exc:  # PostgreSQL may be restarting
            error = repr(exc)
        if have == moved:
            return []
        if loop.time() > deadline:
            over = [k for k in have if k in moved and have[k] > moved[k]]
            under = [k for k in moved if have.get(k, (0, 0)) < moved[k]]
            return [
                f"usage totals not exact: {len(over)} devices over (counted twice), {len(under)}"
                f" under (lost), {len(have.keys() - moved.keys())} unknown, of {len(moved)}"
                f" that moved bytes; {sum(a + b for a, b in moved.values())} bytes moved,"
                f" {sum(a + b for a, b in have.values())} in the read models {error}".rstrip()
            ]
        await asyncio.sleep(0.5)


def check_usage_log(envs: Sequence[m.Envelope], moved: dict[str, tuple[int, int]]) -> list[str]:
    """The log itself holds each report once and adds up to what moved."""
    problems: list[str] = []
    key_of = {
        e.event.device_id: e.event.public_key for e in envs if isinstance(e.event, m.DeviceEnrolled)
    }
    reports = [e.event for e in envs if isinstance(e.event, m.UsageReported)]
    numbered = [(r.ledger_id, r.report_seq) for r in reports if r.ledger_id]
    dup = [str(k) for k, n in Counter(numbered).items() if n > 1]
    dup += [k for k, n in Counter(r.report_id for r in reports).items() if n > 1]
    if dup:
        problems.append(f"usage reports recorded twice: {dup[:3]} ({len(dup)})")
    total: dict[str, tuple[int, int]] = {}
    for r in reports:
        for d in r.deltas:
            key = key_of.get(d.device_id, d.device_id)
            rx, tx = total.get(key, (0, 0))
            total[key] = (rx + d.rx_bytes, tx + d.tx_bytes)
    if total != moved:
        differ = sum(1 for k in moved.keys() | total.keys() if total.get(k) != moved.get(k))
        problems.append(f"usage in the log differs from what moved for {differ} devices")
    return problems


# --- figures -------------------------------------------------------------------------------------


def failure_window(
    outcomes: Sequence[Outcome], fault: Fault, slack: float = 6.0, until: float = math.inf
) -> float:
    """Seconds between the first and the last failed request sent around the fault (0 when
    none failed): how long a client would have seen errors. ``until``: the next fault's
    injection, whose failures are not this one's."""
    end = min(fault.recovered + slack, until)
    failed = [
        a.sent
        for o in outcomes
        for a in o.attempts
        if a.code != "ok" and fault.injected - 1.0 <= a.sent < end
    ]
    return max(failed) - min(failed) if failed else 0.0


def windows_of(outcomes: Sequence[Outcome], faults: Sequence[Fault]) -> list[float]:
    """Each fault's failure window, cut where the next fault begins."""
    ends = [*(f.injected for f in faults[1:]), math.inf][: len(faults)]
    return [failure_window(outcomes, f, until=end) for f, end in zip(faults, ends, strict=True)]


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
