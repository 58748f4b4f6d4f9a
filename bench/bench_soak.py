"""A slow soak: a fleet of gateways, some flapping, under steady enrollments and revokes.

Method (printed with the figures):
- real nats-server (sync_interval: always) and PostgreSQL; `damm control run` in its own process,
  so its RSS is its own (sampled from /proc every --rss-every seconds);
- the tier, token and gateways are written into the log with `append_many` (damm.dev.fleet_log);
  every gateway then runs a real `GatewayAgent` on the memory backend, in this process: it
  registers, resyncs its peer set page by page, follows `damm.peers.<id>`, heartbeats every
  --heartbeat seconds. The agents log in as the admin user (one NATS user per gateway would need
  1,000 bcrypt users reloaded into the server; the gateway account is not what is measured here);
- every --flap-every seconds, --flap-fraction of the gateways (not already down) stop: the agent
  disconnects and stops heartbeating; each comes back --down seconds later (a new agent on the
  same interface, which resyncs);
- enrollments (--enroll-rate/s, open loop) come from the device account over the real request
  path; revokes (--revoke-rate/s) of enrolled devices picked at random come from the admin user,
  retried on `conflict` as an operator's tool does;
- enrollment latency: request sent -> `Enrolled` received; errors counted by catalogued code;
- propagation: acknowledged (the reply received) -> the gateway's agent applied the change to
  its interface (its `on_applied` hook); applied before the reply reached us counts as 0. Only
  changes whose gateway's agent was up at the acknowledgement and stayed up until it applied
  count ("direct"); changes for a gateway that was down are "deferred" and reported apart
  (acknowledged -> applied after its agent came back and resynced);
- each figure belongs to the window in which its request was sent;
- at the end, with every agent back: every acknowledged enrollment is in the log (a
  `device.enrolled` event), in the read models (damm.devices, once the projector holds the whole
  log) and on its gateway's interface unless revoked; every acknowledged revoke is in the log,
  `revoked` in the read models, and gone from its gateway's peer set and interface;
- RSS: growth over the last --flat-minutes; the fleet grows by (enroll - revoke) devices per
  second, so the state's own growth is reported next to it (KB per device added).

    .venv/bin/python bench/bench_soak.py [--minutes 30] [--window 300] [--gateways 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from damm.agent.runner import AgentConfig, GatewayAgent
from damm.dev import fleet_log
from damm.dev.fleet_log import SyntheticFleet
from damm.errors import Code, DammError
from damm.events import codec
from damm.events import model as m
from damm.events.store import EventStore
from damm.events.streams import ensure_streams
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.stack.nats_server import NatsServer
from damm.stack.postgres import Postgres
from damm.wireguard.memory import MemoryBackend
from damm.wireguard.peer_diff import PeerDiff
from tests.fleet import keypair

OVERLAY = "10.32.0.0/12"
PROPAGATION_TARGET_MS = 100.0
RSS_GROWTH_TARGET = 0.05


@dataclass
class SoakConfig:
    minutes: float = 30.0
    window_s: float = 300.0
    gateways: int = 1000
    enroll_rate: float = 200.0
    revoke_rate: float = 20.0
    flap_fraction: float = 0.05
    flap_every_s: float = 60.0
    down_s: float = 30.0
    heartbeat_s: float = 10.0
    heartbeat_ttl_s: float = 25.0  # a flapping gateway goes stale while down
    flat_minutes: float = 20.0  # RSS growth is measured over the last this-many minutes
    rss_every_s: float = 5.0
    settle_s: float = 120.0  # the end: how long everything may take to converge


@dataclass
class Window:
    index: int
    start: float
    enroll_s: list[float] = field(default_factory=list)
    revoke_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    direct_ms: list[float] = field(default_factory=list)
    direct_from_sent_ms: list[float] = field(default_factory=list)
    deferred_ms: list[float] = field(default_factory=list)
    unobserved: int = 0
    superseded: int = 0  # enrolled and revoked while its gateway was down: never applied
    rss_mb: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)  # this process's event loop, every 0.1 s
    devices_at_end: int = 0


@dataclass
class Change:
    kind: str  # "enroll" | "revoke"
    public_key: str
    gateway_id: str
    window: int
    acked_at: float
    sent_at: float
    direct: bool  # the gateway's agent was up at the acknowledgement


@dataclass
class Gateway:
    n: int
    gateway_id: str
    backend: MemoryBackend
    agent: GatewayAgent | None = None
    stop: asyncio.Event | None = None
    task: asyncio.Task[None] | None = None
    up: bool = False
    stops: list[float] = field(default_factory=list)  # when its agent was stopped


@dataclass
class SoakResult:
    config: SoakConfig
    windows: list[Window]
    enrolled: int
    revoked: int
    lost: list[str]
    rss_growth: float  # over the last flat_minutes
    kb_per_device: float  # RSS growth over that period per device added in it
    flaps: int
    resyncs: int
    uncertain: int = 0  # revokes with no answer: the log decided
    slow_restarts: int = 0  # gateways that took over 120 s to resync after coming back
    stuck_stops: tuple[str, ...] = ()

    @property
    def propagation_p99_ms(self) -> float:
        values = [v for w in self.windows for v in w.direct_ms]
        return pct(values, 0.99) if values else float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figures(values: list[float], scale: float = 1.0) -> str:
    if not values:
        return "n=0"
    return (
        f"n={len(values)} p50 {statistics.median(values) * scale:.1f} "
        f"p99 {pct(values, 0.99) * scale:.1f} max {max(values) * scale:.1f}"
    )


def describe_window(w: Window, window_s: float) -> str:
    rss = f"{min(w.rss_mb):.0f}..{max(w.rss_mb):.0f} MB" if w.rss_mb else "n/a"
    errors = ", ".join(f"{k}={v}" for k, v in sorted(w.errors.items())) or "none"
    return (
        f"window {w.index} (t={w.index * window_s:.0f}-{(w.index + 1) * window_s:.0f} s): "
        f"enroll ms {figures(w.enroll_s, 1000)}; revoke ms {figures(w.revoke_s, 1000)}; "
        f"errors {errors}; propagation ms direct {figures(w.direct_ms)} "
        f"(from request sent {figures(w.direct_from_sent_ms)}) "
        f"deferred {figures(w.deferred_ms)} unobserved {w.unobserved} superseded {w.superseded}; "
        f"control RSS {rss}; devices {w.devices_at_end}; driver loop lag ms {figures(w.lag_ms)}"
    )


class ControlProcess:
    """`damm control run` in its own process (its RSS is its own)."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, probe: NATS, timeout: float = 120.0) -> None:
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "damm"), "control", "run", "--keys-dir",
             str(self.root / "keys")],
            env=self.env,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"control plane exited with {self.proc.returncode}")
            try:
                await call(probe, "catalog.get", p.GetCatalog(region="eu"), p.SignedCatalogReply,
                           timeout=0.5)  # fmt: skip
                return
            except Exception:  # no responders yet (still catching up)
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)
            self.proc = None


