"""The NATS plumbing for commands, in one place.

A route is a subject, a request type and an async handler. The service subscribes every route in
a queue group (so several control-plane processes share the load), checks the body size before
decoding, decodes with msgspec (which validates), binds the correlation id to the log context, and
answers with a result or a catalogued error. Handlers stay plain functions of a typed request.
"""

from __future__ import annotations

import asyncio
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
from damm.errors import Code, DammError
from damm.events.model import Actor
from damm.metrics import ControlMetrics
from damm.protocol.messages import MAX_REQUEST_BYTES, ErrorBody, Reply
from damm.subjects import request_subject

_log = log.get("damm.handlers")
_encoder = msgspec.json.Encoder()

QUEUE_GROUP = "damm-control"

BUS_TROUBLE = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,  # JetStream did not answer (leader election, overload)
)


@dataclass(frozen=True)
class Call:
    """Who asked, and the request's correlation id (the dedupe key for its events)."""

    correlation_id: str
    actor: Actor


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
    ) -> None:
        self.nc = nc
        self.metrics = metrics or ControlMetrics()
        self.routes = list(routes)
        self.queue = queue
        self._subs: list[Any] = []
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for route in self.routes:
            decoder = msgspec.json.Decoder(route.request_type)

            async def on_msg(msg: Msg, route: Route = route, decoder: Any = decoder) -> None:
                received = time.perf_counter()  # waiting for a slot is part of the latency
                await self._slots.acquire()
                task = asyncio.create_task(self._serve(route, decoder, msg, received))
                self._tasks.add(task)
                task.add_done_callback(self._done)

            self._subs.append(await self.nc.subscribe(route.subject, queue=self.queue, cb=on_msg))
        await self.nc.flush()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self._subs.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, route: Route, decoder: Any, msg: Msg, received: float) -> None:
        headers = msg.headers or {}
        correlation_id = headers.get("Damm-Correlation-Id") or uuid.uuid4().hex
        with structlog.contextvars.bound_contextvars(
            correlation_id=correlation_id, command=route.command
        ):
            code, body = await self._answer(route, decoder, msg, correlation_id)
            if msg.reply:
                await self.nc.publish(msg.reply, body)
            self.metrics.request(route.command, code, time.perf_counter() - received)

    async def _answer(
        self, route: Route, decoder: Any, msg: Msg, correlation_id: str
    ) -> tuple[str, bytes]:
        """The answer, and the code it carries ("ok" or an error code) for the metrics."""
        if len(msg.data) > route.max_bytes:
            _log.info("request refused", code="request_too_large", size=len(msg.data))
            return _refused(
                DammError(
                    Code.REQUEST_TOO_LARGE, f"{len(msg.data)} bytes > {route.max_bytes} bytes"
                )
            )
        try:
            request = decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            _log.info("request refused", code="malformed_request", error=str(exc))
            return _refused(DammError(Code.MALFORMED_REQUEST, str(exc)))
        try:
            actor = Actor(route.actor_kind, (msg.headers or {}).get("Damm-Actor", "-")[:64])
            result = await route.handler(request, Call(correlation_id, actor))
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


def _refused(err: DammError) -> tuple[str, bytes]:
    return err.code.slug, error_reply(err)
