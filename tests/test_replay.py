"""Replay against real servers: verify finds tampering, replace_live repairs it while projectors
run, and read models stay exactly-once when the projector process is SIGKILLed mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from damm.events import model as m
from damm.events.store import Append, EventStore, envelope
from damm.projections.readmodels import REPLAYED_TABLES
from damm.projections.replay import rebuild, replace_live, verify
from damm.projections.runner import Projector
from damm.stack.nats_server import NatsServer
from damm.subjects import EVENTS_STREAM, TELEMETRY_STREAM, event_subject, heartbeat_subject

ADMIN = m.Actor("admin", "ops")
POLICY = m.Actor("policy", "quota")
T0 = datetime(2025, 3, 30, 12, 0, tzinfo=UTC)  # usage crosses a month boundary on purpose


class History:
    """Builds a plausible fleet history and remembers what the read models must say."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.items: list[Append] = []
        self.tick = 0
        self.devices: list[str] = []
        self.tokens: list[str] = []
        self.status: dict[str, str] = {}
        self.usage: dict[tuple[str, str], tuple[int, int]] = {}
        self.token_uses: Counter[str] = Counter()

    def add(self, kind: str, ident: str, event: m.Event, actor: m.Actor = ADMIN) -> None:
        self.tick += 1
        subject = event_subject(kind, ident)
        env = envelope(
            subject,
            event,
            actor=actor,
            correlation_id=f"req-{self.tick}",
            now=T0 + timedelta(minutes=7 * self.tick),
        )
        self.items.append(Append(subject, env))

    def drain(self) -> list[Append]:
        items, self.items = self.items, []
        return items

    def fleet(self, gateways: int = 3, tokens: int = 6) -> None:
        for tier, limit in (("basic", 10 * 2**30), ("pro", None)):
            self.add(
                "tier",
                tier,
                m.TierDefined(
                    tier=tier,
                    regions=("eu", "us"),
                    exit_countries=("DE", "NL"),
                    session_limit=3,
                    byte_limit=limit,
                ),
            )
        self.add(
            "tier",
            "basic",
            m.TierDefined(tier="basic", regions=("eu",), exit_countries=("DE",), byte_limit=2**30),
        )
        self.add("catalog", "k1", m.SigningKeyAnnounced(key_id="k1", public_key="pk1"))
        for g in range(gateways):
            gw = f"gw-{g}"
            self.add("gateway", gw, m.GatewayAdded(gateway_id=gw, region="eu", token_hash=f"h{g}"))
            for d in range(2):
                self.add(
                    "gateway",
                    gw,
                    m.FrontDoorSet(
                        gateway_id=gw,
                        front_door_id=f"fd{d}",
                        endpoint=f"198.51.100.{g}:{51820 + d}",
                        priority=10 * (2 - d),
                    ),
                )
            self.add(
                "gateway",
                gw,
                m.GatewayRegistered(
                    gateway_id=gw, public_key=f"gk{g}", listen_port=51820, agent_version="1.0"
                ),
            )
        self.add(
            "gateway",
            "gw-2",
            m.GatewayStatusChanged(gateway_id="gw-2", active=False, reason="maintenance"),
        )
        for p, countries in (("pool-de", ("DE",)), ("pool-nl", ("NL", "BE"))):
            self.add(
                "pool",
                p,
                m.EgressPoolDefined(
                    pool_id=p,
                    provider="acme",
                    region="eu",
                    countries=countries,
                    ips=("198.51.100.16",),
                ),
            )
        for t in range(tokens):
            tok = f"tok-{t}"
            self.tokens.append(tok)
            self.add(
                "token",
                tok,
                m.TokenIssued(
                    token_id=tok,
                    token_hash=f"th{t}",
                    tier=("basic", "pro")[t % 2],
                    max_uses=None,
                    expires_at=T0 + timedelta(days=30),
                ),
            )
        for version in range(1, 4):
            self.add(
                "catalog",
                "eu",
                m.CatalogPublished(region="eu", version=version, key_id="k1", digest=f"d{version}"),
            )

    def enroll(self, count: int) -> None:
        for _ in range(count):
            n = len(self.devices)
            dev, tok = f"dev-{n}", self.tokens[n % len(self.tokens)]
            address = f"10.44.{n // 200}.{10 + n % 200}"
            self.devices.append(dev)
            self.add("token", tok, m.TokenUsed(token_id=tok, device_id=dev))
            self.token_uses[tok] += 1
            self.add("key", f"k{n}", m.KeyBound(public_key=f"pub{n}", device_id=dev))
            self.add(
                "ipam",
                "overlay",
                m.AddressAllocated(pool="overlay", index=10 + n, address=address, device_id=dev),
            )
            self.add(
                "device",
                dev,
                m.DeviceEnrolled(
                    device_id=dev,
                    public_key=f"pub{n}",
                    token_id=tok,
                    tier="basic",
                    gateway_id=f"gw-{n % 2}",
                    front_door_id="fd0",
                    egress_pool_id="pool-de",
                    address=address,
                    region="eu",
                    exit_country="DE",
                ),
            )
            self.status[dev] = "active"

    def churn(self, count: int) -> None:
        """Order-sensitive traffic: usage increments, status flips, token uses, key rotations."""
        for _ in range(count):
            roll = self.rng.random()
            dev = self.rng.choice(self.devices)
            if roll < 0.55:
                picked = self.rng.sample(self.devices, k=min(3, len(self.devices)))
                deltas = tuple(
                    m.UsageDelta(d, self.rng.randrange(1, 10**6), self.rng.randrange(1, 10**5))
                    for d in picked
                )
                gw = f"gw-{self.rng.randrange(2)}"
                self.add(
                    "gateway",
                    gw,
                    m.UsageReported(gateway_id=gw, report_id=f"u{self.tick}", deltas=deltas),
                    m.Actor("gateway", gw),
                )
                env = self.items[-1].envelope
                period = f"{env.occurred_at.year:04d}-{env.occurred_at.month:02d}"
                for d in deltas:
                    rx, tx = self.usage.get((d.device_id, period), (0, 0))
                    self.usage[(d.device_id, period)] = (rx + d.rx_bytes, tx + d.tx_bytes)
            elif roll < 0.8:
                if self.status[dev] == "revoked":
                    continue
                flip = "suspended" if self.status[dev] == "active" else "active"
                event: m.Event = (
                    m.DeviceSuspended(device_id=dev, reason="over quota")
                    if flip == "suspended"
                    else m.DeviceResumed(device_id=dev)
                )
                self.add("device", dev, event, POLICY)
                self.status[dev] = flip
            elif roll < 0.95:
                tok = self.rng.choice(self.tokens)
                self.add("token", tok, m.TokenUsed(token_id=tok, device_id=dev))
                self.token_uses[tok] += 1
            else:
                self.add(
                    "device",
                    dev,
                    m.DeviceKeyRotated(
                        device_id=dev, old_public_key="?", new_public_key=f"rot{self.tick}"
                    ),
                )

    def retire(self, count: int) -> None:
        for dev in self.rng.sample(self.devices, k=count):
            if self.status[dev] == "revoked":
                continue
            n = int(dev.split("-")[1])
            self.add("device", dev, m.DeviceRevoked(device_id=dev, reason="lost"))
            self.add(
                "ipam", "overlay", m.AddressReleased(pool="overlay", index=10 + n, device_id=dev)
            )
            tok = self.tokens[n % len(self.tokens)]
            self.add("token", tok, m.TokenSessionReleased(token_id=tok, device_id=dev))
            self.status[dev] = "revoked"
        self.add("token", self.tokens[-1], m.TokenRevoked(token_id=self.tokens[-1], reason="leak"))
        self.add(
            "usage",
            self.devices[0],
            m.UsagePeriodReset(device_id=self.devices[0], period="2025-03"),
        )
        self.usage.pop((self.devices[0], "2025-03"), None)


