"""The client half of request/reply: typed results, catalogued errors, no-responder grace."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from damm.errors import Code, DammError
from damm.protocol import messages as p
from damm.protocol.client import NO_RESPONDERS_GRACE_S, call
from damm.protocol.router import error_reply, ok_reply


async def test_unserved_command_is_unavailable_after_a_short_grace(admin_nc: NATS) -> None:
    nc = admin_nc  # the control-plane user may not send requests; the admin tool may
    started = time.monotonic()
    with pytest.raises(DammError) as info:
        await call(nc, "admin.tier.define", p.DefineTier(tier="gold"), p.Done)
    took = time.monotonic() - started
    assert info.value.code is Code.UNAVAILABLE
    assert "nothing serves damm.req.admin.tier.define" in info.value.detail
    assert took < NO_RESPONDERS_GRACE_S + 0.5


async def test_a_handler_that_arrives_during_the_grace_is_reached(admin_nc: NATS) -> None:
    nc = admin_nc  # the control-plane user may not send requests; the admin tool may

    async def serve() -> None:
        await asyncio.sleep(0.2)

        async def answer(msg: Msg) -> None:
            await nc.publish(msg.reply, ok_reply(p.Done(seq=7)))

        await nc.subscribe("damm.req.admin.tier.define", cb=answer)

    task = asyncio.create_task(serve())
    done = await call(nc, "admin.tier.define", p.DefineTier(tier="gold"), p.Done)
    await task
    assert done.seq == 7


async def test_error_replies_become_the_catalogued_error(admin_nc: NATS) -> None:
    nc = admin_nc  # the control-plane user may not send requests; the admin tool may

    async def refuse(msg: Msg) -> None:
        await nc.publish(msg.reply, error_reply(DammError(Code.TOKEN_EXPIRED, "token t1")))

    await nc.subscribe("damm.req.enroll", cb=refuse)
    with pytest.raises(DammError) as info:
        await call(nc, "enroll", p.Enroll(token="dmt_x", public_key="k", request_id="r"), p.Done)
    assert info.value.code is Code.TOKEN_EXPIRED and info.value.detail == "token t1"
