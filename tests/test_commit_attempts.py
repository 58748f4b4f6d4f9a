"""Every handler's commit honours its request's deadline (issue 11: nothing is recorded after
its client was told it failed) and keeps deciding again after lost races while the deadline
allows, with one retry policy shared with the enrollment committer (issue 9)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest

from damm.control.context import APPEND_ACK_TIMEOUT_S, MAX_ATTEMPTS, Attempts
from damm.control.handlers.admin import AdminHandlers
from damm.errors import Code, DammError
from damm.events import model as m
from damm.events.model import Actor
from damm.events.store import Append, Appended, AppendError, ConflictError
from damm.protocol import messages as p
from damm.protocol.router import Call
from tests.memory_log import MemoryLog, memory_context


def _call(deadline_in: float | None) -> Call:
    loop = asyncio.get_running_loop()
    deadline = float("inf") if deadline_in is None else loop.time() + deadline_in
    return Call("c-" + str(deadline_in), Actor("admin", "-"), deadline)


class LosesRaces(MemoryLog):
    """A log where another replica wins the first ``losses`` appends."""

    def __init__(self, losses: int) -> None:
        super().__init__()
        self.losses = losses

    async def append_batch(
        self, items: list[Append], *, ack_timeout: float | None = None
    ) -> Appended:  # type: ignore[override]
        if self.losses > 0:
            self.losses -= 1
            raise ConflictError(items[0].subject, "wrong last sequence")
        return await super().append_batch(items, ack_timeout=ack_timeout)


async def test_a_request_too_close_to_its_deadline_is_not_recorded(tmp_path: Path) -> None:
    ctx, log = memory_context(tmp_path)
    admin = AdminHandlers(ctx)
    with pytest.raises(DammError) as err:
        await admin.define_tier(p.DefineTier(tier="gold"), _call(APPEND_ACK_TIMEOUT_S / 2))
    assert err.value.code is Code.DEADLINE_EXCEEDED
    assert log.messages == []
    await admin.define_tier(p.DefineTier(tier="gold"), _call(30.0))
    assert [type(e) for e in log.events()] == [m.TierDefined]


async def test_lost_races_are_retried_until_the_deadline_not_a_count(tmp_path: Path) -> None:
    ctx, _ = memory_context(tmp_path)
    log = LosesRaces(MAX_ATTEMPTS + 5)
    ctx.store = log  # type: ignore[assignment]
    done = await AdminHandlers(ctx).define_tier(p.DefineTier(tier="gold"), _call(30.0))
    assert done.seq == 1
    assert [type(e) for e in log.events()] == [m.TierDefined]


async def test_without_a_deadline_a_fixed_count_of_races_then_conflict(tmp_path: Path) -> None:
    ctx, _ = memory_context(tmp_path)
    log = LosesRaces(MAX_ATTEMPTS + 5)
    ctx.store = log  # type: ignore[assignment]
    with pytest.raises(DammError) as err:
        await AdminHandlers(ctx).define_tier(p.DefineTier(tier="gold"), _call(None))
    assert err.value.code is Code.CONFLICT
    assert log.messages == []


async def test_attempts_policy() -> None:
    assert Attempts().too_late() is None
    expired = Attempts(_call(-1.0))
    assert expired.too_late() is not None
    lost = expired.lost()
    assert lost is not None and lost.code is Code.DEADLINE_EXCEEDED
    fixed = Attempts()
    assert all(fixed.lost() is None for _ in range(MAX_ATTEMPTS))
    last = fixed.lost()
    assert last is not None and last.code is Code.CONFLICT


class Reloading(MemoryLog):
    """A log whose server answers "no responders" for a moment (a configuration reload, a stream
    leader election): nobody received those appends, so sending them again is safe."""

    def __init__(self, refusals: int, error: Exception) -> None:
        super().__init__()
        self.refusals = refusals
        self.error = error

    async def append_batch(
        self, items: list[Append], *, ack_timeout: float | None = None
    ) -> Appended:  # type: ignore[override]
        if self.refusals > 0:
            self.refusals -= 1
            raise self.error
        return await super().append_batch(items, ack_timeout=ack_timeout)


@pytest.mark.parametrize(
    "error",
    [
        nats.js.errors.ServiceUnavailableError(),
        nats.errors.NoRespondersError(),
        AppendError("no stream accepts the batch subject", transient=True),
    ],
    ids=["service_unavailable", "no_responders", "transient_append"],
)
async def test_an_unreceived_append_is_sent_again_within_the_deadline(
    tmp_path: Path, error: Exception
) -> None:
    ctx, _ = memory_context(tmp_path)
    log = Reloading(3, error)
    ctx.store = log  # type: ignore[assignment]
    done = await AdminHandlers(ctx).define_tier(p.DefineTier(tier="gold"), _call(30.0))
    assert done.seq == 1 and [type(e) for e in log.events()] == [m.TierDefined]


async def test_a_log_that_stays_away_is_unavailable_at_the_deadline(tmp_path: Path) -> None:
    ctx, _ = memory_context(tmp_path)
    log = Reloading(10**6, nats.js.errors.ServiceUnavailableError())
    ctx.store = log  # type: ignore[assignment]
    with pytest.raises(DammError) as err:
        await AdminHandlers(ctx).define_tier(p.DefineTier(tier="gold"), _call(1.5))
    assert err.value.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)
    assert log.messages == []