async def stream_head(nc: NATS, stream: str = EVENTS_STREAM) -> int:
    return int((await nc.jetstream().stream_info(stream)).state.last_seq)


async def db_checkpoint(dsn: str, projector: str = "readmodels", schema: str = "damm") -> int:
    conn = await asyncpg.connect(dsn)
    try:
        seq = await conn.fetchval(
            f"SELECT last_seq FROM {schema}.checkpoint WHERE projector = $1", projector
        )
    except asyncpg.UndefinedTableError:  # mid-swap
        return -1
    finally:
        await conn.close()
    return int(seq or 0)


async def wait_for(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def projected(
    nc: NATS,
    dsn: str,
    stream: str = EVENTS_STREAM,
    projector: str = "readmodels",
    timeout: float = 30.0,
) -> int:
    head = await stream_head(nc, stream)

    async def reached() -> bool:
        return await db_checkpoint(dsn, projector) >= head

    await wait_for(reached, f"{projector} to reach {head}", timeout)
    return head


@contextlib.asynccontextmanager
async def projectors(nc: NATS, dsn: str) -> AsyncIterator[list[Projector]]:
    stop = asyncio.Event()
    running = [
        Projector("readmodels", EVENTS_STREAM, dsn),
        Projector("telemetry", TELEMETRY_STREAM, dsn),
    ]
    tasks = [asyncio.create_task(p.run(nc, stop)) for p in running]
    try:
        yield running
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def heartbeats(nc: NATS, count: int) -> None:
    items = []
    for i in range(count):
        gw = f"gw-{i % 3}"
        subject = heartbeat_subject(gw)
        env = envelope(
            subject,
            m.GatewayHeartbeat(
                gateway_id=gw, peer_count=i, active_peers=i, rx_bytes=i, tx_bytes=i, load=0.1 * i
            ),
            actor=m.Actor("gateway", gw),
            correlation_id=f"hb{i}",
            now=T0 + timedelta(seconds=i),
            aggregate=f"gateway/{gw}",
        )
        items.append(Append(subject, env))
    await EventStore(nc, stream=TELEMETRY_STREAM).append_many(items)


async def table_rows(dsn: str, schema: str = "damm") -> dict[str, list[tuple[object, ...]]]:
    conn = await asyncpg.connect(dsn)
    try:
        return {
            t: sorted(tuple(r) for r in await conn.fetch(f"SELECT * FROM {schema}.{t}"))
            for t in (*REPLAYED_TABLES, "gateway_health")
        }
    finally:
        await conn.close()


def check_expectations(history: History, rows: dict[str, list[tuple[object, ...]]]) -> None:
    """Independent of the projection code: what the published events add up to."""
    usage = {(r[0], r[1]): (r[2], r[3]) for r in rows["usage_totals"]}
    assert usage == history.usage
    uses = {r[0]: r[5] for r in rows["tokens"]}
    assert uses == {t: history.token_uses[t] for t in history.tokens}
    status = {r[0]: r[11] for r in rows["devices"]}
    assert status == history.status


# --- verify, tamper, replace --------------------------------------------------------------------


async def test_verify_detects_tampering_and_replace_live_repairs(nc: NATS, dsn: str) -> None:
    store = EventStore(nc)
    history = History()
    history.fleet()
    history.enroll(60)
    history.churn(250)
    history.retire(8)
    await store.append_many(history.drain())
    await heartbeats(nc, 9)

    async with projectors(nc, dsn):
        head = await projected(nc, dsn)
        assert head > 400
        await projected(nc, dsn, TELEMETRY_STREAM, "telemetry")
        check_expectations(history, await table_rows(dsn))

        seen: list[tuple[int, int]] = []
        report = await verify(nc, dsn, progress=lambda done, target: seen.append((done, target)))
        assert report.ok, report.differing
        assert report.seq == head and seen[-1] == (head, head)
        assert set(report.tables) == set(REPLAYED_TABLES)
        assert report.tables["devices"].rows == 60

        revoked = next(d for d, s in history.status.items() if s == "revoked")
        busy = next(iter(history.usage))
        conn = await asyncpg.connect(dsn)
        await conn.execute("UPDATE damm.devices SET status='active' WHERE device_id=$1", revoked)
        await conn.execute(
            "UPDATE damm.usage_totals SET rx_bytes = rx_bytes + 1 WHERE device_id=$1 AND period=$2",
            *busy,
        )
        await conn.close()

        report = await verify(nc, dsn)
        assert not report.ok
        assert set(report.differing) == {"devices", "usage_totals"}
        devices = report.tables["devices"]
        assert (devices.missing_in_live, devices.extra_in_live) == (1, 1)
        by_side = {side: row for side, row in devices.samples}
        assert by_side["extra_in_live"]["device_id"] == revoked
        assert by_side["extra_in_live"]["status"] == "active"
        assert by_side["missing_in_live"]["status"] == "revoked"
        usage = report.tables["usage_totals"]
        assert usage.samples[0][1]["device_id"] == busy[0]
        # The shadow schema is gone unless kept.
        conn = await asyncpg.connect(dsn)
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'damm_replay%'"
            )
            == 0
        )
        await conn.close()

        # Replace while new events keep arriving: the swap must catch up under the lock.
        async def keep_appending() -> None:
            for _ in range(10):
                history.churn(20)
                await store.append_many(history.drain())
                await asyncio.sleep(0.05)

        writer = asyncio.create_task(keep_appending())
        seq = await replace_live(nc, dsn)
        await writer
        assert seq >= head

        history.enroll(1)  # the projectors survived the swap and project into the new schema
        history.churn(30)
        await store.append_many(history.drain())
        await heartbeats(nc, 3)
        await projected(nc, dsn)
        await projected(nc, dsn, TELEMETRY_STREAM, "telemetry")
        rows = await table_rows(dsn)
        check_expectations(history, rows)
        assert len(rows["gateway_health"]) == 3  # carried over, then updated by telemetry

        report = await verify(nc, dsn)
        assert report.ok, report.differing

    # A from-scratch rebuild equals the replaced live tables, table by table.
    shadow_seq = await rebuild(nc, dsn, shadow_schema="damm_fresh")
    assert shadow_seq == await stream_head(nc)
    live, fresh = await table_rows(dsn), await table_rows(dsn, "damm_fresh")
    assert {t: live[t] for t in REPLAYED_TABLES} == {t: fresh[t] for t in REPLAYED_TABLES}


