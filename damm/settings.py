"""Control-plane settings: the network model defaults of ARCHITECTURE.md, per deployment."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from damm.domain.ipam import Overlay


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class ControlSettings:
    overlay: Overlay = field(default_factory=lambda: Overlay.parse("10.44.0.0/24"))
    dns: tuple[str, ...] = ("10.44.0.1",)
    client_allowed_ips: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    heartbeat_ttl_s: float = 90.0
    catalog_ttl_s: int = 3600
    keys_dir: Path = Path(".damm/keys")

    @classmethod
    def from_env(cls, keys_dir: Path) -> ControlSettings:
        overlay = Overlay.parse(
            _env("DAMM_OVERLAY", "10.44.0.0/24"), ula=os.environ.get("DAMM_OVERLAY6") or None
        )
        dns = tuple(x for x in _env("DAMM_DNS", str(overlay.gateway)).split(",") if x)
        return cls(
            overlay=overlay,
            dns=dns,
            heartbeat_ttl_s=float(_env("DAMM_HEARTBEAT_TTL", "90")),
            catalog_ttl_s=int(_env("DAMM_CATALOG_TTL", "3600")),
            keys_dir=keys_dir,
        )
