"""Deadlines end to end (issue 11, finding 3 and 7): the client says how long it waits, the
router and the enrollment committer never record a request after that, and a client that
waited out a reconnect still gets its grace for "no responders"."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from damm.clock import FrozenClock
from damm.errors import Code, DammError
from damm.events.store import Append, Appended, AppendError, ConflictError
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.protocol.router import Call, Service, budget_s, ok_reply, route
from damm.stack.nats_server import NatsServer
from tests.fleet import keypair
from tests.memory_log import memory_context
from tests.test_decisions import Fleet, call_as


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    clock = FrozenClock()
    ctx, log = memory_context(tmp_path, clock)
    f = Fleet(ctx, log, clock)
    f.enrollment.start()
    await f.tier()
    await f.gateway()
    yield f
    await f.enrollment.stop()


async def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def token_uses(fleet: Fleet, token_id: str) -> int:
    return next(t.uses for t in fleet.ctx.state.tokens_by_hash.values() if t.token_id == token_id)


def enroll_req(token: str, key: str, request_id: str | None = None) -> p.Enroll:
    return p.Enroll(token=token, public_key=key, request_id=request_id or uuid.uuid4().hex)


async def test_a_rerun_with_a_new_request_id_gets_the_recorded_enrollment(fleet: Fleet) -> None:
    """`damm device enroll` run again mints a new request id but reuses its key."""
    tok = await fleet.token(uses=5)
    _, key = keypair()
    first = await fleet.enroll(tok.token, key)
    count = len(fleet.log.messages)
    again = await fleet.enroll(tok.token, key)
    assert again == first
    assert len(fleet.log.messages) == count
    assert token_uses(fleet, tok.token_id) == 1


async def test_the_same_key_on_another_token_is_still_key_reused(fleet: Fleet) -> None:
    tok, other = await fleet.token(), await fleet.token()
    _, key = keypair()
    await fleet.enroll(tok.token, key)
    with pytest.raises(DammError) as info:
        await fleet.enroll(other.token, key)
    assert info.value.code is Code.KEY_REUSED


async def test_a_request_whose_deadline_passes_in_the_queue_is_never_recorded(
    fleet: Fleet,
) -> None:
    tok = await fleet.token()
    gate = asyncio.Event()
    real_append = fleet.log.append_batch

    entered = asyncio.Event()

    async def slow_append(items: Sequence[Append], **_: object) -> Appended:
        entered.set()
        await gate.wait()  # a blocked log: a lost race waiting in sync(), a leader election
        return await real_append(items)

    fleet.log.append_batch = slow_append  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    blocked = asyncio.create_task(fleet.enroll(tok.token))
    await entered.wait()  # the first group is in flight
    deadline = loop.time() + 0.05
    late_call = Call(uuid.uuid4().hex, call_as("device").actor, deadline)
    late = asyncio.create_task(
        fleet.enrollment.enroll(enroll_req(tok.token, keypair()[1]), late_call)
    )
    await asyncio.sleep(deadline - loop.time() + 0.01)  # the caller gives up meanwhile
    gate.set()
    await blocked
    with pytest.raises(DammError) as info:
        await late
    assert info.value.code is Code.DEADLINE_EXCEEDED
    assert token_uses(fleet, tok.token_id) == 1
    assert len(fleet.ctx.state.devices) == 1


async def test_lost_races_are_retried_until_the_deadline_not_a_fixed_count(
    fleet: Fleet,
) -> None:
    """Two replicas on one token lose races to each other; a request fails only when its
    caller would have given up anyway."""
    tok = await fleet.token()
    real_append = fleet.log.append_batch
    losses = 25

    async def contended(items: Sequence[Append], **_: object) -> Appended:
        nonlocal losses
        if losses:
            losses -= 1
            raise ConflictError(items[0].subject, "wrong last sequence")
        return await real_append(items)

    fleet.log.append_batch = contended  # type: ignore[method-assign]
    in_time = Call(uuid.uuid4().hex, call_as("device").actor, asyncio.get_running_loop().time() + 5)
    enrolled = await fleet.enrollment.enroll(enroll_req(tok.token, keypair()[1]), in_time)
    assert losses == 0
    assert enrolled.device_id in fleet.ctx.state.devices


def test_the_budget_header_is_capped_and_checked() -> None:
    assert budget_s(None) == p.DEFAULT_BUDGET_MS / 1000
    assert budget_s("1500") == 1.5
    assert budget_s("99999999") == p.MAX_BUDGET_MS / 1000
    for bad in ("", "-5", "1.5", "abc", "٣"):
        with pytest.raises(DammError) as info:
            budget_s(bad)
        assert info.value.code is Code.MALFORMED_REQUEST


async def test_the_handler_sees_the_clients_deadline_and_skips_expired_requests(
    nc: NATS, admin_nc: NATS
) -> None:
    seen: list[Call] = []
    release = asyncio.Event()

    async def handler(req: p.DefineTier, call_: Call) -> p.Done:
        seen.append(call_)
        if req.tier == "slow":
            await release.wait()
        return p.Done(seq=len(seen))

    service = Service(nc, [route("admin.tier.define", p.DefineTier, handler)], max_in_flight=1)
    await service.start()
    try:
        loop = asyncio.get_running_loop()
        before = loop.time()
        await call(admin_nc, "admin.tier.define", p.DefineTier(tier="fast"), p.Done, timeout=2.0)
        assert before + 1.5 < seen[0].deadline <= before + 2.0
        slow = asyncio.create_task(
            call(admin_nc, "admin.tier.define", p.DefineTier(tier="slow"), p.Done, timeout=5.0)
        )
        await wait_until(lambda: len(seen) == 2)
        # Waits for the one slot behind "slow" and gives up before it frees.
        with pytest.raises(DammError) as info:
            await call(
                admin_nc, "admin.tier.define", p.DefineTier(tier="queued"), p.Done, timeout=0.3
            )
        assert info.value.code is Code.UNAVAILABLE
        release.set()
        await slow
        await call(admin_nc, "admin.tier.define", p.DefineTier(tier="after"), p.Done)
        assert [c.deadline > 0 for c in seen] == [True] * 3  # "queued" never reached it
    finally:
        await service.stop()


async def test_a_request_buffered_through_a_reconnect_still_gets_its_grace(
    nats_server: NatsServer,
) -> None:
    """The server restarts; the client's request waits for the reconnect, then meets "no
    responders" until the control plane has subscribed again, a moment later."""
    password = nats_server.passwords["control"]
    admin = nats_server.passwords["admin"]
    client = await connect(nats_server.url, user="admin", password=admin)
    port = urlsplit(nats_server.url).port
    assert port is not None

    async def serve() -> NATS:
        """The control plane subscribes a moment after the client is back."""
        await wait_until(lambda: client.is_connected, 10)
        await asyncio.sleep(0.3)
        server_nc = await connect(nats_server.url, user="control", password=password)

        async def answer(msg: Msg) -> None:
            await server_nc.publish(msg.reply, ok_reply(p.Done(seq=1)))

        await server_nc.subscribe("damm.req.admin.tier.define", cb=answer)
        return server_nc

    try:
        nats_server.stop()
        # A request sent into the dying socket is simply lost: send after the client noticed.
        await wait_until(lambda: not client.is_connected)
        pending = asyncio.create_task(
            call(client, "admin.tier.define", p.DefineTier(tier="gold"), p.Done, timeout=10.0)
        )
        await asyncio.sleep(1.2)  # an outage longer than the old one-second window
        nats_server.port = port
        nats_server.start()
        server_nc = await serve()
        done = await pending
        assert done.seq == 1
        await server_nc.close()
    finally:
        await client.close()