async def test_verify_while_projector_keeps_moving(nc: NATS, dsn: str) -> None:
    """A live checkpoint that moves during the replay is caught up to, not reported as a diff."""
    store = EventStore(nc)
    history = History(seed=11)
    history.fleet()
    history.enroll(40)
    history.churn(300)
    await store.append_many(history.drain())
    async with projectors(nc, dsn):
        await projected(nc, dsn)
        stop = asyncio.Event()

        async def keep_appending() -> None:
            while not stop.is_set():
                history.churn(25)
                await store.append_many(history.drain())
                await asyncio.sleep(0.02)

        writer = asyncio.create_task(keep_appending())
        try:
            report = await verify(nc, dsn)
        finally:
            stop.set()
            await writer
        assert report.ok, report.differing
        assert report.seq > 0


async def test_rebuild_upto_and_empty_log(nc: NATS, dsn: str) -> None:
    assert await rebuild(nc, dsn) == 0
    store = EventStore(nc)
    history = History(seed=3)
    history.fleet()
    await store.append_many(history.drain())
    assert await rebuild(nc, dsn, upto=5) == 5
    conn = await asyncpg.connect(dsn)
    assert (
        await conn.fetchval(
            "SELECT last_seq FROM damm_replay.checkpoint WHERE projector='readmodels'"
        )
        == 5
    )
    assert await conn.fetchval("SELECT count(*) FROM damm_replay.tiers") == 2
    await conn.close()


