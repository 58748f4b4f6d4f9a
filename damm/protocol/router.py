"""The NATS plumbing for commands, in one place.

A route is a subject, a request type and an async handler. The service subscribes every route in
a queue group (so several control-plane processes share the load), checks the body size before
decoding, decodes with msgspec (which validates), binds the correlation id to the log context, and
answers with a result or a catalogued error. Handlers stay plain functions of a typed request.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from damm import log
from damm.domain.throttle import Buckets, Rate
from damm.errors import Code, DammError
from damm.events.model import Actor
from damm.metrics import ControlMetrics
from damm.protocol.messages import (
    DEFAULT_BUDGET_MS,
    MAX_BUDGET_MS,
    MAX_REQUEST_BYTES,
    TIMEOUT_HEADER,
    ErrorBody,
    Reply,
)
from damm.subjects import gateway_reply_prefix, request_subject

_log = log.get("damm.handlers")
_encoder = msgspec.json.Encoder()

QUEUE_GROUP = "damm-control"

CORRELATION_HEADER = "Damm-Correlation-Id"
ACTOR_HEADER = "Damm-Actor"
# Both headers are copied into every event a request causes: bounded and plain, or refused.
_CORRELATION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_ACTOR = re.compile(r"[A-Za-z0-9_.@+-]{1,64}")
# Where an answer may go: an inbox. Outside parties' replies arrive mapped by the server
# (``_R_.``, see damm.stack.nats_config); this check is the second line behind that.
REPLY_SUBJECT = re.compile(
    r"(_R_|_INBOX|_INBOX_[A-Za-z0-9_-]{1,80}|damm\.gwr\.[A-Za-z0-9_-]{1,64})"
    r"(\.[A-Za-z0-9_-]{1,64}){1,4}"
)
# A gateway names where its answer goes only by a token under its own reply prefix: in the one
# gateway account, the reply subject it names could be another gateway's.
REPLY_TOKEN_HEADER = "Damm-Reply-Token"
_REPLY_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Unauthenticated requests (enrollment, catalog): an honest device makes a handful.
DEFAULT_PER_CONNECTION = Rate(per_second=2.0, burst=10.0)
DEFAULT_PER_SOURCE = Rate(per_second=20.0, burst=100.0)

BUS_TROUBLE = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.js.errors.NoStreamResponseError,
    # JetStream did not answer (leader election, overload, a reload of the server's accounts)
    nats.js.errors.ServiceUnavailableError,
)


@dataclass(frozen=True)
class Caller:
    """Who is on the other end, as the server saw the connection (``Nats-Request-Info``).

    ``name`` is what the auth callout put in the user JWT: ``device:<identity>``,
    ``enrolling:<identity>``, ``gateway:<id>`` or ``anon:-``. Only the callout issues those
    names, and the server overwrites any such header a client sends, so it cannot be forged.
    """

    account: str
    name: str
    client: str  # server id and client id: one connection
    host: str

    @property
    def kind(self) -> str:
        return self.name.split(":", 1)[0]

    @property
    def identity(self) -> str | None:
        kind, _, value = self.name.partition(":")
        return value if kind in ("device", "enrolling") and value else None

    @property
    def gateway(self) -> str | None:
        kind, _, value = self.name.partition(":")
        return value if kind == "gateway" and value else None

    @property
    def unauthenticated(self) -> bool:
        return self.account == UNAUTHENTICATED_ACCOUNT


UNAUTHENTICATED_ACCOUNT = "ANON"


class _RequestInfo(msgspec.Struct, frozen=True):
    acc: str = ""
    user: str = ""
    id: int = 0
    server: str = ""
    host: str = ""


_request_info = msgspec.json.Decoder(_RequestInfo)


def caller_of(headers: dict[str, str]) -> Caller | None:
    raw = headers.get("Nats-Request-Info")
    if not raw or len(raw) > 4096:
        return None
    try:
        info = _request_info.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return Caller(info.acc, info.user, f"{info.server}/{info.id}", info.host)


def _reply_to(reply: str, headers: dict[str, str], caller: Caller | None) -> str | None:
    """Where the answer goes, or None when nowhere is safe. A gateway (known from the
    server-stamped request info) is answered only under its own reply prefix; everyone else on
    the reply subject, which the server has mapped (``_R_``) for outside accounts."""
    if caller is not None and caller.gateway is not None:
        token = headers.get(REPLY_TOKEN_HEADER, "")
        if not _REPLY_TOKEN.fullmatch(token):
            return None
        try:
            return f"{gateway_reply_prefix(caller.gateway)}.{token}"
        except DammError:
            return None
    return reply if REPLY_SUBJECT.fullmatch(reply) else None


@dataclass(frozen=True)
class Call:
    """Who asked, the request's correlation id (the dedupe key for its events), and the event
    loop time after which its caller has given up (nothing may be recorded for it after that)."""

    correlation_id: str
    actor: Actor
    deadline: float = math.inf

    def expired(self, margin: float = 0.0) -> bool:
        """Past the deadline, or closer to it than ``margin`` (the time the work may take)."""
        return asyncio.get_running_loop().time() + margin >= self.deadline

    caller: Caller | None = None  # None: from inside the control plane's own account

    @property
    def identity(self) -> str | None:
        return self.caller.identity if self.caller else None


Handler = Callable[[Any, Call], Awaitable[msgspec.Struct]]


@dataclass(frozen=True)
class Route:
    command: str
    request_type: type[msgspec.Struct]
    handler: Handler
    max_bytes: int = MAX_REQUEST_BYTES

    @property
    def actor_kind(self) -> str:
        return self.command.split(".", 1)[0] if "." in self.command else "device"

    @property
    def subject(self) -> str:
        return request_subject(self.command)


def route(
    command: str,
    request_type: type[msgspec.Struct],
    handler: Any,
    max_bytes: int = MAX_REQUEST_BYTES,
) -> Route:
    return Route(command, request_type, handler, max_bytes)


def error_reply(err: DammError) -> bytes:
    body = ErrorBody(err.code.slug, err.code.message, err.detail, err.code.retryable)
    return _encoder.encode(Reply(ok=False, error=body))


def ok_reply(result: msgspec.Struct) -> bytes:
    return _encoder.encode(Reply(ok=True, result=msgspec.Raw(_encoder.encode(result))))


class Service:
    def __init__(
        self,
        nc: NATS,
        routes: Sequence[Route],
        *,
        queue: str = QUEUE_GROUP,
        max_in_flight: int = 512,
        metrics: ControlMetrics | None = None,
        trust_request_info: bool = False,
        per_connection: Rate | None = None,
        per_source: Rate | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``trust_request_info``: only when every outside account imports with ``share``
        (the auth-callout layout), so the server, not the client, wrote the header."""
        self.nc = nc
        self.metrics = metrics or ControlMetrics()
        self.routes = list(routes)
        self.queue = queue
        self._subs: list[Any] = []
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self.trust_request_info = trust_request_info
        self._clock = clock
        self._per_connection = Buckets(per_connection or DEFAULT_PER_CONNECTION)
        self._per_source = Buckets(per_source or DEFAULT_PER_SOURCE)

    async def start(self) -> None:
        for route in self.routes:
            decoder = msgspec.json.Decoder(route.request_type)

            async def on_msg(msg: Msg, route: Route = route, decoder: Any = decoder) -> None:
                # Stamp the arrival before waiting for a slot: nats-py delivers a subscription's
                # messages one callback at a time, so a callback that waited here left the next
                # requests unstamped in its queue, and an overloaded process recorded requests
                # whose callers had given up seconds earlier (the chaos suite found 190).
                received = time.perf_counter()  # waiting for a slot is part of the latency
                arrived = asyncio.get_running_loop().time()
                task = asyncio.create_task(self._slotted(route, decoder, msg, received, arrived))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

            self._subs.append(await self.nc.subscribe(route.subject, queue=self.queue, cb=on_msg))
        await self.nc.flush()

    async def _slotted(
        self, route: Route, decoder: Any, msg: Msg, received: float, arrived: float
    ) -> None:
        async with self._slots:
            await self._serve(route, decoder, msg, received, arrived)

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(
        self, route: Route, decoder: Any, msg: Msg, received: float, arrived: float
    ) -> None:
        headers = msg.headers or {}
        raw_id = headers.get(CORRELATION_HEADER)
        correlation_id = raw_id if raw_id and _CORRELATION_ID.fullmatch(raw_id) else None
        with structlog.contextvars.bound_contextvars(
            correlation_id=correlation_id or "-", command=route.command
        ):
            if not msg.reply:
                return
            caller = caller_of(headers) if self.trust_request_info else None
            reply = _reply_to(msg.reply, headers, caller)
            if reply is None:
                _log.warning(
                    "request dropped",
                    code=Code.BAD_REPLY_SUBJECT.slug,
                    reply=msg.reply[:80],
                    size=len(msg.data),
                )
                self.metrics.request(
                    route.command, Code.BAD_REPLY_SUBJECT.slug, time.perf_counter() - received
                )
                return
            try:
                code, body = await self._answer(
                    route, decoder, msg, headers, correlation_id, arrived, caller
                )
            except Exception:  # never leave a requester without an answer
                _log.exception("request failed outside the handler")
                code, body = _refused(DammError(Code.INTERNAL, f"correlation id {correlation_id}"))
            if len(body) > self.nc.max_payload:
                # A reply the bus would refuse never leaves as an exception: the asker gets a
                # code it can act on (page, narrow) instead of a timeout.
                _log.warning("reply too large", size=len(body), limit=self.nc.max_payload)
                code, body = _refused(
                    DammError(
                        Code.REPLY_TOO_LARGE, f"{len(body)} bytes > {self.nc.max_payload} bytes"
                    )
                )
            try:
                await self.nc.publish(reply, body)
            except nats.errors.Error as exc:  # the asker times out and retries
                _log.warning("reply not sent", error=repr(exc))
            self.metrics.request(route.command, code, time.perf_counter() - received)

    async def _answer(
        self,
        route: Route,
        decoder: Any,
        msg: Msg,
        headers: dict[str, str],
        correlation_id: str | None,
        arrived: float,
        caller: Caller | None,
    ) -> tuple[str, bytes]:
        """The answer, and the code it carries ("ok" or an error code) for the metrics."""
        if caller is not None and caller.unauthenticated:
            now = self._clock()
            if not self._per_connection.take(caller.client, now):
                return _refused(DammError(Code.RATE_LIMITED_CONNECTION, route.command))
            if not self._per_source.take(caller.host, now):
                return _refused(DammError(Code.RATE_LIMITED_SOURCE, route.command))
        try:
            deadline = arrived + budget_s((msg.headers or {}).get(TIMEOUT_HEADER))
        except DammError as err:
            _log.info("request refused", code=err.code.slug, detail=err.detail)
            return _refused(err)
        if asyncio.get_running_loop().time() >= deadline:
            # Its caller has given up while it waited for a slot: deciding it now could only
            # record something the caller was told failed.
            _log.info("request refused", code="deadline_exceeded")
            return _refused(DammError(Code.DEADLINE_EXCEEDED, "expired while queued"))
        if len(msg.data) > route.max_bytes:
            _log.info("request refused", code="request_too_large", size=len(msg.data))
            return _refused(
                DammError(
                    Code.REQUEST_TOO_LARGE, f"{len(msg.data)} bytes > {route.max_bytes} bytes"
                )
            )
        raw_id = headers.get(CORRELATION_HEADER)
        actor_name = headers.get(ACTOR_HEADER, "-")
        if (raw_id is not None and correlation_id is None) or (
            actor_name != "-" and not _ACTOR.fullmatch(actor_name)
        ):
            _log.info("request refused", code=Code.BAD_HEADER.slug)
            return _refused(
                DammError(
                    Code.BAD_HEADER,
                    f"{CORRELATION_HEADER} and {ACTOR_HEADER}: 1-64 of A-Z a-z 0-9 and _.:-@+",
                )
            )
        correlation_id = correlation_id or uuid.uuid4().hex
        structlog.contextvars.bind_contextvars(correlation_id=correlation_id)
        try:
            request = decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            _log.info("request refused", code="malformed_request", error=str(exc)[:200])
            return _refused(DammError(Code.MALFORMED_REQUEST, str(exc)[:200]))
        except RecursionError:
            _log.info("request refused", code=Code.REQUEST_TOO_DEEP.slug)
            return _refused(DammError(Code.REQUEST_TOO_DEEP))
        try:
            actor = Actor(route.actor_kind, actor_name)
            result = await route.handler(request, Call(correlation_id, actor, deadline, caller))
        except DammError as err:
            _log.info("request refused", code=err.code.slug, detail=err.detail)
            return _refused(err)
        except BUS_TROUBLE as exc:
            # The log or the bus did not answer in time: nothing was decided, try again.
            _log.warning("request failed on the bus", error=repr(exc))
            return _refused(
                DammError(Code.UNAVAILABLE, f"event log did not answer ({correlation_id})")
            )
        except Exception:
            _log.exception("handler failed")
            return _refused(DammError(Code.INTERNAL, f"correlation id {correlation_id}"))
        return "ok", ok_reply(result)


def budget_s(header: str | None) -> float:
    """A request's budget in seconds from its timeout header; a missing header (an older
    client) gets the default, and no caller may hold the control plane longer than the cap."""
    if header is None:
        return DEFAULT_BUDGET_MS / 1000
    if not header.isascii() or not header.isdigit() or len(header) > 9:
        raise DammError(Code.MALFORMED_REQUEST, f"{TIMEOUT_HEADER} must be whole milliseconds")
    return min(int(header), MAX_BUDGET_MS) / 1000


def _refused(err: DammError) -> tuple[str, bytes]:
    return err.code.slug, error_reply(err)
