"""A synthetic fleet written straight into the event log, for scale tests and benchmarks.

The events are the ones the handlers append (a tier, a token, gateways with a front door and a
registration, devices with their token use, key binding, address and enrollment), so a control
plane folds them exactly as it folds a real history; only the request round trips are skipped.
Written with ``EventStore.append_many``, which pipelines the acknowledgements.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from damm.domain.ipam import Overlay
from damm.events import model as m
from damm.events.store import Append, EventStore, envelope
from damm.keys.tokens import token_hash
from damm.subjects import (
    DEFAULT_POOL,
    address_subject,
    event_subject,
    heartbeat_subject,
    key_subject,
)

ACTOR = m.Actor("admin", "fleet-builder")


@dataclass(frozen=True)
class SyntheticFleet:
    tier: str = "bulk"
    region: str = "eu"
    gateways: int = 100
    devices: int = 1000
    prefix: str = "gw"

    @property
    def token(self) -> str:
        return f"dmt_fleet-builder-{self.tier}"

    @property
    def token_id(self) -> str:
        return f"{self.tier}-token"

    def gateway_id(self, n: int) -> str:
        return f"{self.prefix}{n:05d}"

    def gateway_token(self, n: int) -> str:
        return f"dmg_fleet-builder-{self.prefix}-{n}"


def _public_key(seed: str) -> str:
    return base64.b64encode(hashlib.sha256(seed.encode()).digest()).decode()


def _item(subject: str, event: m.Event, expected: int | None = None) -> Append:
    env = envelope(subject, event, actor=ACTOR, correlation_id=uuid.uuid4().hex)
    return Append(subject, env, expected_seq=expected)


def setup_items(fleet: SyntheticFleet) -> Iterator[Append]:
    """The tier, one token and every gateway, registered with one front door."""
    yield _item(
        event_subject("tier", fleet.tier), m.TierDefined(tier=fleet.tier, regions=(fleet.region,))
    )
    yield _item(
        event_subject("token", fleet.token_id),
        m.TokenIssued(token_id=fleet.token_id, token_hash=token_hash(fleet.token), tier=fleet.tier),
    )
    for n in range(fleet.gateways):
        gw = fleet.gateway_id(n)
        subject = event_subject("gateway", gw)
        yield _item(
            subject,
            m.GatewayAdded(
                gateway_id=gw, region=fleet.region, token_hash=token_hash(fleet.gateway_token(n))
            ),
        )
        yield _item(
            subject,
            m.FrontDoorSet(
                gateway_id=gw,
                front_door_id="fd1",
                endpoint=f"198.51.{n // 250}.{n % 250 + 1}:51820",
            ),
        )
        yield _item(
            subject,
            m.GatewayRegistered(gateway_id=gw, public_key=_public_key(gw), listen_port=51820),
        )


def device_items(
    fleet: SyntheticFleet, overlay: Overlay, first: int, count: int, *, index_offset: int = 0
) -> Iterator[Append]:
    """Devices ``first`` .. ``first + count - 1``, spread round-robin over the gateways, each
    with the four events of an enrollment. Device ``n`` gets address index ``n`` past the first
    client address plus ``index_offset`` (keep clear of addresses enrolled for real)."""
    base = overlay.first_client_offset + index_offset
    for n in range(first, first + count):
        device_id = f"d{n:08d}"
        gw = fleet.gateway_id(n % fleet.gateways)
        index = base + n
        address = str(overlay.address(index))
        key = _public_key(device_id)
        yield _item(
            event_subject("token", fleet.token_id),
            m.TokenUsed(token_id=fleet.token_id, device_id=device_id),
        )
        yield _item(key_subject(key), m.KeyBound(public_key=key, device_id=device_id))
        yield _item(
            address_subject(index),
            m.AddressAllocated(
                pool=DEFAULT_POOL, index=index, address=address, device_id=device_id
            ),
        )
        yield _item(
            event_subject("device", device_id),
            m.DeviceEnrolled(
                device_id=device_id,
                public_key=key,
                token_id=fleet.token_id,
                tier=fleet.tier,
                gateway_id=gw,
                front_door_id="fd1",
                egress_pool_id=None,
                address=address,
                region=fleet.region,
            ),
        )


async def write(store: EventStore, items: Iterator[Append], chunk: int = 20_000) -> int:
    """Append everything, pipelined; returns how many were written."""
    written = 0
    while True:
        batch = [item for _, item in zip(range(chunk), items, strict=False)]
        if not batch:
            return written
        await store.append_many(batch, window=2000)
        written += len(batch)


async def beat_all(
    store: EventStore, fleet: SyntheticFleet, *, load: float = 0.0, peer_count: int = 0
) -> None:
    """One heartbeat per gateway into the telemetry stream, as the handler records them."""
    for n in range(fleet.gateways):
        gw = fleet.gateway_id(n)
        subject = heartbeat_subject(gw)
        event = m.GatewayHeartbeat(
            gateway_id=gw, peer_count=peer_count, active_peers=0, rx_bytes=0, tx_bytes=0,
            load=load,
        )  # fmt: skip
        env = envelope(
            subject,
            event,
            actor=m.Actor("gateway", gw),
            correlation_id=uuid.uuid4().hex,
            aggregate=f"gateway/{gw}",
        )
        await store.publish_telemetry(subject, env)
