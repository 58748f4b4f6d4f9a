"""Calling a control-plane command: the client half of the request/reply protocol."""

from __future__ import annotations

import asyncio
import uuid
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from damm.errors import Code, DammError
from damm.protocol.messages import TIMEOUT_HEADER, Reply
from damm.subjects import gateway_reply_prefix, request_subject

T = TypeVar("T")

_reply = msgspec.json.Decoder(Reply)
_encoder = msgspec.json.Encoder()


NO_RESPONDERS_GRACE_S = 1.0
# The server's budget is this much shorter than the client's wait, so a request the server still
# records is one whose client is still listening for the answer.
REPLY_MARGIN_S = 0.2


REPLY_TOKEN_HEADER = "Damm-Reply-Token"  # damm.protocol.router reads it

# Commands whose request is safe to send twice: sent again, each returns what the first
# recorded (enrollment is idempotent per key and token, a rotation already done is returned),
# so a copy lost with its connection is sent again rather than waited out.
RESENDABLE = frozenset({"enroll", "device.rotate_key"})


class _Drops:
    """Wakes the requests in flight on a connection when it drops: their request or its
    answer may have gone down with the server (a reply to an inbox nobody is subscribed to is
    dropped), and waiting out the whole deadline would fail a request the next server could
    answer at once."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def dropped(self) -> None:
        self.event.set()
        self.event = asyncio.Event()


_drops: weakref.WeakKeyDictionary[NATS, _Drops] = weakref.WeakKeyDictionary()


def connection_dropped(nc: NATS) -> None:
    """Called by the connection's disconnect callback (damm.protocol.bus)."""
    drops = _drops.get(nc)
    if drops is not None:
        drops.dropped()


def _drops_of(nc: NATS) -> _Drops:
    drops = _drops.get(nc)
    if drops is None:
        drops = _drops[nc] = _Drops()
    return drops


class PrivateReplies:
    """A gateway's answers. The control plane sends them to ``damm.gwr.<gateway>.<token>``, on
    subjects only that gateway may read, never to the reply subject a request names (in the one
    gateway account that could be another gateway's); one subscription here receives them and
    hands each to the request waiting for its token."""

    def __init__(self, nc: NATS, prefix: str) -> None:
        self.nc = nc
        self.prefix = prefix
        self._sub: object | None = None
        self._lock = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[Msg]] = {}

    async def _on_msg(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject[len(self.prefix) + 1 :])
        if future is not None and not future.done():
            future.set_result(msg)

    async def request(
        self, subject: str, payload: bytes, timeout: float, headers: dict[str, str]
    ) -> Msg:
        async with self._lock:
            if self._sub is None:
                self._sub = await self.nc.subscribe(f"{self.prefix}.>", cb=self._on_msg)
        token = uuid.uuid4().hex
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        try:
            await self.nc.publish(
                subject,
                payload,
                reply=f"{self.prefix}.{token}",
                headers={**headers, REPLY_TOKEN_HEADER: token},
            )
            msg = await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(token, None)
        if msg.headers and msg.headers.get("Status") == "503":
            raise nats.errors.NoRespondersError
        return msg


_private: weakref.WeakKeyDictionary[NATS, PrivateReplies] = weakref.WeakKeyDictionary()


def use_private_replies(nc: NATS, gateway_id: str) -> None:
    """Every ``call`` on ``nc`` from now on takes its answer on the gateway's own subjects."""
    _private[nc] = PrivateReplies(nc, gateway_reply_prefix(gateway_id))


async def _request(
    nc: NATS,
    subject: str,
    payload: bytes,
    timeout: float,
    headers: dict[str, str],
    *,
    resend: bool = False,
) -> Msg:
    """A request within ``timeout`` overall, retried while nobody serves the subject.

    "No responders" means the request reached no handler, so sending it again cannot record
    anything twice; it happens while handler processes restart and for a moment after one has
    just subscribed. The grace for it starts at the first such answer, not before the first
    send: a request that waited out a reconnect still gets its full second once it is sent.
    Nothing is sent while disconnected (nats-py would buffer it and deliver it late, with a
    budget computed before the wait), and each send carries the time left as the server's budget.

    With ``resend`` (a request that is safe to send twice), a request whose connection drops
    while it waits is sent again once connected, within the same deadline: the node it went
    through may have died holding it, or the answer may have come while no server had our
    inbox. Every copy carries the time left, so none is recorded after the client gives up.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    give_up: float | None = None
    delay = 0.05
    while True:
        while not nc.is_connected:
            if nc.is_closed or loop.time() + 0.02 > deadline:
                raise DammError(Code.UNAVAILABLE, f"not connected to NATS within {timeout:g}s")
            await asyncio.sleep(0.02)
        left = deadline - loop.time()
        if left <= 0:
            raise DammError(Code.UNAVAILABLE, f"no reply within {timeout:g}s")
        budget_ms = max(1, int((left - min(REPLY_MARGIN_S, left / 2)) * 1000))
        try:
            sent = {**headers, TIMEOUT_HEADER: str(budget_ms)}
            private = _private.get(nc)
            if private is not None:
                asking = private.request(subject, payload, left, sent)
            else:
                asking = nc.request(subject, payload, timeout=left, headers=sent)
            if not resend:
                msg: Msg = await asking
                return msg
            answered = await _unless_dropped(nc, asking)
            if answered is not None:
                return answered
            continue  # dropped: wait for the connection, then send the same request again
        except nats.errors.NoRespondersError:
            now = loop.time()
            if give_up is None:
                give_up = min(now + NO_RESPONDERS_GRACE_S, deadline)
            if now + delay > give_up:
                raise DammError(Code.UNAVAILABLE, f"nothing serves {subject}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        except (TimeoutError, nats.errors.TimeoutError):
            raise DammError(Code.UNAVAILABLE, f"no reply within {timeout:g}s") from None


async def _unless_dropped(nc: NATS, asking: Coroutine[Any, Any, Msg]) -> Msg | None:
    """The answer, or None if the connection dropped first (the request is abandoned)."""
    dropped = _drops_of(nc).event
    answer = asyncio.ensure_future(asking)
    drop = asyncio.ensure_future(dropped.wait())
    try:
        await asyncio.wait((answer, drop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        drop.cancel()
        if not answer.done():
            answer.cancel()
            answer.add_done_callback(_quietly)
    if answer.done() and not answer.cancelled():
        return answer.result()
    return None


def _quietly(future: asyncio.Future[Msg]) -> None:
    """Retrieve an abandoned request's outcome, so asyncio does not log it as never read."""
    if not future.cancelled():
        future.exception()


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
    msg = await _request(
        nc,
        request_subject(command),
        _encoder.encode(request),
        timeout,
        headers,
        resend=command in RESENDABLE,
    )
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
