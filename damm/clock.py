"""Time as a value handed to decisions.

Decisions take ``now`` as an argument; the processes around them read it from a ``Clock``. Tests
pass a ``FrozenClock`` and move it, instead of sleeping through a TTL or an expiry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


class SkewedClock:
    """The system clock, moved forward on demand: servers keep running in real time while a test
    jumps past a TTL or an expiry."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> datetime:
        self.offset += timedelta(seconds=seconds)
        return self()


class FrozenClock:
    """A clock that stands still until told to move."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


async def sleep_or_stop(seconds: float, *stops: asyncio.Event) -> bool:
    """Sleep up to ``seconds``; return early, True, as soon as any ``stops`` event is set.

    Every background loop waits this way, so a stop is never held up by a long interval.
    """
    if any(stop.is_set() for stop in stops):
        return True
    waiters = [asyncio.ensure_future(stop.wait()) for stop in stops]
    try:
        done, _ = await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)


async def cancel_and_wait(task: asyncio.Future[Any], *, every_s: float = 0.5) -> None:
    """Cancel ``task`` and return once it has ended, whatever it raised.

    Python 3.11's ``asyncio.wait_for`` (under every nats-py request) loses a cancellation that
    arrives as its inner future completes; the task then runs on, and a plain ``cancel(); await``
    waited for ever (a replica's stop hung so in the suite). So the cancel is repeated until the
    task is done.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
    if not task.cancelled():
        task.exception()  # retrieved: its end was wanted, not a failure to report