def error_code(exc: BaseException) -> str:
    if isinstance(exc, DammError):
        return exc.code.slug
    if isinstance(exc, nats.errors.TimeoutError | TimeoutError):
        return "timeout"
    return f"transport:{type(exc).__name__}"


class Soak:
    def __init__(self, cfg: SoakConfig, root: Path) -> None:
        self.cfg = cfg
        self.root = root
        self.fleet = SyntheticFleet(tier="soak", region="eu", gateways=cfg.gateways)
        self.gateways = [
            Gateway(n, self.fleet.gateway_id(n), MemoryBackend()) for n in range(cfg.gateways)
        ]
        self.by_id = {g.gateway_id: g for g in self.gateways}
        self.windows: list[Window] = []
        self.t0 = 0.0
        self.added_at: dict[str, float] = {}  # public key -> applied on its gateway
        self.removed_at: dict[str, float] = {}
        self.changes: list[Change] = []
        self.device_of: dict[str, tuple[str, str]] = {}  # public key -> (device id, gateway)
        self.live: list[str] = []  # public keys enrolled, not revoked (nor being revoked)
        self.revoked: set[str] = set()
        # Revokes whose answer never came (timeout, no responder): done or not, the log decides.
        self.uncertain: set[str] = set()
        self.slow_restarts = 0
        self.stuck_stops: list[str] = []  # agents that did not stop within 120 s of being told
        self.flaps = 0
        self.resyncs = 0
        self.inflight: set[asyncio.Task[Any]] = set()

    def window(self, at: float) -> Window:
        index = int((at - self.t0) // self.cfg.window_s)
        while len(self.windows) <= index:
            self.windows.append(
                Window(len(self.windows), self.t0 + len(self.windows) * self.cfg.window_s)
            )
        return self.windows[index]

    # --- agents ------------------------------------------------------------------------------

    def _hook(self, change: PeerDiff, at: float) -> None:
        for peer in change.add:
            self.added_at.setdefault(peer.public_key, at)
        for key in change.remove:
            self.removed_at.setdefault(key, at)
        for peer in change.update:  # a leaving peer is cleared first: its traffic stops here
            if not peer.allowed_ips:
                self.removed_at.setdefault(peer.public_key, at)

    async def start_agent(self, g: Gateway, url: str, password: str) -> None:
        agent = GatewayAgent(
            AgentConfig(
                gateway_id=g.gateway_id,
                token=self.fleet.gateway_token(g.n),
                nats_url=url,
                state_dir=self.root / "agents" / g.gateway_id,
                nats_user="admin",
                nats_password=password,
                heartbeat_s=self.cfg.heartbeat_s,
                usage_s=600.0,
                reconcile_s=300.0,
                request_timeout=10.0,
            ),
            g.backend,
        )
        agent.on_applied.append(self._hook)
        g.agent, g.stop = agent, asyncio.Event()
        g.task = asyncio.create_task(agent.run(g.stop))
        synced = asyncio.create_task(agent.synced.wait())
        await asyncio.wait([synced, g.task], timeout=120, return_when=asyncio.FIRST_COMPLETED)
        if agent.synced.is_set():
            g.up = True
            return
        if g.task.done():
            g.task.result()  # the agent gave up: its error ends the soak
        self.slow_restarts += 1  # still trying (an overloaded control plane): up once synced

        async def later() -> None:
            await synced
            g.up = agent is g.agent

        self.spawn(later())

    async def stop_agent(self, g: Gateway) -> None:
        g.up = False
        g.stops.append(time.monotonic())
        assert g.stop is not None and g.task is not None and g.agent is not None
        g.stop.set()
        try:
            await asyncio.wait_for(g.task, 120)
        except TimeoutError:  # a finding, reported; the soak goes on with a new agent later
            self.stuck_stops.append(g.gateway_id)
        self.resyncs += g.agent.resyncs

    async def flapper(self, url: str, password: str, until: float) -> None:
        rng = random.Random(7)
        count = max(1, round(self.cfg.flap_fraction * len(self.gateways)))
        while time.monotonic() + self.cfg.flap_every_s <= until:
            await asyncio.sleep(self.cfg.flap_every_s)
            candidates = [g for g in self.gateways if g.up]
            chosen = rng.sample(candidates, min(count, len(candidates)))
            await asyncio.gather(*(self.stop_agent(g) for g in chosen))
            self.flaps += len(chosen)

            async def back(gs: list[Gateway]) -> None:
                await asyncio.sleep(self.cfg.down_s)
                await asyncio.gather(*(self.start_agent(g, url, password) for g in gs))

            self.spawn(back(chosen))

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    # --- load --------------------------------------------------------------------------------

    async def enroll(self, device: NATS, due: float) -> None:
        _, pub = keypair()
        sent = time.monotonic()
        w = self.window(due)
        try:
            res = await call(
                device,
                "enroll",
                p.Enroll(token=self.fleet.token, public_key=pub, request_id=uuid.uuid4().hex),
                p.Enrolled,
                timeout=30,
            )
        except Exception as exc:  # counted by code; the soak goes on
            w.errors[f"enroll:{error_code(exc)}"] += 1
            return
        acked = time.monotonic()
        w.enroll_s.append(acked - sent)
        g = self.by_id[res.gateway_id]
        self.device_of[pub] = (res.device_id, res.gateway_id)
        self.changes.append(Change("enroll", pub, g.gateway_id, w.index, acked, sent, g.up))
        self.live.append(pub)

    async def revoke(self, admin: NATS, rng: random.Random, due: float) -> None:
        if not self.live:
            return
        i = rng.randrange(len(self.live))
        self.live[i], self.live[-1] = self.live[-1], self.live[i]
        pub = self.live.pop()
        device_id, gateway_id = self.device_of[pub]
        sent = time.monotonic()
        w = self.window(due)
        for _ in range(20):  # revoke and enroll race on the token aggregate (OCC)
            try:
                await call(admin, "admin.device.revoke", p.DeviceAction(device_id=device_id),
                           p.Done, timeout=30)  # fmt: skip
                break
            except DammError as err:
                if err.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED):
                    w.errors[f"revoke:{err.code.slug}"] += 1
                    self.uncertain.add(pub)
                    return
                if err.code is not Code.CONFLICT:
                    w.errors[f"revoke:{err.code.slug}"] += 1
                    self.live.append(pub)
                    return
                w.errors["revoke:conflict(retried)"] += 1
            except Exception as exc:
                w.errors[f"revoke:{error_code(exc)}"] += 1
                self.uncertain.add(pub)
                return
        else:
            self.live.append(pub)
            return
        acked = time.monotonic()
        w.revoke_s.append(acked - sent)
        self.revoked.add(pub)
        g = self.by_id[gateway_id]
        self.changes.append(Change("revoke", pub, gateway_id, w.index, acked, sent, g.up))

    async def open_loop(self, rate: float, until: float, one: Any) -> None:
        if rate <= 0:
            return
        start = time.monotonic()
        i = 0
        while True:
            at = start + i / rate
            if at >= until:
                return
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            self.spawn(one(at))  # its window is the one it was due in, however late it left
            i += 1

    async def loop_lag(self, until: float) -> None:
        """How late this process's event loop wakes: a loaded driver inflates every figure."""
        while (now := time.monotonic()) < until:
            await asyncio.sleep(0.1)
            self.window(now).lag_ms.append((time.monotonic() - now - 0.1) * 1000)

    async def sample_rss(self, control: ControlProcess, until: float) -> list[tuple[float, float]]:
        samples: list[tuple[float, float]] = []
        while (now := time.monotonic()) < until:
            rss = control.rss_mb()
            samples.append((now, rss))
            self.window(now).rss_mb.append(rss)
            self.window(now).devices_at_end = len(self.live)
            for g in self.gateways:  # the memory backend keeps every diff; the soak needs none
                g.backend.applied.clear()
            await asyncio.sleep(self.cfg.rss_every_s)
        return samples

    async def all_beating(self, nc: NATS, timeout: float = 120.0) -> None:
        """Every gateway has a heartbeat in telemetry: placement sees the whole fleet."""
        js = nc.jetstream(timeout=30)
        deadline = time.monotonic() + timeout
        while True:
            info = await js.stream_info("DAMM_TELEMETRY", subjects_filter="damm.tel.heartbeat.>")
            if len(info.state.subjects or {}) >= len(self.gateways):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(info.state.subjects or {})} gateways beat")
            await asyncio.sleep(0.2)

    async def progress(self, until: float) -> None:
        """One line as each window closes (propagation is classified at the end)."""
        index = 0
        while (end := self.t0 + (index + 1) * self.cfg.window_s) <= until + 1e-6:
            await asyncio.sleep(max(0.0, end - time.monotonic()))
            w = self.window(end - 1e-3)
            errors = dict(w.errors) or "none"
            rss = f"{max(w.rss_mb):.0f} MB" if w.rss_mb else "n/a"
            print(f"[window {index} closed] enroll ms {figures(w.enroll_s, 1000)}; errors "
                  f"{errors}; RSS {rss}; live devices {len(self.live)}; driver loop lag ms "
                  f"{figures(w.lag_ms)}", flush=True)  # fmt: skip
            index += 1

    # --- the end -----------------------------------------------------------------------------

    def observed(self, c: Change) -> float | None:
        seen = (self.added_at if c.kind == "enroll" else self.removed_at).get(c.public_key)
        return None if seen is None else max(0.0, seen - c.acked_at) * 1000

    def superseded(self, c: Change) -> bool:
        """Revoked (or maybe revoked) before any agent applied it: neither change can show on
        an interface (the final check still requires the device absent if it was revoked)."""
        gone = c.public_key in self.revoked or c.public_key in self.uncertain
        return gone and c.public_key not in self.added_at

    async def converge(self) -> None:
        """Every change applied on its gateway (all agents up), within the settle deadline."""
        deadline = time.monotonic() + self.cfg.settle_s
        while any(self.observed(c) is None and not self.superseded(c) for c in self.changes):
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.1)

    def classify(self) -> None:
        for c in self.changes:
            w = self.windows[c.window]
            ms = self.observed(c)
            if ms is None:
                if self.superseded(c):
                    w.superseded += 1
                else:
                    w.unobserved += 1
                continue
            seen = c.acked_at + ms / 1000
            stopped = any(c.acked_at <= t <= seen for t in self.by_id[c.gateway_id].stops)
            if c.direct and not stopped:
                w.direct_ms.append(ms)
                w.direct_from_sent_ms.append((seen - c.sent_at) * 1000)
            else:
                w.deferred_ms.append(ms)

    async def losses(self, nc: NATS, dsn: str) -> list[str]:
        lost: list[str] = []
        enrolled, revoked = await device_events(nc)
        conn = await asyncpg.connect(dsn)
        try:
            target = (await nc.jetstream().stream_info("DAMM_EVENTS")).state.last_seq
            deadline = time.monotonic() + self.cfg.settle_s
            while True:
                done = await conn.fetchval(
                    "SELECT last_seq FROM damm.checkpoint WHERE projector = 'readmodels'"
                )
                if done is not None and done >= target:
                    break
                if time.monotonic() > deadline:
                    lost.append(f"read models at {done}, log at {target}")
                    break
                await asyncio.sleep(0.2)
            rows = await conn.fetch("SELECT device_id, status, gateway_id FROM damm.devices")
        finally:
            await conn.close()
        models = {r["device_id"]: (r["status"], r["gateway_id"]) for r in rows}
        for pub, (device_id, gateway_id) in self.device_of.items():
            is_revoked = pub in self.revoked or (pub in self.uncertain and device_id in revoked)
            if device_id not in enrolled:
                lost.append(f"{device_id}: acked enrollment not in the log")
            if is_revoked and device_id not in revoked:
                lost.append(f"{device_id}: acked revoke not in the log")
            status = models.get(device_id)
            if status is None:
                lost.append(f"{device_id}: not in the read models")
            elif status[1] != gateway_id or (status[0] == "revoked") != is_revoked:
                lost.append(f"{device_id}: read model says {status}, revoked={is_revoked}")
            g = self.by_id[gateway_id]
            assert g.agent is not None
            configured = pub in g.backend.peers and bool(g.backend.peers[pub].allowed_ips)
            if is_revoked and (configured or pub in g.agent.desired):
                lost.append(f"{device_id}: revoked but still in {gateway_id}'s peer set")
            if not is_revoked and not configured:
                lost.append(f"{device_id}: enrolled but not on {gateway_id}'s interface")
        return lost

    # --- the run -----------------------------------------------------------------------------

    async def run(self) -> SoakResult:
        cfg = self.cfg
        nats_server = NatsServer(self.root / "nats")
        url = nats_server.start()
        pg = Postgres(self.root / "pg", delete_on_stop=True)
        dsn = pg.start()
        env = {
            **os.environ,
            "DAMM_NATS_URL": url,
            "DAMM_DATABASE_URL": dsn,
            "DAMM_CONTROL_PASSWORD": nats_server.passwords["control"],
            "DAMM_KEK": base64.b64encode(os.urandom(32)).decode(),  # signing keys are sealed
            "DAMM_OVERLAY": OVERLAY,
            "DAMM_LOG_LEVEL": "error",
            "DAMM_HEARTBEAT_TTL": str(cfg.heartbeat_ttl_s),
        }
        control = ControlProcess(self.root, env)
        admin_password = nats_server.passwords["admin"]
        conns: list[NATS] = []
        try:
            nc = await connect(url, user="control", password=nats_server.passwords["control"])
            admin = await connect(url, user="admin", password=admin_password)
            device = await connect(url)
            conns += [nc, admin, device]
            await ensure_streams(nc.jetstream())
            store = EventStore(nc, timeout=60)
            await fleet_log.write(store, fleet_log.setup_items(self.fleet))
            await control.start(device)
            t = time.monotonic()
            for i in range(0, len(self.gateways), 50):
                await asyncio.gather(
                    *(self.start_agent(g, url, admin_password) for g in self.gateways[i : i + 50])
                )
            await self.all_beating(nc)
            print(f"{len(self.gateways)} agents synced and beating in {time.monotonic() - t:.1f} s",
                  flush=True)  # fmt: skip

            gc.collect()
            gc.freeze()  # the fleet's setup is long-lived: keep it out of every collection
            self.t0 = time.monotonic()
            until = self.t0 + cfg.minutes * 60
            rng = random.Random(11)
            rss = asyncio.create_task(self.sample_rss(control, until))
            progress = asyncio.create_task(self.progress(until))
            lag = asyncio.create_task(self.loop_lag(until))
            await asyncio.gather(
                self.open_loop(cfg.enroll_rate, until, lambda due: self.enroll(device, due)),
                self.open_loop(cfg.revoke_rate, until, lambda due: self.revoke(admin, rng, due)),
                self.flapper(url, admin_password, until),
            )
            samples = await rss
            await progress
            await lag
            # Requests still answering, gateways coming back: bounded, an agent may never sync.
            deadline = time.monotonic() + cfg.settle_s
            while self.inflight and time.monotonic() < deadline:
                await asyncio.wait(list(self.inflight), timeout=deadline - time.monotonic())
            for task in list(self.inflight):
                task.cancel()
            await self.converge()
            self.classify()
            lost = await self.losses(nc, dsn)
            result = SoakResult(
                config=cfg,
                windows=self.windows,
                enrolled=len(self.device_of),
                revoked=len(self.revoked),
                lost=lost,
                rss_growth=0.0,
                kb_per_device=0.0,
                flaps=self.flaps,
                resyncs=self.resyncs + sum(g.agent.resyncs for g in self.gateways if g.agent),
                uncertain=len(self.uncertain),
                slow_restarts=self.slow_restarts,
                stuck_stops=tuple(self.stuck_stops),
            )
            self._rss(result, samples)
            return result
        finally:
            for g in self.gateways:
                if g.stop is not None:
                    g.stop.set()
            await asyncio.gather(
                *(g.task for g in self.gateways if g.task is not None), return_exceptions=True
            )
            for c in conns:
                with contextlib.suppress(Exception):
                    await c.close()
            control.stop()
            pg.stop()
            nats_server.stop()

    def _rss(self, result: SoakResult, samples: list[tuple[float, float]]) -> None:
        """Growth over the last flat_minutes (mean of three samples at each end)."""
        start = self.t0 + max(0.0, (self.cfg.minutes - self.cfg.flat_minutes) * 60)
        period = [(t, r) for t, r in samples if t >= start]
        if len(period) < 2:
            return
        first = statistics.mean(r for _, r in period[:3])
        last = statistics.mean(r for _, r in period[-3:])
        result.rss_growth = last / first - 1
        added = sum(
            (1 if c.kind == "enroll" else -1) for c in self.changes if c.acked_at >= period[0][0]
        )
        result.kb_per_device = (last - first) * 1024 / added if added > 0 else 0.0