# --- exactly-once under SIGKILL -----------------------------------------------------------------


def spawn_projector(server: NatsServer, dsn: str, log: Path) -> subprocess.Popen[bytes]:
    root = Path(__file__).resolve().parent.parent
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.projector_proc",
                server.url,
                server.passwords["control"],
                dsn,
            ],
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(root)},
        )


async def test_exactly_once_when_projector_process_is_killed(
    nc: NATS,
    dsn: str,
    nats_server: NatsServer,
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("DAMM_KILL_SEED", str(random.randrange(10**6))))
    print(f"seed={seed}")
    rng = random.Random(seed)
    store = EventStore(nc)
    history = History(seed=seed)
    history.fleet(tokens=20)
    history.enroll(150)
    history.churn(10_500)
    items = history.drain()
    assert len(items) >= 11_000

    log = tmp_path / "projector.log"
    proc = spawn_projector(nats_server, dsn, log)
    kills: list[tuple[int, int]] = []  # (checkpoint seen just before the kill, head then)
    publishing = asyncio.Event()
    publishing.set()

    async def publish() -> None:
        # Bursts faster than the projector folds them, with pauses: it is usually mid-backlog.
        try:
            for start in range(0, len(items), 1500):
                await store.append_many(items[start : start + 1500])
                await asyncio.sleep(0.4)
        finally:
            publishing.clear()

    async def killer() -> None:
        nonlocal proc
        while publishing.is_set() or len(kills) < 3:
            before = await db_checkpoint(dsn)

            async def moved(floor: int = before) -> bool:
                return await db_checkpoint(dsn) > floor

            async def lagging() -> bool:
                return 0 < await db_checkpoint(dsn) < await stream_head(nc)

            await wait_for(moved, "the restarted projector to apply something", 30)
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await wait_for(lagging, "a backlog", 30)
            await asyncio.sleep(rng.uniform(0.0, 0.05))
            seen = await db_checkpoint(dsn)
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            kills.append((seen, await stream_head(nc)))
            proc = spawn_projector(nats_server, dsn, log)
            if len(kills) >= 6:
                break

    try:
        await asyncio.gather(publish(), killer())
        head = await stream_head(nc)
        assert head == len(items)
        await projected(nc, dsn, timeout=60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    print(f"kills (checkpoint, head): {kills}")
    assert len(kills) >= 3
    assert sum(1 for seen, at in kills if 0 < seen < at) >= 3, "kills must land mid-stream"

    check_expectations(history, await table_rows(dsn))
    report = await verify(nc, dsn)
    assert report.ok, report.differing
    assert report.seq == head


@pytest.mark.parametrize("bad", ["damm", "damm_old", "Bad-Name"])
async def test_schema_names_are_checked(nc: NATS, dsn: str, bad: str) -> None:
    with pytest.raises(ValueError):
        await rebuild(nc, dsn, shadow_schema=bad)


async def test_a_delivery_lost_in_transit_is_fetched_again(nc: NATS, dsn: str) -> None:
    """A message the consumer delivered that never reached the projector (its node or the
    stream's leader died mid-fetch) is projected anyway: the projector sees the gap in the
    delivery sequence and starts again from its checkpoint. Acking past it (AckAll) lost an
    enrollment's rows for good in the chaos suite."""
    store = EventStore(nc)
    history = History(seed=5)
    history.fleet()
    history.enroll(5)
    await store.append_many(history.drain())
    async with projectors(nc, dsn):
        await projected(nc, dsn)
        inbox = nc.new_inbox()
        got: asyncio.Queue[object] = asyncio.Queue()

        async def on_msg(msg: object) -> None:
            got.put_nowait(msg)

        await nc.subscribe(inbox, cb=on_msg)
        stolen = None
        for _ in range(30):  # a thief's pull request competes with the projector's own
            await nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.proj-readmodels",
                b'{"batch": 1, "expires": 1000000000}',
                reply=inbox,
            )
            history.churn(5)
            await store.append_many(history.drain())
            with contextlib.suppress(TimeoutError):
                msg = await asyncio.wait_for(got.get(), 2.0)
                if not getattr(msg, "headers", None):
                    stolen = msg
                    break
        assert stolen is not None, "no delivery was taken from the projector's consumer"
        head = await projected(nc, dsn)
        report = await verify(nc, dsn)
        assert report.seq == head
        assert report.ok, report.differing
