"""The contract every WireGuard backend meets, and the one reconcile loop they all share.

The agent only ever needs five things from an interface: read it, apply a diff, set its own
identity, move a peer's endpoint, and let go of it. Keeping the protocol that small is what lets
the in-memory backend stand in for the kernel in unit tests without lying about behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import msgspec

from damm.errors import Code, DammError
from damm.wireguard.peer_diff import Peer, PeerDiff, diff

# The catalog has no code for "the WireGuard interface refused an operation" yet; INTERNAL is
# retryable, which is the right behaviour for the agent loop until a dedicated code exists.
WG_ERROR_CODE = Code.WG_BACKEND


class WireGuardError(DammError):
    """A backend failed to read or change the interface; the interface state is unknown."""

    def __init__(self, detail: str) -> None:
        super().__init__(WG_ERROR_CODE, f"wireguard: {detail}")


class PeerStats(msgspec.Struct, frozen=True):
    """One peer as the interface reports it: configuration plus live counters."""

    public_key: str
    allowed_ips: tuple[str, ...] = ()
    endpoint: str | None = None
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0

    def as_peer(self) -> Peer:
        """The configured part only: what the diff compares against the desired set."""
        return Peer(self.public_key, self.allowed_ips, self.persistent_keepalive)


class InterfaceState(msgspec.Struct, frozen=True):
    """A complete read of one interface. Never partial: backends raise instead."""

    public_key: str | None = None
    listen_port: int | None = None
    peers: dict[str, PeerStats] = msgspec.field(default_factory=dict)

    def configured_peers(self) -> dict[str, Peer]:
        return {key: stats.as_peer() for key, stats in self.peers.items()}


class WireGuardBackend(Protocol):
    """What the agent needs from a WireGuard interface, whatever implements it."""

    async def read(self) -> InterfaceState: ...

    async def apply(self, diff: PeerDiff) -> None: ...

    async def set_identity(self, private_key_b64: str, listen_port: int) -> None: ...

    async def set_peer_endpoint(self, public_key: str, endpoint: str) -> None: ...

    async def close(self) -> None: ...


async def reconcile(backend: WireGuardBackend, desired: Mapping[str, Peer]) -> PeerDiff:
    """Bring the interface to ``desired`` by applying only what differs, and say what that was.

    Idempotent by construction: a second call finds nothing to do. A failed read raises before
    any diff is computed, so a broken read can never be mistaken for "no peers" and turned into
    mass removals.
    """
    state = await backend.read()
    change = diff(state.configured_peers(), desired)
    if not change.is_empty:
        await backend.apply(change)
    return change
