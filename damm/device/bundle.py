"""`damm device bundle`: a zip a user can carry to the machine or phone that runs the tunnel.

It holds the wg-quick config (which every WireGuard app imports), a README with per-platform
steps, and the device's public facts. The state directory's `private.key` is never added as a
file of its own; the config necessarily carries the same key on its PrivateKey line, and the
README says so plainly.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import msgspec

from damm.device import files
from damm.device.wgconfig import parse_endpoint
from damm.errors import Code, DammError
from damm.private_files import write_atomic

CONFIG_NAME = "damm-wg0.conf"
README_NAME = "README.txt"
INFO_NAME = "device.json"


class PublicInfo(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    public_key: str
    address: str
    address6: str | None
    gateway_id: str
    gateway_public_key: str
    front_door_id: str
    endpoint: str
    region: str | None


README = """\
DAMM device {device_id}
=====================================================================

Tunnel address {address}, gateway {gateway_id} at {endpoint}.

KEEP THIS BUNDLE PRIVATE. {config} contains this device's WireGuard PRIVATE KEY (the
PrivateKey line): anyone holding it can use the tunnel as this device. Copy it only to the one
machine or phone that will run the tunnel, then delete the bundle. If it leaks, revoke the
device (`damm admin revoke {device_id}`) and enroll again.

Linux (wg-quick)
    sudo install -m 600 {config} /etc/wireguard/wg0.conf
    sudo wg-quick up wg0              # bring it up now
    sudo systemctl enable wg-quick@wg0  # and at every boot
    sudo wg show wg0                  # latest handshake should be recent
    ping 10.44.0.1                    # the gateway's tunnel address

macOS
    Install "WireGuard" from the App Store, then "Import Tunnel(s) from File..." and choose
    {config}. Activate the tunnel.

Windows
    Install WireGuard from https://www.wireguard.com/install/, click "Import tunnel(s) from
    file" and choose {config}. Activate.

iOS / Android
    Install the WireGuard app. Either import the file (Files / share sheet, or "+" then
    "Import from file or archive"), or on a computer render the config as a QR code, e.g.
    `qrencode -t ansiutf8 < {config}`, and scan it with "+" then "Create from QR code".
    The QR code carries the private key too: do not photograph or share it.

Failover
    On Linux with the damm CLI, `damm device failover --state-dir DIR` moves the tunnel to
    another front door of the same gateway after verifying the signed catalog. The apps keep
    the imported endpoint; re-import a fresh bundle after a failover.

{info} lists this device's public facts (ids, public keys, endpoint); it holds no secret.
"""


def public_info(dev: files.DeviceFile) -> PublicInfo:
    return PublicInfo(
        device_id=dev.device_id, public_key=dev.public_key, address=dev.address,
        address6=dev.address6, gateway_id=dev.gateway_id,
        gateway_public_key=dev.gateway_public_key, front_door_id=dev.front_door_id,
        endpoint=dev.endpoint, region=dev.trust.region if dev.trust else None,
    )  # fmt: skip


def build_bundle(state_dir: Path) -> bytes:
    dev = files.load(state_dir)
    config_path = state_dir / files.CONFIG
    try:
        config = config_path.read_text()
    except FileNotFoundError:
        raise DammError(Code.STATE_MISSING, f"no {config_path}: enroll first") from None
    parse_endpoint(config)  # refuse to hand out a config failover could not edit either
    info = public_info(dev)
    readme = README.format(
        device_id=dev.device_id, address=dev.address, gateway_id=dev.gateway_id,
        endpoint=parse_endpoint(config), config=CONFIG_NAME, info=INFO_NAME,
    )  # fmt: skip
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in (
            (CONFIG_NAME, config),
            (README_NAME, readme),
            (INFO_NAME, msgspec.json.format(msgspec.json.encode(info)).decode() + "\n"),
        ):
            entry = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            entry.external_attr = 0o600 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(entry, text)
    return buf.getvalue()


def write_bundle(state_dir: Path, out: Path) -> Path:
    data = build_bundle(state_dir)
    write_atomic(out, data, 0o600)
    return out
