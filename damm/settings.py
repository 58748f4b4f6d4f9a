"""All configuration DAMM reads from its environment, in one module.

Command-line options take precedence where a command has one (click reads the ``DAMM_NATS_URL``
style variables it documents); everything else that reads ``DAMM_*`` reads it here, so an
operator finds every knob by reading one file. Decisions never read the environment: they take
these values as arguments.
"""

from __future__ import annotations

import getpass
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from damm.domain.ipam import Overlay
from damm.domain.throttle import Rate
from damm.errors import Code, DammError
from damm.keys.sealing import KeyEncryptionKey, LocalKek, kek_from_env
from damm.private_files import load_or_create_seed

UsagePeriod = Literal["month", "week", "day"]
USAGE_PERIODS: tuple[UsagePeriod, ...] = ("month", "week", "day")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def home() -> Path:
    """Where `damm up` keeps its data and stack file."""
    return Path(_env("DAMM_HOME", ".damm")).absolute()


LOCAL_KEK = "kek"  # the KEK `damm up` generates in DAMM_HOME when none is configured


def log_level(default: str = "info") -> str:
    return _env("DAMM_LOG_LEVEL", default)


def log_json() -> bool:
    """JSON lines unless a person is watching a terminal (or DAMM_LOG_FORMAT says json)."""
    return _env("DAMM_LOG_FORMAT", "").lower() == "json" or not sys.stderr.isatty()


def role_password(role: str) -> str | None:
    """DAMM_CONTROL_PASSWORD, DAMM_ADMIN_PASSWORD: NATS credentials outside the local stack."""
    return os.environ.get(f"DAMM_{role.upper()}_PASSWORD") or None


def callout_seed_file() -> Path | None:
    """DAMM_CALLOUT_SEED_FILE: the auth callout issuer's nkey seed (0600), for `control run`
    against a nats-server configured with that issuer's public key."""
    value = os.environ.get("DAMM_CALLOUT_SEED_FILE")
    return Path(value) if value else None


def admin_name() -> str:
    """Who an operator's admin commands are recorded as."""
    return os.environ.get("DAMM_ADMIN") or getpass.getuser()


def device_state_dir() -> str:
    return _env("DAMM_STATE_DIR", "damm-device")


def heartbeat_ttl_s() -> float:
    return float(_env("DAMM_HEARTBEAT_TTL", "90"))


def usage_period() -> UsagePeriod:
    """The window a tier's byte limit covers. Pick it once: a replay labels history with it."""
    value = _env("DAMM_USAGE_PERIOD", "month").strip().lower()
    if value not in USAGE_PERIODS:
        raise DammError(
            Code.INVALID_ARGUMENT, f"DAMM_USAGE_PERIOD={value!r}: one of {USAGE_PERIODS}"
        )
    return value


@dataclass(frozen=True)
class ControlSettings:
    """The control plane's network model and timings (defaults: README, Configuration)."""

    overlay: Overlay = field(default_factory=lambda: Overlay.parse("10.44.0.0/24"))
    dns: tuple[str, ...] = ("10.44.0.1",)
    client_allowed_ips: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    heartbeat_ttl_s: float = 90.0
    catalog_ttl_s: int = 3600
    # Only read on a first start, to import the keys of a deployment from before the keyring
    # lived in the log; nothing is written there any more.
    keys_dir: Path = Path(".damm/keys")
    # Peers at which a gateway's reported load reads 1.0 (the agent's --capacity): placement
    # weighs the devices it assigned since a heartbeat in the same unit.
    gateway_capacity: int = 1000
    # How long a request waits for this replica to catch up with the log (read-your-writes).
    # Start-up has no deadline: it waits for the whole log, however long.
    sync_timeout_s: float = 10.0
    # The leader snapshots the decision state this often, once this many events were folded.
    snapshot_interval_s: float = 60.0
    snapshot_min_events: int = 10_000
    # Unauthenticated requests (enrollment, catalog), per connection and per source address.
    throttle_connection: Rate = field(default_factory=lambda: Rate(2.0, 10.0))
    throttle_source: Rate = field(default_factory=lambda: Rate(20.0, 100.0))
    # Seals the signing and rotation keys in the log; every replica needs the same one.
    kek: KeyEncryptionKey | None = field(default=None, repr=False, compare=False)
    lease_ttl_s: float = 3.0
    lease_renew_s: float = 0.5

    @classmethod
    def from_env(cls, keys_dir: Path, kek_file: Path | None = None) -> ControlSettings:
        """``kek_file``: where a local stack keeps a generated KEK when none is configured."""
        overlay = Overlay.parse(
            _env("DAMM_OVERLAY", "10.44.0.0/24"), ula=os.environ.get("DAMM_OVERLAY6") or None
        )
        dns = tuple(x for x in _env("DAMM_DNS", str(overlay.gateway)).split(",") if x)
        kek: KeyEncryptionKey | None = kek_from_env(os.environ)
        if kek is None and kek_file is not None:
            kek_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            kek = LocalKek(load_or_create_seed(kek_file, "key-encryption key"))
        return cls(
            overlay=overlay,
            dns=dns,
            heartbeat_ttl_s=heartbeat_ttl_s(),
            catalog_ttl_s=int(_env("DAMM_CATALOG_TTL", "3600")),
            gateway_capacity=max(1, int(_env("DAMM_GATEWAY_CAPACITY", "1000"))),
            snapshot_interval_s=float(_env("DAMM_SNAPSHOT_INTERVAL", "60")),
            snapshot_min_events=int(_env("DAMM_SNAPSHOT_MIN_EVENTS", "10000")),
            keys_dir=keys_dir,
            throttle_connection=_rate("DAMM_THROTTLE_CONNECTION", "2/10"),
            throttle_source=_rate("DAMM_THROTTLE_SOURCE", "20/100"),
            kek=kek,
            lease_ttl_s=float(_env("DAMM_LEASE_TTL", "3")),
            lease_renew_s=float(_env("DAMM_LEASE_RENEW", "0.5")),
        )


def _rate(name: str, default: str) -> Rate:
    """``PER_SECOND/BURST``, e.g. ``2/10``."""
    value = _env(name, default)
    try:
        per_second, burst = (float(x) for x in value.split("/"))
    except ValueError:
        raise DammError(Code.INVALID_ARGUMENT, f"{name}={value!r}: want PER_SECOND/BURST") from None
    if per_second <= 0 or burst < 1:
        raise DammError(Code.INVALID_ARGUMENT, f"{name}={value!r}: rate > 0 and burst >= 1")
    return Rate(per_second, burst)
