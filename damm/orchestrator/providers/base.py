"""The one interface every provider meets: make a host, destroy it, doors, egress, list.

Every operation is idempotent, because an apply may be killed at any point and run again:
creating a host that exists returns it, destroying one that is gone succeeds, adding a front
door that is there returns its endpoint. ``list`` is the provider's own word on what exists;
with the orchestrator's step events it tells an apply what is left to do.
"""

from __future__ import annotations

from typing import Literal, Protocol

import msgspec

HostState = Literal["running", "broken"]


class HostSpec(msgspec.Struct, frozen=True, kw_only=True):
    gateway_id: str
    region: str
    token: str  # the gateway-scoped token the host's agent registers with
    nats_url: str  # where the host's agent reaches the control plane
    front_doors: tuple[str, ...]


class Host(msgspec.Struct, frozen=True, kw_only=True):
    gateway_id: str
    region: str
    provider_ref: str  # the provider's own name for it (a namespace, an instance id)
    state: HostState
    front_doors: dict[str, str] = msgspec.field(default_factory=dict)  # id -> host:port


class Provider(Protocol):
    name: str

    async def create(self, spec: HostSpec) -> Host: ...

    async def destroy(self, gateway_id: str) -> None: ...

    async def add_front_door(self, gateway_id: str, front_door_id: str) -> str: ...

    async def remove_front_door(self, gateway_id: str, front_door_id: str) -> None: ...

    async def add_egress(self, pool_id: str, region: str, country: str) -> tuple[str, ...]: ...

    async def list(self) -> list[Host]: ...