async def device_events(nc: NATS) -> tuple[set[str], set[str]]:
    """Device ids enrolled and revoked, read from the log itself."""
    js = nc.jetstream(timeout=30)
    last = (await js.stream_info("DAMM_EVENTS")).state.last_seq
    sub = await js.pull_subscribe(
        "damm.evt.device.>",
        durable=None,
        stream="DAMM_EVENTS",
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, mem_storage=True
        ),
    )
    enrolled: set[str] = set()
    revoked: set[str] = set()
    try:
        while True:
            try:
                msgs = await sub.fetch(2000, timeout=2.0)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            for msg in msgs:
                event = codec.decode(msg.data).event
                if isinstance(event, m.DeviceEnrolled):
                    enrolled.add(event.device_id)
                elif isinstance(event, m.DeviceRevoked):
                    revoked.add(event.device_id)
            if msgs and msgs[-1].metadata.sequence.stream >= last:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return enrolled, revoked


def summary(result: SoakResult) -> list[str]:
    cfg = result.config
    lines = [describe_window(w, cfg.window_s) for w in result.windows]
    direct = [v for w in result.windows for v in w.direct_ms]
    from_sent = [v for w in result.windows for v in w.direct_from_sent_ms]
    deferred = [v for w in result.windows for v in w.deferred_ms]
    errors: Counter[str] = sum((w.errors for w in result.windows), Counter())
    lines += [
        f"overall: {result.enrolled} enrolled, {result.revoked} revoked, {result.flaps} gateway "
        f"stops ({result.slow_restarts} took over 120 s to resync, "
        f"{len(result.stuck_stops)} agents did not stop in 120 s: {result.stuck_stops[:5]}), "
        f"{result.resyncs} agent "
        f"resyncs, {result.uncertain} revokes unanswered (checked against the log); errors "
        f"{dict(errors) or 'none'}",
        f"propagation (ack -> applied on the gateway) direct ms {figures(direct)} "
        f"(target p99 <= {PROPAGATION_TARGET_MS:.0f}); from request sent ms "
        f"{figures(from_sent)}; deferred (gateway down) ms {figures(deferred)}",
        f"control RSS over the last {min(cfg.flat_minutes, cfg.minutes):g} min: "
        f"{result.rss_growth:+.1%} (target <= {RSS_GROWTH_TARGET:.0%}); "
        f"{result.kb_per_device:.2f} KB per device added in that period",
        f"lost: {len(result.lost)}" + (f" (first: {result.lost[:5]})" if result.lost else ""),
    ]
    return lines


