"""Quota policy against a real control plane: usage over request/reply, the reactor, the fold."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from damm.control.process import ControlPlane
from damm.control.reactors.quota import (
    NEW_PERIOD,
    OVER_QUOTA,
    UNDER_QUOTA,
    Candidate,
    QuotaReactor,
    decide,
    is_over,
)
from damm.errors import Code, DammError
from damm.events import model as m
from damm.protocol import messages as p
from damm.protocol.client import call
from tests.fleet import enroll, keypair, setup_fleet

LIMIT = 1000


class Clock:
    def __init__(self) -> None:
        self.at = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
async def quota(control: ControlPlane, dsn: str) -> AsyncIterator[tuple[QuotaReactor, Clock]]:
    clock = Clock()
    reactor, owned = attach_reactor(control, dsn, clock)
    yield reactor, clock
    if owned:
        await reactor.stop()


def attach_reactor(
    control: ControlPlane, dsn: str, clock: Callable[[], datetime] | None = None
) -> tuple[QuotaReactor, bool]:
    """The control plane's own reactor when it runs one (with our clock), else a new one."""
    assert control.ctx is not None
    wired = getattr(control, "quota", None)
    if isinstance(wired, QuotaReactor):
        wired.interval_s = 0.05
        if clock is not None:
            wired.now = clock
        return wired, False
    reactor = QuotaReactor(control.ctx, dsn, interval_s=0.05, now=clock)
    reactor.start()
    return reactor, True


async def report(
    gw_nc: NATS, fleet: dict[str, str], pub: str, rx: int, tx: int, report_id: str | None = None
) -> p.Done:
    return await call(
        gw_nc,
        "gateway.usage",
        p.ReportUsage(
            gateway_id="gw1",
            token=fleet["gw1_token"],
            report_id=report_id or uuid.uuid4().hex,
            entries=(p.UsageEntry(pub, rx, tx),),
        ),
        p.Done,
    )


async def status(dsn: str, device_id: str) -> tuple[str, str]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
    try:
        row = await conn.fetchrow(
            "SELECT status, coalesce(status_reason, '') FROM devices WHERE device_id=$1", device_id
        )
    finally:
        await conn.close()
    return (row[0], row[1]) if row is not None else ("", "")


