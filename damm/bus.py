"""Connecting to NATS as one of DAMM's roles."""

from __future__ import annotations

from typing import Any

import nats
from nats.aio.client import Client as NATS

from damm import log

_log = log.get("damm.bus")


async def connect(
    url: str,
    *,
    user: str | None = None,
    password: str | None = None,
    name: str = "damm",
    reconnect: bool = True,
    connect_timeout: float = 2.0,
) -> NATS:
    async def _error(exc: Exception) -> None:
        _log.debug("nats error", error=repr(exc))

    async def _disconnected() -> None:
        _log.info("nats disconnected", name=name)

    async def _reconnected() -> None:
        _log.info("nats reconnected", name=name)

    options: dict[str, Any] = {
        "servers": [url],
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
    nc: NATS = await nats.connect(**options)
    return nc
