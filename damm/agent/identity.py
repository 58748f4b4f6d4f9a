"""The gateway's own WireGuard key: made here, kept here (0600), never logged or sent."""

from __future__ import annotations

from pathlib import Path

from damm import private_files

KEY_FILE = "private.key"


def load_or_create_key(state_dir: Path) -> tuple[str, str]:
    """Return (private_b64, public_b64), creating the key on first use.

    A key file readable by group or others is refused rather than used: it may already have
    leaked, and a gateway that silently carries on would hide that.
    """
    private_files.private_dir(state_dir)
    path = state_dir / KEY_FILE
    if not path.exists():
        private_files.create_wg_key(path)
    private = private_files.read_wg_key(path)
    return private, private_files.wg_public_key(private)
