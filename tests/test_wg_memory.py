"""reconcile() against the in-memory backend: only the diff is applied, and reads that fail
never turn into removals."""

from __future__ import annotations

import base64

import pytest

from damm.wireguard import WireGuardError, reconcile
from damm.wireguard.memory import MemoryBackend
from damm.wireguard.peer_diff import Peer

KEYS = [base64.b64encode(bytes([i + 1]) * 32).decode() for i in range(5)]


def peer_set(*peers: Peer) -> dict[str, Peer]:
    return {p.public_key: p for p in peers}


async def test_reconcile_applies_only_the_diff_and_is_idempotent() -> None:
    backend = MemoryBackend()
    desired = peer_set(*(Peer(k, (f"10.44.0.{10 + i}/32",)) for i, k in enumerate(KEYS)))
    first = await reconcile(backend, desired)
    assert len(first.add) == 5 and not first.remove and not first.update
    backend.set_counters(KEYS[0], 100, 200)

    desired[KEYS[0]] = Peer(KEYS[0], ("10.44.0.99/32",), 25)
    del desired[KEYS[4]]
    second = await reconcile(backend, desired)
    assert second.summary() == "add=0 remove=1 update=1"
    # an update keeps the session's counters: it is not a remove + add
    assert backend.peers[KEYS[0]].rx_bytes == 100
    assert backend.peers[KEYS[0]].allowed_ips == ("10.44.0.99/32",)

    third = await reconcile(backend, desired)
    assert third.is_empty
    assert len(backend.applied) == 2  # the empty diff was never sent


async def test_failed_read_applies_nothing() -> None:
    backend = MemoryBackend()
    await reconcile(backend, peer_set(Peer(KEYS[0], ())))
    backend.fail_reads = True
    with pytest.raises(WireGuardError):
        await reconcile(backend, {})
    assert KEYS[0] in backend.peers


async def test_identity_and_endpoint() -> None:
    backend = MemoryBackend()
    private = base64.b64encode(bytes(range(32))).decode()
    await backend.set_identity(private, 51820)
    state = await backend.read()
    assert state.listen_port == 51820
    assert state.public_key is not None and state.public_key != private
    await reconcile(backend, peer_set(Peer(KEYS[0], ())))
    await backend.set_peer_endpoint(KEYS[0], "192.0.2.1:51820")
    assert (await backend.read()).peers[KEYS[0]].endpoint == "192.0.2.1:51820"
    await backend.close()
    with pytest.raises(WireGuardError):
        await backend.read()
