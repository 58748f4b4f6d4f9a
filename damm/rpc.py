"""Calling a control-plane command: the client half of the request/reply protocol."""

from __future__ import annotations

import uuid
from typing import TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client as NATS

from damm.errors import Code, DammError
from damm.events.subjects import request_subject
from damm.handlers.protocol import Reply

T = TypeVar("T")

_reply = msgspec.json.Decoder(Reply)
_encoder = msgspec.json.Encoder()


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
    try:
        msg = await nc.request(
            request_subject(command), _encoder.encode(request), timeout=timeout, headers=headers
        )
    except nats.errors.NoRespondersError:
        raise DammError(Code.UNAVAILABLE, f"nothing serves {request_subject(command)}") from None
    except (TimeoutError, nats.errors.TimeoutError):
        raise DammError(Code.UNAVAILABLE, f"no reply within {timeout:g}s") from None
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
