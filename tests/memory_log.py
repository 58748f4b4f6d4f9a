"""An in-memory event log for testing decisions without servers.

It keeps JetStream's two rules that decisions depend on: an append that expects a subject's last
sequence is refused when another landed first, and a message id already in the log is a
duplicate that returns where it landed. A batch lands whole or not at all.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import msgspec

from damm.catalog.signing import CatalogSigner
from damm.clock import FrozenClock
from damm.control.context import Context
from damm.control.handlers.admin import AdminHandlers
from damm.control.handlers.gateway import GatewayHandlers
from damm.control.state import DecisionState
from damm.events.model import Actor, Envelope
from damm.events.store import Append, Appended, ConflictError
from damm.keys.rotation import RotationKey
from damm.protocol import messages as p
from damm.protocol.router import Call
from damm.settings import ControlSettings
from tests.fleet import keypair


class MemoryLog:
    def __init__(self) -> None:
        self.messages: list[tuple[str, Envelope]] = []
        self.telemetry: list[tuple[str, Envelope]] = []
        self.last_of: dict[str, int] = {}
        self.msg_ids: dict[str, int] = {}

    async def append(self, item: Append) -> Appended:
        return await self.append_batch([item])

    async def append_batch(
        self, items: Sequence[Append], *, ack_timeout: float | None = None
    ) -> Appended:
        if not items:
            return Appended(())
        for item in items:
            if item.msg_id is not None and item.msg_id in self.msg_ids:
                return Appended((self.msg_ids[item.msg_id],), duplicate=True)
        seen: set[str] = set()
        for item in items:
            first = item.expected_seq is not None and item.subject not in seen
            if first and self.last_of.get(item.subject, 0) != item.expected_seq:
                raise ConflictError(item.subject, "wrong last sequence")
            seen.add(item.subject)
        seqs = []
        for item in items:
            seq = len(self.messages) + 1
            self.messages.append((item.subject, msgspec.structs.replace(item.envelope, seq=seq)))
            self.last_of[item.subject] = seq
            if item.msg_id is not None:
                self.msg_ids[item.msg_id] = seq
            seqs.append(seq)
        return Appended(tuple(seqs))

    async def publish_telemetry(self, subject: str, env: Envelope) -> int:
        self.telemetry.append((subject, env))
        return len(self.telemetry)

    def events(self, kind: type | None = None) -> list[object]:
        return [e.event for _, e in self.messages if kind is None or isinstance(e.event, kind)]


class Caught:
    """The follower of a process that is always caught up: its own appends are all there is."""

    async def sync(self, timeout: float = 10.0) -> None:
        return None


def memory_context(
    tmp_path: Path, clock: FrozenClock | None = None, settings: ControlSettings | None = None
) -> tuple[Context, MemoryLog]:
    settings = settings or ControlSettings(keys_dir=tmp_path / "keys")
    state = DecisionState(settings.overlay, gateway_capacity=settings.gateway_capacity)
    log = MemoryLog()
    ctx = Context(
        log,  # type: ignore[arg-type]
        state,
        Caught(),  # type: ignore[arg-type]
        settings,
        CatalogSigner.generate(),
        RotationKey(b"\x07" * 32),
        clock=clock or FrozenClock(),
    )
    return ctx, log


def call_as(kind: str) -> Call:
    """Each request has its own correlation id: appends are deduplicated by it."""
    return Call(uuid.uuid4().hex, Actor(kind, "-"))


async def healthy_gateway(
    admin: AdminHandlers,
    gateways: GatewayHandlers,
    gateway_id: str,
    front_door: str,
    region: str = "eu",
) -> str:
    """Add, register and heartbeat a gateway through the handlers; returns its token."""
    added = await admin.add_gateway(
        p.AddGateway(gateway_id=gateway_id, region=region, front_door=front_door), call_as("admin")
    )
    await gateways.register(
        p.RegisterGateway(
            gateway_id=gateway_id, token=added.token, public_key=keypair()[1], listen_port=51820
        ),
        call_as("gateway"),
    )
    await gateways.heartbeat(
        p.Heartbeat(
            gateway_id=gateway_id, token=added.token, peer_count=0, active_peers=0,
            rx_bytes=0, tx_bytes=0, load=0.0,
        ),
        call_as("gateway"),
    )  # fmt: skip
    return added.token
