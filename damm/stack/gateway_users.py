"""Keep the embedded nats-server's per-gateway users in step with the gateways in the log.

Production renders the same users with `damm admin nats-config` and reloads its own server; the
embedded stack owns its server, so it rewrites the config and sends SIGHUP as gateways appear.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from damm import log
from damm.control.state import DecisionState

_log = log.get("damm.stack")


class GatewayUsers(Protocol):
    """A single node or a whole cluster: every node gets the same gateway users."""

    def set_gateways(self, gateways: dict[str, str]) -> bool: ...


def gateway_hashes(state: DecisionState) -> dict[str, str]:
    return {
        gw.gateway_id: gw.nats_password_bcrypt
        for gw in state.gateways.values()
        if gw.nats_password_bcrypt
    }


async def follow_gateways(
    server: GatewayUsers, state: DecisionState, stop: asyncio.Event, interval_s: float = 0.2
) -> None:
    while not stop.is_set():
        wanted = gateway_hashes(state)
        if server.set_gateways(wanted):
            _log.info("nats gateway users reloaded", gateways=len(wanted))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
