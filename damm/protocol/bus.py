"""Connecting to NATS as one of DAMM's roles."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client as NATS

from damm import log
from damm.subjects import inbox_prefix

_log = log.get("damm.protocol.bus")


async def connect(
    url: str,
    *,
    user: str | None = None,
    password: str | None = None,
    name: str = "damm",
    reconnect: bool = True,
    connect_timeout: float = 2.0,
    on_disconnected: Callable[[], Awaitable[None]] | None = None,
    on_reconnected: Callable[[], Awaitable[None]] | None = None,
) -> NATS:
    """Connect as ``user`` (replies on that user's own inbox), or anonymously as a device.

    A long-lived process reconnects forever; a one-shot client (``reconnect=False``) fails fast.
    """
    errors: list[Exception] = []

    async def _error(exc: Exception) -> None:
        errors.append(exc)
        _log.debug("nats error", error=repr(exc))

    async def _disconnected() -> None:
        _log.info("nats disconnected", name=name)
        if on_disconnected is not None:
            await on_disconnected()

    async def _reconnected() -> None:
        _log.info("nats reconnected", name=name)
        if on_reconnected is not None:
            await on_reconnected()

    options: dict[str, Any] = {
        "servers": [u.strip() for u in url.split(",") if u.strip()],
        "name": name,
        "connect_timeout": connect_timeout,
        "allow_reconnect": reconnect,
        "max_reconnect_attempts": -1 if reconnect else 0,
        "reconnect_time_wait": 0.5,
        "error_cb": _error,
        "disconnected_cb": _disconnected,
        "reconnected_cb": _reconnected,
    }
    if user:
        options["user"] = user
        options["password"] = password or ""
        options["inbox_prefix"] = inbox_prefix(user)
    if reconnect:
        nc: NATS = await nats.connect(**options)
        return nc
    # A one-shot client (the CLI) must fail fast: nats-py keeps retrying an unreachable server.
    options["max_reconnect_attempts"] = 0
    try:
        return await asyncio.wait_for(nats.connect(**options), connect_timeout * 2)
    except TimeoutError:
        last = errors[-1] if errors else None
        raise ConnectionError(str(last) if last else "timed out") from None
