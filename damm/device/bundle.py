"""`damm device bundle`: a zip a user can carry to the machine or phone that runs the tunnel.

It holds the wg-quick config (which every WireGuard app imports), the same config as a QR code
(SVG and PNG, for the mobile apps), a README with per-platform steps, the device's public facts,
the signed catalog the device holds, and the companion page preloaded with all of it, so that
opening `index.html` from the unzipped folder shows the device at once with no server. The state
directory's `private.key` is never added as a file of its own; the config and its QR code
necessarily carry the same key, and the README and the page say so plainly.
"""

from __future__ import annotations

import io
import ipaddress
import zipfile
from collections.abc import Mapping
from pathlib import Path

import msgspec
import segno

from damm.catalog.verify import TrustState
from damm.device import files
from damm.device.diagnose import Report
from damm.device.wgconfig import parse_endpoint
from damm.errors import Code, DammError
from damm.private_files import write_atomic
from damm.protocol.messages import TunnelProfile, profile_of

CONFIG_NAME = "damm-wg0.conf"
README_NAME = "README.txt"
INFO_NAME = "device.json"
QR_SVG_NAME = "qr.svg"
QR_PNG_NAME = "qr.png"
CATALOG_NAME = files.CATALOG
DIAGNOSTICS_NAME = "diagnostics.json"
# Every entry is dated 1980-01-01 so that one state gives one byte-identical zip.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class PublicInfo(TunnelProfile, frozen=True, kw_only=True):  # type: ignore[misc]
    """The device's public facts: everything in device.json that the page shows, no secret."""

    public_key: str
    region: str | None
    trust: TrustState | None = None


class Contents(msgspec.Struct, frozen=True, kw_only=True):
    """What a bundle is made of, read from a state directory (and an optional diagnostics file)."""

    config: str
    info: PublicInfo
    catalog: bytes | None
    diagnostics: Report | None


README = """\
DAMM device {device_id}
=====================================================================

Tunnel address {address}, gateway {gateway_id} at {endpoint}.

KEEP THIS BUNDLE PRIVATE. {config}, {qr_png} and {qr_svg} contain this device's WireGuard
PRIVATE KEY (the PrivateKey line, and the same text as a QR code): anyone holding either can
use the tunnel as this device. Copy them only to the one machine or phone that will run the
tunnel, then delete the bundle. If they leak, revoke the device (`damm admin revoke
{device_id}`) and enroll again.

Open index.html in a browser to inspect the profile, show its QR code, read these steps and
check the signed catalog. The page works offline, makes no network request and cannot connect:
the WireGuard app or wg-quick does that.

Linux (wg-quick)
    sudo install -m 600 {config} /etc/wireguard/wg0.conf
    sudo wg-quick up wg0              # bring it up now
    sudo systemctl enable wg-quick@wg0  # and at every boot
    Check: `sudo wg show wg0` shows a recent "latest handshake"; `ping {probe}` answers.

Linux (NetworkManager)
    sudo nmcli connection import type wireguard file {config}
    nmcli connection up {name}
    Check: `sudo wg show {name}` shows a recent "latest handshake"; `ping {probe}` answers.

macOS
    Install "WireGuard" from the Mac App Store, then "Import Tunnel(s) from File..." and choose
    {config}. Activate the tunnel.
    Check: the tunnel shows "Active" and a recent latest handshake; `ping {probe}` answers.

Windows
    Install WireGuard from https://www.wireguard.com/install/, click "Import tunnel(s) from
    file" and choose {config}. Activate.
    Check: the tunnel shows "Active" and a recent latest handshake; `ping {probe}` answers.

iOS / Android
    Install the WireGuard app. Tap "+", then "Create from QR code" (iOS) or "Scan from QR
    code" (Android), and scan {qr_png} (or the QR code in index.html) shown on a computer
    screen. Or import {config} as a file. Turn the tunnel on.
    Check: the tunnel's "Latest handshake" is recent and received data grows.

Failover
    On Linux with the damm CLI, `damm device failover --state-dir DIR` moves the tunnel to
    another front door of the same gateway after verifying the signed catalog. The apps keep
    the imported endpoint; re-import a fresh bundle after a failover.

{info} lists this device's public facts (ids, public keys, endpoint, pinned catalog key); it
holds no secret.{catalog_note}
"""


