"""The device's own files: its private key (0600, never sent), its state, its WireGuard config."""

from __future__ import annotations

import base64
from pathlib import Path

import msgspec
from nacl.public import PrivateKey

from damm.catalog.verify import TrustState
from damm.device.wgconfig import write_atomic
from damm.errors import Code, DammError

PRIVATE_KEY = "private.key"
STATE = "device.json"
CONFIG = "wg0.conf"


class DeviceFile(msgspec.Struct, kw_only=True):
    device_id: str
    public_key: str
    gateway_id: str
    gateway_public_key: str
    front_door_id: str
    endpoint: str
    address: str
    address6: str | None = None
    allowed_ips: tuple[str, ...]
    dns: tuple[str, ...]
    nats_url: str
    rotation_key: str
    trust: TrustState | None = None
    key_expires_at: str | None = None


def _private_path(state_dir: Path) -> Path:
    return state_dir / PRIVATE_KEY


def generate_key(state_dir: Path, *, replace: bool = False) -> str:
    """Create a private key file with mode 0600 from the first byte; return the public key."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = _private_path(state_dir)
    if path.exists() and not replace:
        return public_key(state_dir)
    key = PrivateKey.generate()
    write_atomic(path, base64.b64encode(bytes(key)).decode() + "\n", mode=0o600)
    return base64.b64encode(bytes(key.public_key)).decode()


def private_key(state_dir: Path) -> str:
    return read_private(_private_path(state_dir))


def read_private(path: Path) -> str:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DammError(Code.STATE_MISSING, f"no key at {path}: run `damm device keygen`") from None
    if mode & 0o077:
        raise DammError(Code.STATE_MISSING, f"{path} is readable by others: chmod 600 it")
    value = path.read_text().strip()
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise DammError(Code.MALFORMED_KEY, f"{path} is not a base64 key") from None
    if len(raw) != 32:
        raise DammError(Code.MALFORMED_KEY, f"{path} does not hold a 32-byte key")
    return value


def public_key(state_dir: Path) -> str:
    return public_key_of_file(_private_path(state_dir))


def public_key_of_file(path: Path) -> str:
    raw = base64.b64decode(read_private(path))
    return base64.b64encode(bytes(PrivateKey(raw).public_key)).decode()


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
