"""Per-gateway peer sets: the snapshot command, the change publisher, and the key-lifetime reactor.

A gateway's peer set is every active device attached to it. Its revision is the event-stream
sequence of the last event that changed it, so every control-plane process computes the same
revision from the same log. Agents take a snapshot (``gateway.peers``) and then apply the changes
published on core NATS subject ``damm.peers.<gateway_id>``, each carrying ``prev_revision``: a
change that does not follow the agent's revision is a gap and the agent resyncs.

Only one control-plane process publishes (and runs policy reactors): the holder of a Postgres
advisory lock. The others fold the same log and answer snapshots, so losing the leader costs at
most one heartbeat interval of propagation (the heartbeat reply carries the revision).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import datetime

import asyncpg
import msgspec
from nats.aio.client import Client as NATS

from damm import log
from damm.control.context import Context
from damm.control.handlers.gateway import GatewayHandlers
from damm.control.state import DecisionState, PeerChange
from damm.errors import DammError
from damm.events import model as m
from damm.events.model import Actor
from damm.events.store import Append
from damm.protocol import messages as p
from damm.protocol.router import Call, Route, route
from damm.subjects import event_subject, peers_subject

_log = log.get("damm.peersets")
_encoder = msgspec.json.Encoder()

KEY_EXPIRED = "key_expired"
POLICY_ACTOR = Actor("policy", "key_lifetime")


def entries(peers: list[tuple[str, tuple[str, ...]]]) -> tuple[p.PeerEntry, ...]:
    return tuple(p.PeerEntry(key, ips) for key, ips in sorted(peers))


class PeerSetHandlers:
    """``gateway.peers``: the full peer set of the asking gateway, with its revision."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.auth = GatewayHandlers(ctx)

    def routes(self) -> list[Route]:
        return [route("gateway.peers", p.PeerSnapshotRequest, self.snapshot)]

    async def snapshot(self, req: p.PeerSnapshotRequest, call: Call) -> p.PeerSnapshot:
        gw = await self.auth.authenticate(req.gateway_id, req.token)
        await self.ctx.follower.sync()  # a snapshot older than the agent's last change is useless
        state = self.ctx.state
        # No await between these two lines: the peers and the revision describe one state.
        peers = state.peer_set(gw.gateway_id)
        revision = state.peer_revisions.get(gw.gateway_id, 0)
        return p.PeerSnapshot(gw.gateway_id, revision, entries(peers))


def encode_change(change: PeerChange) -> bytes:
    return _encoder.encode(
        p.PeerSetChange(
            change.gateway_id,
            change.prev_revision,
            change.revision,
            entries(list(change.upserts)),
            change.removes,
        )
    )


class Leadership:
    """Hold a Postgres advisory lock while alive; ``is_leader`` says whether we have it."""

    def __init__(self, dsn: str, name: str, *, retry_s: float = 1.0) -> None:
        self.dsn = dsn
        self.name = name
        self.retry_s = retry_s
        self.is_leader = False
        self.gained = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._hold(stop)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                _log.warning("leadership lost", lock=self.name, error=repr(exc))
            self._lose()
            await _sleep_or_stop(stop, self.retry_s)

    async def _hold(self, stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", self.name):
                if await _sleep_or_stop(stop, self.retry_s):
                    return
            self.is_leader = True
            self.gained.set()
            _log.info("leader", lock=self.name)
            while not stop.is_set():  # keep checking the session is alive (lock dies with it)
                await conn.fetchval("SELECT 1")
                await _sleep_or_stop(stop, self.retry_s)
        finally:
            self._lose()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    def _lose(self) -> None:
        if self.is_leader:
            _log.info("no longer leader", lock=self.name)
        self.is_leader = False
        self.gained.clear()


class PeerPublisher:
    """Publish every peer-set change the fold sees, while this process leads."""

    def __init__(self, nc: NATS, state: DecisionState, leadership: Leadership) -> None:
        self.nc = nc
        self.state = state
        self.leadership = leadership
        self.published = 0
        self._queue: asyncio.Queue[PeerChange] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.state.peer_listeners.append(self._on_change)
        self._task = asyncio.create_task(self._run())

    def _on_change(self, change: PeerChange) -> None:
        if self.leadership.is_leader:
            self._queue.put_nowait(change)

    async def _run(self) -> None:
        while True:
            change = await self._queue.get()
            try:
                await self.nc.publish(peers_subject(change.gateway_id), encode_change(change))
                self.published += 1
            except Exception as exc:  # a lost change is repaired by the agents' resync
                _log.warning(
                    "peer change not published",
                    gateway_id=change.gateway_id,
                    revision=change.revision,
                    error=repr(exc),
                )

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.state.peer_listeners.remove(self._on_change)
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class KeyExpiryReactor:
    """Suspend active devices whose key is past its lifetime (policy, only on the leader).

    A key rotation lifts the suspension (the fold turns ``key_expired`` back into active).
    """

    def __init__(
        self,
        ctx: Context,
        leadership: Leadership,
        *,
        interval_s: float = 1.0,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.ctx = ctx
        self.leadership = leadership
        self.interval_s = interval_s
        self.now = now or ctx.now

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.leadership.is_leader:
                try:
                    await self.sweep()
                except Exception:
                    _log.exception("key expiry sweep failed")
            await _sleep_or_stop(stop, self.interval_s)

    def due(self) -> list[str]:
        now = self.now()
        return [
            d.device_id
            for d in self.ctx.state.devices.values()
            if d.status == "active" and d.key_expires_at is not None and d.key_expires_at <= now
        ]

    async def sweep(self) -> int:
        suspended = 0
        for device_id in self.due():
            subject = event_subject("device", device_id)
            call = Call(f"key-expiry-{device_id}", POLICY_ACTOR)

            def decide(
                device_id: str = device_id, subject: str = subject, call: Call = call
            ) -> list[Append]:
                dev = self.ctx.state.devices[device_id]
                expires = dev.key_expires_at
                if dev.status != "active" or expires is None or expires > self.now():
                    return []
                return [
                    self.ctx.append(
                        subject,
                        m.DeviceSuspended(device_id=device_id, reason=KEY_EXPIRED),
                        call,
                        expected=self.ctx.state.seq_of(subject),
                    )
                ]

            try:
                result = await self.ctx.commit(decide)
            except DammError as err:
                _log.warning("key expiry not recorded", device_id=device_id, error=err.line())
                continue
            if result.seqs:
                suspended += 1
                _log.info("device suspended", device_id=device_id, reason=KEY_EXPIRED)
        return suspended


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep; True if ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
