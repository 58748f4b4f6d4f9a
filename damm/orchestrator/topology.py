"""The desired fleet, as an operator writes and reviews it: a TOML file read with ``tomllib``.

The schema is the msgspec Structs below; decoding validates every field (ranges, names, the
provider each region names), so a typo is refused with ``topology_invalid`` before anything is
planned. ``ops/fleet.example.toml`` is a complete example.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from damm.errors import Code, DammError

Name = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
Country = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")]
Share = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Load = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
Count = Annotated[int, msgspec.Meta(ge=0, le=10_000)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=86_400.0)]
Money = Annotated[float, msgspec.Meta(ge=0.0)]


class Provider(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where gateway hosts come from, what they cost, and what the provider may do."""

    kind: Literal["netns", "exec"]
    regions: tuple[Name, ...] = ()  # empty: any region
    price_per_gateway_month: Money = 0.0
    max_gateways: Count | None = None
    # netns: the lab subnet the provider bridge uses; agents' heartbeat and capacity.
    subnet: str = "172.31.0.0/24"
    heartbeat_s: Annotated[float, msgspec.Meta(gt=0.0, le=3600.0)] = 10.0
    capacity: Annotated[int, msgspec.Meta(ge=1)] = 1000
    # exec: the operator's executable, given one JSON request on stdin per call.
    command: tuple[str, ...] = ()
    timeout_s: Annotated[float, msgspec.Meta(gt=0.0, le=3600.0)] = 120.0


class Egress(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    country: Country
    min_headroom: Share = 0.2


class Region(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A fixed ``gateways`` count, or bounds with a target load (then ``gateways`` is unset)."""

    provider: Name
    gateways: Count | None = None
    min_gateways: Count = 1
    max_gateways: Count = 10
    target_load: Load = 0.6
    min_healthy: Count = 1
    front_doors: tuple[Name, ...] = ("fd1",)
    egress: tuple[Egress, ...] = ()


class Guardrails(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_changes_per_apply: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 4
    cooldown_s: Seconds = 300.0
    max_monthly_cost: Money | None = None
    # A gateway silent this long (or never heard from since its host was made) is dead.
    dead_after_s: Seconds = 120.0


class Topology(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    providers: dict[Name, Provider]
    regions: dict[Name, Region]
    guardrails: Guardrails = msgspec.field(default_factory=Guardrails)


def parse(data: dict[str, object]) -> Topology:
    try:
        topo = msgspec.convert(data, Topology)
    except msgspec.ValidationError as exc:
        raise DammError(Code.TOPOLOGY_INVALID, str(exc)) from None
    for name, region in topo.regions.items():
        if region.provider not in topo.providers:
            raise DammError(
                Code.TOPOLOGY_INVALID, f"region {name} names unknown provider {region.provider!r}"
            )
        if region.min_gateways > region.max_gateways:
            raise DammError(
                Code.TOPOLOGY_INVALID,
                f"region {name}: min_gateways {region.min_gateways} > max {region.max_gateways}",
            )
        if len(set(region.front_doors)) != len(region.front_doors) or not region.front_doors:
            raise DammError(
                Code.TOPOLOGY_INVALID, f"region {name}: front doors must be distinct, at least one"
            )
    for name, provider in topo.providers.items():
        if provider.kind == "exec" and not provider.command:
            raise DammError(Code.TOPOLOGY_INVALID, f"provider {name}: exec needs a command")
    return topo


def load(path: Path) -> Topology:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise DammError(Code.TOPOLOGY_INVALID, f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise DammError(Code.TOPOLOGY_INVALID, f"{path}: {exc}") from None
    return parse(data)
