"""Calling a control-plane command: the client half of the request/reply protocol."""

from __future__ import annotations

import asyncio
import uuid
from typing import TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from damm.errors import Code, DammError
from damm.protocol.messages import Reply
from damm.subjects import request_subject

T = TypeVar("T")

_reply = msgspec.json.Decoder(Reply)
_encoder = msgspec.json.Encoder()


NO_RESPONDERS_GRACE_S = 1.0


async def _request(
    nc: NATS, subject: str, payload: bytes, timeout: float, headers: dict[str, str]
) -> Msg:
    """A request, retried while nobody serves the subject for up to a second.

    "No responders" means the request reached no handler, so sending it again cannot record
    anything twice; it happens while handler processes restart and for a moment after one has
    just subscribed.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + min(NO_RESPONDERS_GRACE_S, timeout)
    delay = 0.05
    while True:
        try:
            msg: Msg = await nc.request(subject, payload, timeout=timeout, headers=headers)
            return msg
        except nats.errors.NoRespondersError:
            if loop.time() + delay > give_up:
                raise DammError(Code.UNAVAILABLE, f"nothing serves {subject}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        except (TimeoutError, nats.errors.TimeoutError):
            raise DammError(Code.UNAVAILABLE, f"no reply within {timeout:g}s") from None


async def call(
    nc: NATS,
    command: str,
    request: msgspec.Struct,
    result_type: type[T],
    *,
    timeout: float = 5.0,
    correlation_id: str | None = None,
    actor: str | None = None,
) -> T:
    """Send a command and return its typed result, or raise the ``DammError`` it answered.

    ``actor`` names the operator in the events an admin command causes.
    """
    headers = {"Damm-Correlation-Id": correlation_id or uuid.uuid4().hex}
    if actor:
        headers["Damm-Actor"] = actor
    msg = await _request(nc, request_subject(command), _encoder.encode(request), timeout, headers)
    try:
        reply = _reply.decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise DammError(Code.INTERNAL, f"unreadable reply: {exc}") from None
    if not reply.ok:
        err = reply.error
        if err is None:
            raise DammError(Code.INTERNAL, "error reply without a body")
        raise DammError.from_slug(err.code, err.detail)
    if bytes(reply.result) in (b"", b"null"):
        raise DammError(Code.INTERNAL, "reply without a result")
    try:
        return msgspec.json.decode(reply.result, type=result_type)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise DammError(Code.INTERNAL, f"unexpected result shape: {exc}") from None
