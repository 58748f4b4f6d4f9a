"""Everything a handler needs: the log, the folded state, settings, keys, and a commit helper."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from damm.catalog.signing import CatalogSigner
from damm.clock import Clock, system_clock
from damm.control.follower import StateFollower
from damm.control.state import DecisionState
from damm.errors import Code, DammError
from damm.events.model import Actor, Event
from damm.events.store import Append, Appended, ConflictError, EventStore, envelope
from damm.keys.rotation import RotationKey
from damm.protocol.router import Call
from damm.settings import ControlSettings

MAX_ATTEMPTS = 6


@dataclass(frozen=True, slots=True)
class Planned:
    """One event a decision wants appended, before any I/O: decisions return these, so they can
    be tested, logged and retried as values."""

    subject: str
    event: Event
    actor: Actor
    correlation_id: str
    expected: int | None = None
    msg_id: str | None = None


class Context:
    def __init__(
        self,
        store: EventStore,
        state: DecisionState,
        follower: StateFollower,
        settings: ControlSettings,
        signer: CatalogSigner,
        rotation: RotationKey,
        clock: Clock = system_clock,
    ) -> None:
        self.store = store
        self.state = state
        self.follower = follower
        self.settings = settings
        self.signer = signer
        self.rotation = rotation
        self.now = clock

    def append(
        self,
        subject: str,
        event: Event,
        call: Call,
        *,
        expected: int | None = None,
        msg_id: str | None = None,
    ) -> Append:
        env = envelope(
            subject, event, actor=call.actor, correlation_id=call.correlation_id, now=self.now()
        )
        return Append(subject, env, expected_seq=expected, msg_id=msg_id)

    def appends(self, planned: Sequence[Planned]) -> list[Append]:
        """Stamp planned events with envelopes (ids, the clock) for the store."""
        now = self.now()
        return [
            Append(
                item.subject,
                envelope(
                    item.subject,
                    item.event,
                    actor=item.actor,
                    correlation_id=item.correlation_id,
                    now=now,
                ),
                expected_seq=item.expected,
                msg_id=item.msg_id,
            )
            for item in planned
        ]

    def absorb(self, items: Sequence[Append], result: Appended) -> None:
        """Fold our own appends at once so the next decision sees them (read-your-writes)."""
        if result.duplicate:
            return
        for item, seq in zip(items, result.seqs, strict=True):
            self.state.apply(msgspec.structs.replace(item.envelope, seq=seq), item.subject)

    async def commit(self, decide: Callable[[], Sequence[Append]]) -> Appended:
        """Decide from current state and append; on a lost race, catch up and decide again."""
        for attempt in range(MAX_ATTEMPTS):
            items = decide()
            if not items:
                return Appended(())
            try:
                result = await self.store.append_batch(items)
            except ConflictError:
                await self.follower.sync()
                await asyncio.sleep(0.005 * attempt)
                continue
            self.absorb(items, result)
            if result.duplicate:
                await self.follower.sync()
            return result
        raise DammError(Code.CONFLICT, f"gave up after {MAX_ATTEMPTS} attempts")

    async def fresh(self, check: Callable[[], bool]) -> None:
        """When state says 'not found', make sure it is not just lagging another process."""
        if not check():
            await self.follower.sync()