@pytest.mark.parametrize(
    "trouble",
    [
        lambda: AppendError("no stream accepts the batch subject", transient=True),
        lambda: nats.errors.TimeoutError(),
    ],
    ids=["no-stream-leader", "no-ack"],
)
async def test_a_log_without_a_leader_is_waited_out_within_the_deadline(
    fleet: Fleet, trouble: Callable[[], Exception]
) -> None:
    """While a cluster elects a stream leader, appends find no responder or time out; the
    group is tried again (a batch that did land comes back as a duplicate) until the deadline."""
    tok = await fleet.token()
    real_append = fleet.log.append_batch
    failures = 3

    async def leaderless(items: Sequence[Append], **_: object) -> Appended:
        nonlocal failures
        if failures:
            failures -= 1
            raise trouble()
        return await real_append(items)

    fleet.log.append_batch = leaderless  # type: ignore[method-assign]
    in_time = Call(uuid.uuid4().hex, call_as("device").actor, asyncio.get_running_loop().time() + 5)
    enrolled = await fleet.enrollment.enroll(enroll_req(tok.token, keypair()[1]), in_time)
    assert failures == 0
    assert token_uses(fleet, tok.token_id) == 1
    assert enrolled.device_id in fleet.ctx.state.devices


async def test_a_full_store_is_not_retried(fleet: Fleet) -> None:
    tok = await fleet.token()

    async def full(items: Sequence[Append], **_: object) -> Appended:
        raise AppendError("10023: insufficient resources")

    fleet.log.append_batch = full  # type: ignore[method-assign]
    in_time = Call(uuid.uuid4().hex, call_as("device").actor, asyncio.get_running_loop().time() + 5)
    with pytest.raises(DammError) as info:
        await fleet.enrollment.enroll(enroll_req(tok.token, keypair()[1]), in_time)
    assert info.value.code is Code.UNAVAILABLE and "insufficient resources" in info.value.detail


async def test_a_request_sent_again_while_the_first_copy_waits_gets_its_outcome(
    fleet: Fleet,
) -> None:
    """A client whose connection dropped sends the same request again (same request id); when
    both copies reach one replica while the first still waits in the queue, the second gets the
    first one's enrollment, not "the same request is already in flight"."""
    tok = await fleet.token()
    req = enroll_req(tok.token, keypair()[1])
    deadline = asyncio.get_running_loop().time() + 5
    first, again = await asyncio.gather(
        fleet.enrollment.enroll(req, Call(uuid.uuid4().hex, call_as("device").actor, deadline)),
        fleet.enrollment.enroll(req, Call(uuid.uuid4().hex, call_as("device").actor, deadline)),
    )
    assert again.device_id == first.device_id
    assert token_uses(fleet, tok.token_id) == 1
