"""What `damm device enroll` writes once the control plane has answered: shared with the demo.

The enrollment reply becomes the device's state file (``device.json``, with the catalog trust
pinned from the reply) and its wg-quick file (``wg0.conf``); `damm device failover` and
`damm device diagnose` read both later, so every enrollment path must write them the same way.
"""

from __future__ import annotations

from pathlib import Path

from damm.catalog.verify import initial_trust
from damm.device import files
from damm.device.wgconfig import render_wg_quick
from damm.private_files import write_atomic
from damm.protocol import messages as p


def device_file(res: p.Enrolled, public_key: str, nats_url: str) -> files.DeviceFile:
    """The state file for an enrollment reply; trust is pinned from the reply's catalog key."""
    trust = None
    if res.catalog is not None:
        trust = initial_trust(
            res.catalog.region,
            res.catalog.key_id,
            res.catalog.public_key,
            res.catalog.min_version,
            res.catalog.next_keys,
        )
    return files.DeviceFile(
        **p.profile_of(res),
        public_key=public_key,
        nats_url=nats_url,
        rotation_key=res.rotation_key,
        trust=trust,
    )


def write_config(state_dir: Path, dev: files.DeviceFile) -> Path:
    """Render the wg-quick file from the state and the local private key (mode 0600)."""
    text = render_wg_quick(
        files.private_key(state_dir),
        dev.address,
        dev.address6,
        dev.dns,
        dev.gateway_public_key,
        dev.endpoint,
        dev.allowed_ips,
    )
    path = state_dir / files.CONFIG
    write_atomic(path, text, mode=0o600)
    return path


def save_enrollment(
    state_dir: Path, res: p.Enrolled, public_key: str, nats_url: str
) -> tuple[files.DeviceFile, Path]:
    """Write the config, then the state file; returns the state and the config's path."""
    dev = device_file(res, public_key, nats_url)
    config = write_config(state_dir, dev)
    files.save(state_dir, dev)
    return dev, config
