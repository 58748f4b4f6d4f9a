"""Keeps a process's DecisionState current from the streams, with a read-your-writes barrier."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from damm import log
from damm.clock import cancel_and_wait
from damm.control.state import DecisionState
from damm.errors import Code
from damm.events import codec
from damm.subjects import EVENT_PREFIX, EVENTS_STREAM, TELEMETRY_PREFIX, TELEMETRY_STREAM

_log = log.get("damm.follower")

DIRECT_GET = f"$JS.API.DIRECT.GET.{EVENTS_STREAM}"

# nats-py recreates an ordered consumer after two missed heartbeats; its default of 5 s left the
# state stale for 10-20 s when the node holding the consumer died without our connection noticing.
IDLE_HEARTBEAT_S = 0.5
# Each attempt to recreate the consumers after a reconnect waits this long for JetStream. A node
# that led the meta group (which creates consumers) takes its requests with it when it dies;
# waiting out the general 10 s timeout left a replica's state stale for 10.4 s at 200/s.
RESUME_ATTEMPT_S = 1.0
# A barrier that has waited this long for the consumer reads the missing events itself, from any
# replica of the stream (a direct get needs neither the consumer nor JetStream's meta leader).
# A consumer lost with its node is recreated only once a meta leader answers, 4-9 s after the
# meta leader's own node died; meanwhile every lost race waited in sync() and the replica's
# enrollments failed for 6.8 s at 200/s.
FILL_AFTER_S = 0.2
FILL_BATCH = 256


class StateFollower:
    """Keeps a DecisionState current from the streams, and offers a read-your-writes barrier."""

    def __init__(
        self,
        nc: NATS,
        state: DecisionState,
        *,
        sync_timeout_s: float = 10.0,
        progress_every_s: float = 2.0,
        until_seq: int | None = None,
    ) -> None:
        self.nc = nc
        self.state = state
        self.js = nc.jetstream(timeout=10)
        self.sync_timeout_s = sync_timeout_s
        self.progress_every_s = progress_every_s
        self._subs: list[object] = []
        self._resuming: asyncio.Task[None] | None = None
        # The last stream sequence this follower has folded, in order. Own appends folded early
        # (Context.absorb) do not move it, so sync() really waits for everything before them.
        self.followed_seq = 0
        self.telemetry_seq = 0
        # _fill found events the consumer had not delivered: it is gone or stalled.
        self.consumer_behind = False
        # Fold the log only up to here (checking a snapshot against the log); None: follow on.
        self.until_seq = until_seq

    async def start(self, after_seq: int = 0) -> None:
        """Fold the log from ``after_seq`` (a snapshot's sequence) and return once caught up.

        There is no deadline: a long log makes start-up slow, never fail. Progress is logged.
        Heartbeats are folded before returning too, so nothing downstream (catalogs, placement)
        ever sees the gateways without their health evidence.
        """
        self.followed_seq = after_seq
        self._subs.append(await self._subscribe_events())
        await self.catch_up()
        # Heartbeats only after the gateways they speak of are folded, or they would be dropped
        # and every gateway would look stale until its next heartbeat.
        heartbeats = await self._subscribe_heartbeats()
        self._subs.append(heartbeats)
        await self._telemetry_caught_up(heartbeats)

    async def catch_up(self) -> None:
        """Wait, however long it takes, until the event stream as it is now is folded."""
        info = await self.js.stream_info(EVENTS_STREAM)
        target = int(info.state.last_seq)
        if self.until_seq is not None:
            target = min(target, self.until_seq)
        loop = asyncio.get_running_loop()
        started = last_report = loop.time()
        first = self.followed_seq
        while self.followed_seq < target:
            self.state.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.state.changed.wait(), 0.05)
            now = loop.time()
            if now - last_report >= self.progress_every_s:
                last_report = now
                done = self.followed_seq - first
                _log.info(
                    "catching up with the event log",
                    folded=self.followed_seq,
                    target=target,
                    rate=round(done / max(now - started, 1e-9)),
                )
        _log.info(
            "caught up with the event log",
            seq=self.followed_seq,
            folded=self.followed_seq - first,
            seconds=round(loop.time() - started, 2),
        )

    async def _telemetry_caught_up(self, sub: Any) -> None:
        """The heartbeat consumer delivered everything it had at start, and we folded it."""
        while True:
            info = await sub.consumer_info()
            if info.num_pending == 0 and self.telemetry_seq >= int(info.delivered.stream_seq):
                return
            await asyncio.sleep(0.02)

    def reconnected(self) -> None:
        """Resume at once after the connection came back (a restarted server forgot our
        consumers), rather than after nats-py's missed-heartbeat timer."""
        if self._resuming is None or self._resuming.done():
            self._resuming = asyncio.create_task(self._resume())

    async def _resume(self, timeout: float = 30.0) -> None:
        """Recreate both consumers, the event one from the first sequence not yet folded; a
        server that has just restarted refuses for a moment while JetStream recovers."""

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.05
        js = self.nc.jetstream(timeout=RESUME_ATTEMPT_S)
        while True:
            await self._unsubscribe()
            try:
                self._subs.append(await self._subscribe_events(js))
                self._subs.append(await self._subscribe_heartbeats(js))
            except (nats.errors.Error, TimeoutError) as exc:
                if loop.time() + delay > deadline:
                    _log.error("follower could not resume; nats-py recovers it", error=repr(exc))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            _log.info("follower resumed", from_seq=self.followed_seq + 1)
            return

    async def _subscribe_events(self, js: JetStreamContext | None = None) -> Any:
        """An ordered consumer of the event stream from the first sequence not yet folded."""

        async def on_event(msg: object) -> None:
            self._apply(msg, telemetry=False)

        after = self.followed_seq
        return await (js or self.js).subscribe(
            f"{EVENT_PREFIX}.>",
            stream=EVENTS_STREAM,
            config=ConsumerConfig(opt_start_seq=after + 1) if after else None,
            ordered_consumer=True,
            idle_heartbeat=IDLE_HEARTBEAT_S,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if after else DeliverPolicy.ALL,
            cb=on_event,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )

    async def _subscribe_heartbeats(self, js: JetStreamContext | None = None) -> Any:
        """The latest heartbeat of every gateway, then each new one."""

        async def on_heartbeat(msg: object) -> None:
            self._apply(msg, telemetry=True)

        return await (js or self.js).subscribe(
            f"{TELEMETRY_PREFIX}.heartbeat.*",
            stream=TELEMETRY_STREAM,
            ordered_consumer=True,
            idle_heartbeat=IDLE_HEARTBEAT_S,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            cb=on_heartbeat,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )

    def _apply(self, msg: object, *, telemetry: bool) -> None:
        seq = int(msg.metadata.sequence.stream)  # type: ignore[attr-defined]
        subject = str(msg.subject)  # type: ignore[attr-defined]
        if not telemetry and seq > self.followed_seq:
            self.consumer_behind = False
        self._fold(seq, subject, msg.data, telemetry=telemetry)  # type: ignore[attr-defined]

    def _fold(self, seq: int, subject: str, data: bytes, *, telemetry: bool = False) -> None:
        """Fold one message. Events come from the consumer and from ``_fill``, each complete
        and in order from at most one past ``followed_seq``, so skipping what is not past it
        skips only what is already folded."""
        if not telemetry and seq <= self.followed_seq:
            return  # delivered again by a resumed consumer, or already read by _fill
        if not telemetry and self.until_seq is not None and seq > self.until_seq:
            return
        try:
            env = codec.decode(data)
        except codec.CodecError as exc:
            _log.error(
                "undecodable event skipped by decision state",
                code=Code.UNDECODABLE_EVENT.slug,
                seq=seq,
                subject=subject[:200],
                error=str(exc)[:200],
            )
            if telemetry:
                self.telemetry_seq = max(self.telemetry_seq, seq)
            else:
                self.state.skip(subject, seq)
                self.followed_seq = max(self.followed_seq, seq)
                self.state.changed.set()
            return
        if telemetry:
            # Telemetry sequences belong to another stream: fold without touching subject_seq.
            self.state.fold_telemetry(env)
            self.telemetry_seq = max(self.telemetry_seq, seq)
            return
        self.state.apply(msgspec.structs.replace(env, seq=seq), subject)
        self.followed_seq = max(self.followed_seq, seq)
        self.state.changed.set()

    async def _fill(self, target: int, deadline: float) -> None:
        """Fold the events the consumer has not delivered, read in batches from whichever
        replica of the stream answers, up to ``target`` and on to the end the replica knows:
        a replica whose consumer is gone decides from state this fresh, or it loses every race
        to one whose consumer delivers within milliseconds. Returns early (the caller waits and
        tries again) when no replica answers or one does not have the events yet."""
        loop = asyncio.get_running_loop()
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            pending = 1
            while self.followed_seq < target or pending:
                start = self.followed_seq + 1
                ask = {"seq": start, "batch": FILL_BATCH}
                await self.nc.publish(DIRECT_GET, json.dumps(ask).encode(), reply=inbox)
                while True:
                    left = min(deadline - loop.time(), RESUME_ATTEMPT_S)
                    if left <= 0:
                        return
                    msg = await sub.next_msg(timeout=left)
                    headers = msg.headers or {}
                    if "Status" in headers:  # 204: end of the batch; 404: nothing there yet
                        pending = int(headers.get("Nats-Num-Pending", 0) or 0)
                        break
                    self._fold(int(headers["Nats-Sequence"]), headers["Nats-Subject"], msg.data)
                if self.followed_seq < start:
                    return
                self.consumer_behind = True
        except nats.errors.TimeoutError:
            return
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def sync(self, timeout: float | None = None) -> None:
        """Wait until everything in the event stream right now is folded (a request's barrier:
        it has a deadline, unlike start-up)."""
        info = await self.js.stream_info(EVENTS_STREAM)
        target = int(info.state.last_seq)
        limit = self.sync_timeout_s if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        # Once the consumer has been found behind, read at once until it delivers again.
        fill_at = loop.time() + (0.0 if self.consumer_behind else FILL_AFTER_S)
        while self.followed_seq < target:
            now = loop.time()
            if now > deadline:
                raise nats.errors.TimeoutError
            if now >= fill_at:
                await self._fill(target, deadline)
                fill_at = loop.time() + FILL_AFTER_S
                continue
            self.state.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.state.changed.wait(), 0.05)

    async def _unsubscribe(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self._resuming is not None:
            await cancel_and_wait(self._resuming)
        await self._unsubscribe()