def method(cfg: SoakConfig) -> str:
    return (
        f"method: {cfg.gateways} memory-backend agents (heartbeat {cfg.heartbeat_s:g} s, TTL "
        f"{cfg.heartbeat_ttl_s:g} s), {cfg.flap_fraction:.0%} stopped every "
        f"{cfg.flap_every_s:g} s for {cfg.down_s:g} s; {cfg.enroll_rate:g} enrollments/s and "
        f"{cfg.revoke_rate:g} revokes/s open loop for {cfg.minutes:g} min, windows of "
        f"{cfg.window_s:g} s; `damm control run` in its own process (see the module docstring)"
    )


async def soak(cfg: SoakConfig, root: Path | None = None) -> SoakResult:
    own = root is None
    root = root or Path(tempfile.mkdtemp(prefix="damm-bench-soak-", dir="/tmp"))
    try:
        return await Soak(cfg, root).run()
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--window", type=float, default=300.0, help="seconds per reported window")
    ap.add_argument("--gateways", type=int, default=1000)
    ap.add_argument("--enroll-rate", type=float, default=200.0)
    ap.add_argument("--revoke-rate", type=float, default=20.0)
    ap.add_argument("--flap-fraction", type=float, default=0.05)
    ap.add_argument("--flap-every", type=float, default=60.0)
    ap.add_argument("--down", type=float, default=30.0)
    ap.add_argument("--flat-minutes", type=float, default=20.0)
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    cfg = SoakConfig(
        minutes=args.minutes,
        window_s=args.window,
        gateways=args.gateways,
        enroll_rate=args.enroll_rate,
        revoke_rate=args.revoke_rate,
        flap_fraction=args.flap_fraction,
        flap_every_s=args.flap_every,
        down_s=args.down,
        flat_minutes=args.flat_minutes,
    )
    print(method(cfg), flush=True)
    result = asyncio.run(soak(cfg))
    print("\n".join(summary(result)))


if __name__ == "__main__":
    main()
