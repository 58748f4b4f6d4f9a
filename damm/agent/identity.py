"""The gateway's own WireGuard key: made here, kept here (0600), never logged or sent."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

from nacl.public import PrivateKey

from damm.device.wgconfig import write_atomic
from damm.errors import Code, DammError

KEY_FILE = "private.key"


def load_or_create_key(state_dir: Path) -> tuple[str, str]:
    """Return (private_b64, public_b64), creating the key on first use.

    A key file readable by group or others is refused rather than used: it may already have
    leaked, and a gateway that silently carries on would hide that.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / KEY_FILE
    if not path.exists():
        private = base64.b64encode(bytes(PrivateKey.generate())).decode("ascii")
        write_atomic(path, private + "\n", 0o600)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise DammError(
            Code.STATE_MISSING, f"{path} has mode {mode:o}; it must be 0600 (chmod 600 it)"
        )
    text = path.read_text().strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:  # never echo the content: it is (meant to be) a private key
        raise DammError(Code.STATE_MISSING, f"{path} does not hold a base64 WireGuard key")
    public = base64.b64encode(bytes(PrivateKey(raw).public_key)).decode("ascii")
    return text, public