async def wait_for(check: Callable[[], object], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def settle(control: ControlPlane, reactor: QuotaReactor, sweeps: int = 3) -> None:
    """Projection caught up, then a few full sweeps of the reactor after that."""
    await control.wait_projected()
    start = reactor.sweeps
    await wait_for(lambda: reactor.sweeps >= start + sweeps)
    await control.wait_projected()


async def usage(dsn: str, device_id: str) -> int:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
    try:
        return int(
            await conn.fetchval(
                "SELECT coalesce(sum(rx_bytes + tx_bytes), 0) FROM usage_totals WHERE device_id=$1",
                device_id,
            )
        )
    finally:
        await conn.close()


async def _device(
    control: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
) -> tuple[dict[str, str], str, str]:
    fleet = await setup_fleet(admin_nc, gateway_nc, byte_limit=LIMIT)
    _, pub = keypair()
    dev = await enroll(device_nc, fleet["token"], public_key=pub)
    return fleet, pub, dev.device_id


def in_peer_set(control: ControlPlane, pub: str) -> bool:
    assert control.ctx is not None
    return any(key == pub for key, _ in control.ctx.state.peer_set("gw1"))


def test_pure_policy() -> None:
    assert not is_over(LIMIT, LIMIT)
    assert is_over(LIMIT + 1, LIMIT)
    assert not is_over(10**15, None)
    now = datetime(2026, 11, 25, tzinfo=UTC)
    rows = [
        Candidate("a", "active", "", LIMIT, LIMIT + 1, now),
        Candidate("b", "active", "", LIMIT, LIMIT, now),
        Candidate("c", "suspended", OVER_QUOTA, LIMIT, 0, now - timedelta(days=40)),
        Candidate("d", "suspended", OVER_QUOTA, LIMIT, 0, now),
        Candidate("e", "suspended", OVER_QUOTA, LIMIT, LIMIT + 5, now),
        Candidate("f", "suspended", "admin", LIMIT, 0, now),
    ]
    got = {(a.device_id, type(a.event).__name__, a.event.reason) for a in decide(rows, "2026-11")}
    assert got == {
        ("a", "DeviceSuspended", OVER_QUOTA),
        ("c", "DeviceResumed", NEW_PERIOD),
        ("d", "DeviceResumed", UNDER_QUOTA),
    }


async def test_exactly_at_limit_is_not_over_and_one_more_byte_is(
    control: ControlPlane,
    quota: tuple[QuotaReactor, Clock],
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    dsn: str,
) -> None:
    reactor, _ = quota
    fleet, pub, device_id = await _device(control, admin_nc, gateway_nc, device_nc)
    await report(gateway_nc, fleet, pub, 600, 400)
    await settle(control, reactor)
    assert await usage(dsn, device_id) == LIMIT
    assert await status(dsn, device_id) == ("active", "")
    assert in_peer_set(control, pub)
    await report(gateway_nc, fleet, pub, 1, 0)
    await wait_for(lambda: _is(dsn, device_id, "suspended"))
    assert await status(dsn, device_id) == ("suspended", OVER_QUOTA)
    assert not in_peer_set(control, pub)


async def _is(dsn: str, device_id: str, want: str) -> bool:
    return (await status(dsn, device_id))[0] == want


async def suspensions(control: ControlPlane, device_id: str) -> list[m.Envelope]:
    assert control.ctx is not None
    history, _ = await control.ctx.store.load(f"damm.evt.device.{device_id}")
    return [e for e in history if isinstance(e.event, m.DeviceSuspended | m.DeviceResumed)]


async def test_burst_crossing_in_one_report_suspends_once_by_policy(
    control: ControlPlane,
    quota: tuple[QuotaReactor, Clock],
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    dsn: str,
) -> None:
    reactor, _ = quota
    fleet, pub, device_id = await _device(control, admin_nc, gateway_nc, device_nc)
    await report(gateway_nc, fleet, pub, 10 * LIMIT, 5 * LIMIT)
    await wait_for(lambda: _is(dsn, device_id, "suspended"))
    await report(gateway_nc, fleet, pub, 1, 1)  # more traffic while suspended: no new event
    await settle(control, reactor)
    history = await suspensions(control, device_id)
    assert len(history) == 1
    assert history[0].actor == m.Actor("policy", "quota")
    assert history[0].event == m.DeviceSuspended(device_id=device_id, reason=OVER_QUOTA)
    assert not in_peer_set(control, pub)


async def test_duplicate_reports_are_counted_once(
    control: ControlPlane,
    quota: tuple[QuotaReactor, Clock],
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    dsn: str,
) -> None:
    reactor, _ = quota
    fleet, pub, device_id = await _device(control, admin_nc, gateway_nc, device_nc)
    first = await report(gateway_nc, fleet, pub, 300, 300, report_id="r-1")
    again = await report(gateway_nc, fleet, pub, 300, 300, report_id="r-1")
    assert again.seq == first.seq  # the stream deduplicated it (Nats-Msg-Id)
    await settle(control, reactor)
    assert await usage(dsn, device_id) == 600
    assert await status(dsn, device_id) == ("active", "")  # 1200 would have been over


async def test_new_period_resumes_quota_suspended_devices_only(
    control: ControlPlane,
    quota: tuple[QuotaReactor, Clock],
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    dsn: str,
) -> None:
    reactor, clock = quota
    fleet, pub, device_id = await _device(control, admin_nc, gateway_nc, device_nc)
    other = await enroll(device_nc, fleet["token"])
    await call(admin_nc, "admin.device.suspend", p.DeviceAction(device_id=other.device_id), p.Done)
    await report(gateway_nc, fleet, pub, LIMIT, 1)
    await wait_for(lambda: _is(dsn, device_id, "suspended"))
    clock.at = clock.at + timedelta(days=32)  # next calendar month
    await wait_for(lambda: _is(dsn, device_id, "active"))
    assert await status(dsn, device_id) == ("active", NEW_PERIOD)
    assert in_peer_set(control, pub)
    await settle(control, reactor)
    assert await status(dsn, other.device_id) == ("suspended", "admin")  # not the policy's to lift
    history = await suspensions(control, device_id)
    assert [e.event.reason for e in history] == [OVER_QUOTA, NEW_PERIOD]  # type: ignore[union-attr]


async def test_admin_resume_without_reset_is_refused_but_reset_works(
    control: ControlPlane,
    quota: tuple[QuotaReactor, Clock],
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    dsn: str,
) -> None:
    reactor, _ = quota
    fleet, pub, device_id = await _device(control, admin_nc, gateway_nc, device_nc)
    await report(gateway_nc, fleet, pub, 2 * LIMIT, 0)
    await wait_for(lambda: _is(dsn, device_id, "suspended"))
    # Resuming a device still over its limit is refused: it would not stick.
    with pytest.raises(DammError) as refused:
        await call(admin_nc, "admin.device.resume", p.DeviceAction(device_id=device_id), p.Done)
    assert refused.value.code is Code.OVER_QUOTA
    await settle(control, reactor)
    assert await status(dsn, device_id) == ("suspended", OVER_QUOTA)
    reasons = [e.event.reason for e in await suspensions(control, device_id)]  # type: ignore[union-attr]
    assert reasons == [OVER_QUOTA]
    # Reset the period, then resume: it stays resumed (the reset alone would also lift it).
    await call(admin_nc, "admin.usage.reset", p.ResetUsage(device_id=device_id), p.Done)
    await wait_for(lambda: _is(dsn, device_id, "active"))
    await call(admin_nc, "admin.device.resume", p.DeviceAction(device_id=device_id), p.Done)
    await settle(control, reactor)
    assert await status(dsn, device_id) == ("active", UNDER_QUOTA)
    assert await usage(dsn, device_id) == 0
    assert in_peer_set(control, pub)
    # Counting starts again from zero: at the limit fine, over it suspended again.
    await report(gateway_nc, fleet, pub, LIMIT, 0)
    await settle(control, reactor)
    assert await status(dsn, device_id) == ("active", UNDER_QUOTA)
    await report(gateway_nc, fleet, pub, 0, 1)
    await wait_for(lambda: _is(dsn, device_id, "suspended"))


async def test_reset_then_admin_resume_order(
    control: ControlPlane,
    quota: tuple[QuotaReactor, Clock],
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    dsn: str,
) -> None:
    """Resume first, then reset at once: the reactor never judges the resume on stale totals."""
    reactor, _ = quota
    fleet, pub, device_id = await _device(control, admin_nc, gateway_nc, device_nc)
    await report(gateway_nc, fleet, pub, 2 * LIMIT, 0)
    await wait_for(lambda: _is(dsn, device_id, "suspended"))
    await call(admin_nc, "admin.usage.reset", p.ResetUsage(device_id=device_id), p.Done)
    await call(admin_nc, "admin.device.resume", p.DeviceAction(device_id=device_id), p.Done)
    await settle(control, reactor)
    assert (await status(dsn, device_id))[0] == "active"
    reasons = [e.event.reason for e in await suspensions(control, device_id)]  # type: ignore[union-attr]
    assert reasons.count(OVER_QUOTA) == 1
