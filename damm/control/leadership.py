"""Which control-plane process publishes and runs policy reactors: one leader at a time.

The leader holds a lease in a JetStream key-value bucket (``damm_leader``), not in the read-model
database, so leadership survives a Postgres outage. The bucket's TTL is the lease: a holder
renews its key every ``lease_renew_s`` with the revision it last wrote, and a key nobody renews
vanishes after ``lease_ttl_s``, when the next candidate's create succeeds. A holder that cannot
renew steps down by its own clock at ``lease_ttl_s - lease_renew_s`` after its last successful
renewal began, before the server can hand the lease to anyone else.

The revision that created the lease is the leader's term, its fencing token. On winning, the
leader appends ``LeaderTermStarted`` to the catalog family in the event log; catalog appends
expect that family's last sequence, so a deposed leader's next publication is refused by the
log itself and it steps down (``depose``). Reactors and the peer-set publisher only consult
``is_leader``; their appends are idempotent decisions with their own expectations.

Bound: leadership moves within ``lease_ttl_s + 2 * lease_renew_s`` of the leader's crash or loss
of NATS (3 s + 1 s with the defaults), and within ``lease_renew_s`` of a clean stop, which
deletes the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyValueError

from damm import log
from damm.clock import sleep_or_stop
from damm.events import model as m
from damm.events.store import Append, EventStore, envelope
from damm.settings import ControlSettings
from damm.subjects import EVENTS_STREAM, LEADER_TERM_SUBJECT, LEASE_BUCKET

_log = log.get("damm.leadership")

ACTOR = m.Actor("system", "leadership")


class Leadership:
    """Hold the leader lease while alive; ``is_leader`` says whether we have it now."""

    def __init__(
        self,
        nc: NATS,
        store: EventStore,
        name: str,
        *,
        ttl_s: float = 3.0,
        renew_s: float = 0.5,
    ) -> None:
        self.nc = nc
        self.store = store
        self.key = name
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.is_leader = False
        self.term = 0  # the lease revision we won it with; 0 while not leading
        self.revision = 0  # the lease revision we last wrote
        self.gained = asyncio.Event()
        self.changed_at = 0.0  # loop time of the last gain or loss
        self._renewed_at = 0.0
        self._kv: Any = None

    @staticmethod
    def handover_bound(settings: ControlSettings) -> float:
        """Seconds within which another process leads after the leader crashes or loses NATS."""
        return settings.lease_ttl_s + 2 * settings.lease_renew_s

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self._round()
                await sleep_or_stop(self.renew_s, stop)
        finally:
            if stop.is_set():
                await self._release()

    async def _bucket(self) -> Any:
        if self._kv is None:
            js = self.nc.jetstream(timeout=max(self.renew_s, 0.5))
            # As available as the log: on a cluster, the loss of one node must not stop the
            # lease (a lease on that node alone would leave no process to publish).
            replicas = int((await js.stream_info(EVENTS_STREAM)).config.num_replicas or 1)
            try:
                self._kv = await js.key_value(LEASE_BUCKET)
            except BucketNotFoundError:
                self._kv = await js.create_key_value(
                    KeyValueConfig(
                        bucket=LEASE_BUCKET,
                        description="DAMM leader lease",
                        history=1,
                        ttl=self.ttl_s,
                        storage=StorageType.FILE,
                        replicas=replicas,
                    )
                )
            else:
                lease = await js.stream_info(f"KV_{LEASE_BUCKET}")
                if int(lease.config.num_replicas or 1) < replicas:
                    lease.config.num_replicas = replicas
                    await js.update_stream(lease.config)
            # The server enforces the bucket's TTL, whoever created it: fence ourselves by it.
            bucket_ttl = (await self._kv.status()).ttl
            if bucket_ttl and bucket_ttl != self.ttl_s:
                _log.warning("lease TTL is the bucket's", configured=self.ttl_s, bucket=bucket_ttl)
                self.ttl_s = bucket_ttl
        return self._kv

    async def _round(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            kv = await asyncio.wait_for(self._bucket(), self.renew_s * 2)
            if self.is_leader:
                self.revision = await asyncio.wait_for(
                    kv.update(self.key, self.holder.encode(), last=self.revision), self.renew_s
                )
                self._renewed_at = started
            else:
                revision = await asyncio.wait_for(
                    kv.create(self.key, self.holder.encode()), self.renew_s
                )
                await self._begin_term(revision, started)
        except KeyValueError as exc:
            # Another holder's key (create) or a lease that moved on without us (update) -- or
            # our own earlier write that timed out here but landed: then the lease is still ours.
            with contextlib.suppress(Exception):
                if await self._reclaim(started):
                    return
            if self.is_leader:
                self.depose(f"lease lost: {exc.description or exc!r}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # NATS unreachable or slow: keep trying, but fence ourselves
            _log.debug("lease round failed", error=repr(exc))
            self._kv = None if not self.nc.is_connected else self._kv
        if self.is_leader and loop.time() >= self._renewed_at + self.ttl_s - self.renew_s:
            self.depose("lease not renewed in time")

    async def _reclaim(self, started: float) -> bool:
        """If the lease key holds our name, write it again from its revision and keep it."""
        entry = await asyncio.wait_for(self._kv.get(self.key), self.renew_s)
        if entry is None or entry.value != self.holder.encode():
            return False
        revision = await asyncio.wait_for(
            self._kv.update(self.key, self.holder.encode(), last=entry.revision), self.renew_s
        )
        if self.is_leader:
            self.revision, self._renewed_at = revision, started
        else:
            await self._begin_term(revision, started)
        return True

    async def _begin_term(self, revision: int, started: float) -> None:
        """Record the new term in the log before acting as leader: it fences the previous one."""
        event = m.LeaderTermStarted(holder=self.holder, term=revision)
        item = Append(
            LEADER_TERM_SUBJECT,
            envelope(LEADER_TERM_SUBJECT, event, actor=ACTOR, correlation_id=f"term-{revision}"),
            msg_id=f"leader-term:{self.key}:{revision}",
        )
        try:
            await self.store.append(item)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._kv.delete(self.key, last=revision), 2)
            raise
        self.term = self.revision = revision
        self._renewed_at = started
        self.is_leader = True
        self.changed_at = asyncio.get_running_loop().time()
        self.gained.set()
        _log.info("leader", key=self.key, term=revision, holder=self.holder)

    def depose(self, reason: str) -> None:
        """Stop acting as leader now (the lease was lost, or a newer term fenced us out)."""
        if self.is_leader:
            _log.warning("no longer leader", key=self.key, term=self.term, reason=reason)
            self.changed_at = asyncio.get_running_loop().time()
        self.is_leader = False
        self.term = 0
        self.gained.clear()

    async def _release(self) -> None:
        """Hand the lease back at once (a clean stop), if it is still ours."""
        was_leader, revision = self.is_leader, self.revision
        self.depose("stopping")
        if not was_leader or self._kv is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._kv.delete(self.key, last=revision), 2)