def public_info(dev: files.DeviceFile) -> PublicInfo:
    return PublicInfo(
        **profile_of(dev),
        public_key=dev.public_key,
        region=dev.trust.region if dev.trust else None,
        trust=dev.trust,
    )


def read_diagnostics(path: Path) -> Report:
    """A `damm device diagnose --export` file, checked against the report's own schema."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=Report)
    except OSError as exc:
        raise DammError(Code.INVALID_ARGUMENT, f"cannot read {path}: {exc.strerror}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DammError(
            Code.INVALID_ARGUMENT, f"{path} is not a diagnostics export: {exc}"
        ) from None


def read_contents(state_dir: Path, diagnostics: Path | None = None) -> Contents:
    dev = files.load(state_dir)
    config_path = state_dir / files.CONFIG
    try:
        config = config_path.read_text()
    except FileNotFoundError:
        raise DammError(Code.STATE_MISSING, f"no {config_path}: enroll first") from None
    parse_endpoint(config)  # refuse to hand out a config failover could not edit either
    return Contents(
        config=config,
        info=public_info(dev),
        catalog=files.load_catalog(state_dir),
        diagnostics=read_diagnostics(diagnostics) if diagnostics is not None else None,
    )


def qr_code(config: str) -> segno.QRCode:
    """Byte mode, so a scanner reads back exactly the config's bytes."""
    return segno.make(config, error="m", mode="byte", micro=False)


def qr_png(config: str) -> bytes:
    buf = io.BytesIO()
    qr_code(config).save(buf, kind="png", scale=6, border=4)
    return buf.getvalue()


def qr_svg(config: str) -> bytes:
    buf = io.BytesIO()
    qr_code(config).save(buf, kind="svg", scale=6, border=4, title="WireGuard profile")
    return buf.getvalue()


def probe_address(info: PublicInfo) -> str:
    """What to ping through the tunnel, chosen as the page chooses it: a DNS server inside the
    tunnel network (DAMM's default DNS is the gateway itself), else the network's first host.
    A /32 device address says nothing about the network, so a /24 is assumed then."""
    try:
        iface = ipaddress.ip_interface(info.address)
    except ValueError:
        return "the gateway's tunnel address"
    prefix = 24 if iface.version == 4 and iface.network.prefixlen >= 31 else iface.network.prefixlen
    network = ipaddress.ip_network(f"{iface.ip}/{prefix}", strict=False)
    for server in info.dns:
        try:
            ip = ipaddress.ip_address(server)
        except ValueError:
            continue
        if ip in network and ip != iface.ip:
            return str(ip)
    return str(network.network_address + 1)


def build_bundle(contents: Contents, page: Mapping[str, bytes] | None = None) -> bytes:
    """The zip's bytes; `page` is the companion page (path -> bytes) to put at its root."""
    info = contents.info
    readme = README.format(
        device_id=info.device_id, address=info.address, gateway_id=info.gateway_id,
        endpoint=parse_endpoint(contents.config), config=CONFIG_NAME, info=INFO_NAME,
        qr_png=QR_PNG_NAME, qr_svg=QR_SVG_NAME, name=CONFIG_NAME.removesuffix(".conf"),
        probe=probe_address(info),
        catalog_note=(
            f"\n{CATALOG_NAME} is the signed catalog the device last accepted; the page checks "
            "its signature against the pinned key." if contents.catalog is not None else ""
        ),
    )  # fmt: skip
    entries: dict[str, bytes] = {
        CONFIG_NAME: contents.config.encode(),
        README_NAME: readme.encode(),
        INFO_NAME: msgspec.json.format(msgspec.json.encode(info)) + b"\n",
        QR_SVG_NAME: qr_svg(contents.config),
        QR_PNG_NAME: qr_png(contents.config),
    }
    if contents.catalog is not None:
        entries[CATALOG_NAME] = contents.catalog
    if contents.diagnostics is not None:
        entries[DIAGNOSTICS_NAME] = msgspec.json.format(msgspec.json.encode(contents.diagnostics))
    for name, data in (page or {}).items():
        if name in entries:
            raise DammError(Code.INVALID_ARGUMENT, f"the page has a file named {name}")
        entries[name] = data
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(entries):
            entry = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            entry.external_attr = 0o600 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(entry, entries[name])
    return buf.getvalue()


def write_bundle(out: Path, data: bytes) -> Path:
    write_atomic(out, data, 0o600)
    return out
