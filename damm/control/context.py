"""Everything a handler needs: the log, the folded state, settings, keys, and a commit helper."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors

from damm.catalog.signing import CatalogSigner
from damm.clock import Clock, system_clock
from damm.control.follower import StateFollower
from damm.control.keyring import Keyring
from damm.control.state import DecisionState
from damm.errors import Code, DammError
from damm.events.model import Actor, Event
from damm.events.store import Append, Appended, AppendError, ConflictError, EventStore, envelope
from damm.keys.rotation import RotationKey
from damm.protocol.router import Call
from damm.settings import ControlSettings

# Without a deadline (a reactor, a test) a decision is taken again at most this many times.
MAX_ATTEMPTS = 10
# An append waits this long for the log's ack. A request closer than this to its deadline is not
# appended: its client would be told it failed while the append might still land.
APPEND_ACK_TIMEOUT_S = 1.0


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


# What an append raises when no server took the message at all.
UNRECEIVED = (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError, AppendError)


@dataclass
class Attempts:
    """One request's tries at committing a decision after lost races.

    With a deadline it goes on until the deadline: replicas writing one aggregate lose races to
    each other in bursts, and a fixed count failed about 5% of enrollments at 200/s (issue 11).
    Each pause is jittered and grows, so two processes do not collide again in lockstep.
    """

    call: Call | None = None
    count: int = 0

    def too_late(self) -> DammError | None:
        """The error to answer instead of appending now, if the deadline is too close."""
        if self.call is not None and self.call.expired(APPEND_ACK_TIMEOUT_S):
            return DammError(Code.DEADLINE_EXCEEDED, "expired before it could be recorded")
        return None

    def lost(self) -> DammError | None:
        """Count a lost race; the error to answer if no try is left."""
        self.count += 1
        if self.call is not None and self.call.deadline != math.inf:
            if self.call.expired():
                return DammError(Code.DEADLINE_EXCEEDED, "lost every race until then")
            return None
        if self.count > MAX_ATTEMPTS:
            return DammError(Code.CONFLICT, "too many concurrent changes")
        return None

    async def pause(self) -> None:
        await asyncio.sleep(random.uniform(0, 0.002 * min(self.count, 25)))


class Context:
    def __init__(
        self,
        store: EventStore,
        state: DecisionState,
        follower: StateFollower,
        settings: ControlSettings,
        signer: CatalogSigner | None,
        rotation: RotationKey | None,
        clock: Clock = system_clock,
        keyring: Keyring | None = None,
    ) -> None:
        """``keyring`` resolves keys from the log (every replica alike); fixed ``signer`` and
        ``rotation`` keys serve decision tests that run without one."""
        self.store = store
        self.state = state
        self.follower = follower
        self.settings = settings
        self.keyring = keyring
        self._signer = signer
        self._rotation = rotation
        self.now = clock

    @property
    def signer(self) -> CatalogSigner:
        if self.keyring is not None:
            return self.keyring.signer()
        if self._signer is None:
            raise DammError(Code.UNAVAILABLE, "no catalog signing key")
        return self._signer

    @property
    def rotation(self) -> RotationKey:
        if self.keyring is not None:
            return self.keyring.rotation()
        if self._rotation is None:
            raise DammError(Code.UNAVAILABLE, "no rotation key")
        return self._rotation

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

    async def commit(
        self, decide: Callable[[], Sequence[Append]], call: Call | None = None
    ) -> Appended:
        """Decide from current state and append; on a lost race, catch up and decide again.

        With ``call``, nothing is appended once its deadline is too close for the append's ack.
        """
        attempts = Attempts(call)
        while True:
            items = decide()
            if not items:
                return Appended(())
            if err := attempts.too_late():
                raise err
            try:
                result = await self.store.append_batch(items)
            except ConflictError:
                if err := attempts.lost():
                    raise err from None
                await self.follower.sync()
                await attempts.pause()
                continue
            except UNRECEIVED as exc:
                if isinstance(exc, AppendError) and not exc.transient:
                    raise
                # Nobody received it (a server reloading, a stream electing its leader): sending
                # it again cannot record it twice.
                if attempts.lost() is not None:
                    raise DammError(Code.UNAVAILABLE, "the event log did not answer") from None
                await asyncio.sleep(random.uniform(0.05, 0.15))
                continue
            self.absorb(items, result)
            if result.duplicate:
                await self.follower.sync()
            return result

    async def fresh(self, check: Callable[[], bool]) -> None:
        """When state says 'not found', make sure it is not just lagging another process."""
        if not check():
            await self.follower.sync()
