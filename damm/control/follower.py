"""Keeps a process's DecisionState current from the streams, with a read-your-writes barrier."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.js.api import DeliverPolicy

from damm import log
from damm.control.state import DecisionState
from damm.events import codec
from damm.subjects import EVENT_PREFIX, EVENTS_STREAM, TELEMETRY_PREFIX, TELEMETRY_STREAM

_log = log.get("damm.follower")


class StateFollower:
    """Keeps a DecisionState current from the streams, and offers a read-your-writes barrier."""

    def __init__(self, nc: NATS, state: DecisionState) -> None:
        self.nc = nc
        self.state = state
        self.js = nc.jetstream(timeout=10)
        self._subs: list[object] = []
        # The last stream sequence this follower has folded, in order. Own appends folded early
        # (Context.absorb) do not move it, so sync() really waits for everything before them.
        self.followed_seq = 0

    async def start(self) -> None:
        async def on_event(msg: object) -> None:
            self._apply(msg, telemetry=False)

        async def on_heartbeat(msg: object) -> None:
            self._apply(msg, telemetry=True)

        self._subs.append(
            await self.js.subscribe(
                f"{EVENT_PREFIX}.>",
                stream=EVENTS_STREAM,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL,
                cb=on_event,
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
            )
        )
        await self.sync()
        # Heartbeats only after the gateways they speak of are folded, or they would be dropped
        # and every gateway would look stale until its next heartbeat.
        self._subs.append(
            await self.js.subscribe(
                f"{TELEMETRY_PREFIX}.heartbeat.*",
                stream=TELEMETRY_STREAM,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                cb=on_heartbeat,
            )
        )

    def _apply(self, msg: object, *, telemetry: bool) -> None:
        seq = int(msg.metadata.sequence.stream)  # type: ignore[attr-defined]
        try:
            env = codec.decode(msg.data)  # type: ignore[attr-defined]
        except codec.CodecError as exc:
            _log.error("undecodable event ignored by decision state", seq=seq, error=str(exc))
            if not telemetry:
                self.followed_seq = max(self.followed_seq, seq)
            return
        if telemetry:
            # Telemetry sequences belong to another stream: fold without touching subject_seq.
            self.state.fold_telemetry(env)
            return
        self.state.apply(msgspec.structs.replace(env, seq=seq), msg.subject)  # type: ignore[attr-defined]
        self.followed_seq = max(self.followed_seq, seq)
        self.state.changed.set()

    async def sync(self, timeout: float = 10.0) -> None:
        """Wait until everything in the event stream right now is folded."""
        info = await self.js.stream_info(EVENTS_STREAM)
        target = int(info.state.last_seq)
        deadline = asyncio.get_running_loop().time() + timeout
        while self.followed_seq < target:
            if asyncio.get_running_loop().time() > deadline:
                raise nats.errors.TimeoutError
            self.state.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.state.changed.wait(), 0.05)

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()  # type: ignore[attr-defined]
        self._subs.clear()
