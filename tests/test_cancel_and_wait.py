"""Stopping a background loop ends it even when one cancellation is lost (Python 3.11's
``wait_for`` under nats-py requests can swallow one; a replica's stop then hung for ever)."""

from __future__ import annotations

import asyncio
import contextlib

from damm.clock import cancel_and_wait


async def _loop_that_loses_one_cancel(ticks: list[int]) -> None:
    lost = False
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if lost:
                raise
            lost = True  # as wait_for does when its inner future completes at the same moment
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        ticks.append(1)


async def test_a_plain_cancel_is_lost_and_the_loop_runs_on() -> None:
    ticks: list[int] = []
    task = asyncio.create_task(_loop_that_loses_one_cancel(ticks))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.1)
    assert not task.done()
    await cancel_and_wait(task, every_s=0.05)


async def test_cancel_and_wait_ends_it() -> None:
    ticks: list[int] = []
    task = asyncio.create_task(_loop_that_loses_one_cancel(ticks))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(cancel_and_wait(task, every_s=0.05), 5)
    assert task.cancelled()


async def test_a_task_that_failed_or_finished_is_waited_for_quietly() -> None:
    async def boom() -> None:
        raise RuntimeError("already broken")

    failed = asyncio.create_task(boom())
    with contextlib.suppress(RuntimeError):
        await asyncio.sleep(0)
    await cancel_and_wait(failed)
    assert failed.done()
