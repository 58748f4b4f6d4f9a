"""An in-memory WireGuard interface for unit tests of the agent.

It keeps the behaviours the agent relies on from a real interface: an update keeps a peer's
counters and endpoint, a removal forgets them, a re-added peer starts from zero. Tests move
counters and handshakes by hand to drive metering and heartbeats without any network.
"""

from __future__ import annotations

import base64

import msgspec
from nacl.bindings import crypto_scalarmult_base

from damm.errors import DammError
from damm.keys.wireguard import validate_key_spelling
from damm.wireguard.base import InterfaceState, PeerStats, WireGuardError
from damm.wireguard.peer_diff import PeerDiff


class MemoryBackend:
    """A fake interface; ``applied`` records every diff so tests can assert on minimality."""

    def __init__(self) -> None:
        self.public_key: str | None = None
        self.listen_port: int | None = None
        self.peers: dict[str, PeerStats] = {}
        self.applied: list[PeerDiff] = []
        self.fail_reads = False
        self.closed = False

    async def read(self) -> InterfaceState:
        self._check_open()
        if self.fail_reads:
            raise WireGuardError("simulated read failure")
        return InterfaceState(self.public_key, self.listen_port, dict(self.peers))

    async def apply(self, diff: PeerDiff) -> None:
        self._check_open()
        for key in diff.remove:
            self.peers.pop(key, None)
        for peer in diff.update:
            old = self.peers.get(peer.public_key)
            if old is None:
                continue  # update_only semantics: a vanished peer is not resurrected
            self.peers[peer.public_key] = msgspec.structs.replace(
                old,
                allowed_ips=peer.allowed_ips,
                persistent_keepalive=peer.persistent_keepalive,
            )
        for peer in diff.add:
            self.peers[peer.public_key] = PeerStats(
                peer.public_key,
                peer.allowed_ips,
                persistent_keepalive=peer.persistent_keepalive,
            )
        self.applied.append(diff)

    async def set_identity(self, private_key_b64: str, listen_port: int) -> None:
        self._check_open()
        try:
            private = base64.b64decode(validate_key_spelling(private_key_b64))
        except DammError:
            raise WireGuardError("private key is not base64 of 32 bytes") from None
        self.public_key = base64.b64encode(crypto_scalarmult_base(private)).decode("ascii")
        self.listen_port = listen_port

    async def set_peer_endpoint(self, public_key: str, endpoint: str) -> None:
        self._check_open()
        old = self.peers.get(public_key)
        if old is not None:
            self.peers[public_key] = msgspec.structs.replace(old, endpoint=endpoint)

    async def close(self) -> None:
        self.closed = True

    # test controls -------------------------------------------------------------------------

    def set_counters(self, public_key: str, rx_bytes: int, tx_bytes: int) -> None:
        self.peers[public_key] = msgspec.structs.replace(
            self.peers[public_key], rx_bytes=rx_bytes, tx_bytes=tx_bytes
        )

    def set_handshake(self, public_key: str, when: float | None) -> None:
        self.peers[public_key] = msgspec.structs.replace(
            self.peers[public_key], last_handshake=when
        )

    def _check_open(self) -> None:
        if self.closed:
            raise WireGuardError("backend is closed")
