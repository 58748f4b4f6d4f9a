"""What a heartbeat says about the gateway, read from WireGuard itself."""

from __future__ import annotations

import time
from dataclasses import dataclass

from damm.wireguard.base import InterfaceState

ACTIVE_HANDSHAKE_S = 180.0  # WireGuard re-handshakes every 2 min on a live session


@dataclass(frozen=True)
class Metrics:
    peer_count: int
    active_peers: int
    rx_bytes: int
    tx_bytes: int
    load: float


def measure(state: InterfaceState, capacity: int, now: float | None = None) -> Metrics:
    """``load`` is peers carried over the configured capacity (0 = empty, 1 = full).

    Placement picks the lowest load, so the score only has to order gateways; it is not capped,
    so an overfull gateway still sorts after a full one.
    """
    now = time.time() if now is None else now
    active = sum(
        1
        for s in state.peers.values()
        if s.last_handshake and now - s.last_handshake < ACTIVE_HANDSHAKE_S
    )
    rx = sum(s.rx_bytes for s in state.peers.values())
    tx = sum(s.tx_bytes for s in state.peers.values())
    count = len(state.peers)
    return Metrics(count, active, rx, tx, round(count / max(capacity, 1), 4))
