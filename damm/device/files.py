"""The device's own files: its private key (0600, never sent), its state, its WireGuard config."""

from __future__ import annotations

from pathlib import Path

import msgspec

from damm import private_files
from damm.catalog.verify import TrustState
from damm.errors import Code, DammError
from damm.keys import nats_identity
from damm.private_files import write_atomic
from damm.protocol.messages import TunnelProfile

PRIVATE_KEY = "private.key"
# The device's NATS identity (an nkey seed, 0600): it signs each connection so the device gets
# an inbox no other party may read, and acts on its own device only.
IDENTITY = "identity.nk"
STATE = "device.json"
CONFIG = "wg0.conf"
# The signed catalog last accepted (by failover), as received: public, kept so the companion page
# and a support desk can re-check the evidence a failover acted on.
CATALOG = "catalog.signed"


class DeviceFile(TunnelProfile, kw_only=True):
    public_key: str
    nats_url: str
    rotation_key: str
    trust: TrustState | None = None


def _private_path(state_dir: Path) -> Path:
    return state_dir / PRIVATE_KEY


def generate_key(state_dir: Path, *, replace: bool = False) -> str:
    """Create the device key (mode 0600 from the first byte); return the public key."""
    private_files.private_dir(state_dir)
    path = _private_path(state_dir)
    if path.exists() and not replace:
        return public_key(state_dir)
    return private_files.create_wg_key(path)


def identity_seed(state_dir: Path, *, create: bool = False) -> bytes | None:
    """The device's NATS identity seed; made here on first enrollment, never sent anywhere."""
    path = state_dir / IDENTITY
    if not path.exists():
        if not create:
            return None
        private_files.private_dir(state_dir)
        write_atomic(path, nats_identity.new_user_seed(), mode=0o600)
    if path.stat().st_mode & 0o077:
        raise DammError(Code.STATE_MISSING, f"{path} is readable by others: chmod 600 it")
    return path.read_bytes().strip()


def private_key(state_dir: Path) -> str:
    return read_private(_private_path(state_dir))


def read_private(path: Path) -> str:
    return private_files.read_wg_key(path, ": run `damm device keygen`")


def public_key(state_dir: Path) -> str:
    return public_key_of_file(_private_path(state_dir))


def public_key_of_file(path: Path) -> str:
    return private_files.wg_public_key(read_private(path))


def load(state_dir: Path) -> DeviceFile:
    try:
        return msgspec.json.decode((state_dir / STATE).read_bytes(), type=DeviceFile)
    except FileNotFoundError:
        raise DammError(Code.STATE_MISSING, f"{state_dir} has no {STATE}: enroll first") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DammError(Code.STATE_MISSING, f"{state_dir / STATE} is unreadable: {exc}") from None


def save(state_dir: Path, device: DeviceFile) -> None:
    write_atomic(
        state_dir / STATE, msgspec.json.format(msgspec.json.encode(device)).decode(), mode=0o600
    )


def load_catalog(state_dir: Path) -> bytes | None:
    try:
        return (state_dir / CATALOG).read_bytes()
    except FileNotFoundError:
        return None


def save_catalog(state_dir: Path, signed: bytes) -> None:
    write_atomic(state_dir / CATALOG, signed, mode=0o600)
