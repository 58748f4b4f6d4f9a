"""Per-gateway peer-set changes, published on core NATS while this process leads.

A gateway's peer set is every active device attached to it. Agents take a snapshot
(``handlers/peer_snapshot.py``) and then apply the changes published on ``damm.peers.<gateway_id>``,
each carrying ``prev_revision``: a change that does not follow the agent's revision is a gap and
the agent resyncs. A change lost here is repaired the same way.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from nats.aio.client import Client as NATS

from damm import log
from damm.clock import cancel_and_wait
from damm.control.leadership import Leadership
from damm.control.state import DecisionState, PeerChange
from damm.protocol import messages as p
from damm.subjects import peers_subject

_log = log.get("damm.peersets")
_encoder = msgspec.json.Encoder()


def entries(
    peers: list[tuple[str, tuple[str, ...]]], egress: dict[str, str] | None = None
) -> tuple[p.PeerEntry, ...]:
    """Wire entries, each with the egress address its traffic leaves from, if it has one."""
    nat = egress or {}
    return tuple(p.PeerEntry(key, ips, nat.get(key)) for key, ips in sorted(peers))


def encode_change(change: PeerChange) -> bytes:
    return _encoder.encode(
        p.PeerSetChange(
            change.gateway_id,
            change.prev_revision,
            change.revision,
            entries(list(change.upserts), dict(change.egress)),
            change.removes,
        )
    )


class PeerPublisher:
    """Publish every peer-set change the fold sees, while this process leads."""

    def __init__(self, nc: NATS, state: DecisionState, leadership: Leadership) -> None:
        self.nc = nc
        self.state = state
        self.leadership = leadership
        self.published = 0
        self._queue: asyncio.Queue[PeerChange] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.state.peer_listeners.append(self._on_change)
        self._task = asyncio.create_task(self._run())

    def _on_change(self, change: PeerChange) -> None:
        if self.leadership.is_leader:
            self._queue.put_nowait(change)

    async def _run(self) -> None:
        while True:
            change = await self._queue.get()
            try:
                await self.nc.publish(peers_subject(change.gateway_id), encode_change(change))
                self.published += 1
            except Exception as exc:  # a lost change is repaired by the agents' resync
                _log.warning(
                    "peer change not published",
                    gateway_id=change.gateway_id,
                    revision=change.revision,
                    error=repr(exc),
                )

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.state.peer_listeners.remove(self._on_change)
        if self._task:
            await cancel_and_wait(self._task)
