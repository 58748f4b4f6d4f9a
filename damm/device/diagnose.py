"""`damm device diagnose`: one line per check, pass / fail / skip with the reason.

Read-only: nothing here writes the state directory (the catalog is verified, not accepted). The
exported report holds public facts only; the private key never enters a `Check`, so it cannot
reach the report.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from nats.aio.client import Client as NATS

from damm.device import files
from damm.device.failover import (
    device_trust,
    fetch_catalog,
    resolve,
    split_endpoint,
    verify_for_device,
)
from damm.device.standing import check_in
from damm.device.wgconfig import parse_endpoint
from damm.errors import Code, DammError

PASS, FAIL, SKIP = "pass", "fail", "skip"
# The control plane's answers that mean "this device may not use the service".
REFUSALS = tuple(
    c.slug + ":"
    for c in (Code.DEVICE_REVOKED, Code.DEVICE_SUSPENDED, Code.OVER_QUOTA, Code.KEY_EXPIRED)
)
HANDSHAKE_MAX_AGE_S = 180  # WireGuard re-handshakes every 2 minutes on an active tunnel


class Check(msgspec.Struct, frozen=True):
    name: str
    status: str
    reason: str

    @property
    def failed(self) -> bool:
        return self.status == FAIL


class DeviceInfo(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    public_key: str
    gateway_id: str
    front_door_id: str
    endpoint: str
    address: str
    region: str | None
    catalog_min_version: int | None


class Report(msgspec.Struct, frozen=True, kw_only=True):
    generated_at: int
    ok: bool
    device: DeviceInfo | None
    checks: tuple[Check, ...]


def _mode_problem(path: Path) -> str | None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return f"{path.name} is missing"
    if not stat.S_ISREG(st.st_mode):
        return f"{path.name} is not a regular file"
    if st.st_mode & 0o077:
        return f"{path.name} has mode {stat.S_IMODE(st.st_mode):04o} (want 0600)"
    return None


def check_files(state_dir: Path) -> Check:
    if not state_dir.is_dir():
        return Check("files", FAIL, f"{state_dir} does not exist")
    problems = [
        problem
        for name in (files.PRIVATE_KEY, files.STATE, files.CONFIG)
        if (problem := _mode_problem(state_dir / name)) is not None
    ]
    if state_dir.stat().st_mode & 0o022:
        problems.append(f"{state_dir} is writable by others")
    if problems:
        return Check("files", FAIL, "; ".join(problems))
    return Check("files", PASS, "private.key, device.json, wg0.conf present with mode 0600")


async def check_config(state_dir: Path, dev: files.DeviceFile | None) -> Check:
    path = state_dir / files.CONFIG
    try:
        text = path.read_text()
    except OSError as exc:
        return Check("config", FAIL, f"cannot read {path.name}: {exc.strerror}")
    try:
        endpoint = parse_endpoint(text)
    except DammError as exc:
        return Check("config", FAIL, exc.detail)
    lowered = text.lower()
    if "[interface]" not in lowered or "privatekey" not in lowered:
        return Check("config", FAIL, "no [Interface] section with a PrivateKey")
    notes = [f"endpoint {endpoint}"]
    if dev is not None and endpoint != dev.endpoint:
        notes.append(f"differs from device.json ({dev.endpoint})")
    if shutil.which("wg-quick") and shutil.which("bash"):
        proc = await asyncio.create_subprocess_exec(
            "wg-quick", "strip", str(path.absolute()),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        if proc.returncode != 0:
            line = err.decode(errors="replace").strip().splitlines()
            return Check("config", FAIL, f"wg-quick strip: {line[-1] if line else 'failed'}")
        notes.append("wg-quick strip ok")
    return Check("config", PASS, ", ".join(notes))


async def check_interface(
    interface: str | None, dev: files.DeviceFile | None, now: float
) -> list[Check]:
    if interface is None:
        why = "no --interface given"
        return [Check("interface", SKIP, why), Check("handshake", SKIP, why)]
    from damm.wireguard.uapi import UapiBackend

    try:
        state = await UapiBackend(interface, timeout=5.0).read()
    except DammError as exc:
        return [
            Check("interface", FAIL, exc.detail),
            Check("handshake", SKIP, "interface unreadable"),
        ]
    if dev is None:
        return [
            Check("interface", PASS, f"{interface} is up with {len(state.peers)} peer(s)"),
            Check("handshake", SKIP, "no device state to find the gateway peer"),
        ]
    peer = state.peers.get(dev.gateway_public_key)
    if peer is None:
        return [
            Check("interface", FAIL, f"{interface} is up but has no peer for {dev.gateway_id}"),
            Check("handshake", SKIP, "gateway peer missing"),
        ]
    up = Check("interface", PASS, f"{interface} is up, peer {dev.gateway_id} at {peer.endpoint}")
    if not peer.last_handshake:
        return [up, Check("handshake", FAIL, "no handshake yet")]
    age = now - peer.last_handshake
    status = PASS if age <= HANDSHAKE_MAX_AGE_S else FAIL
    return [up, Check("handshake", status, f"latest handshake {age:.0f}s ago")]


async def check_endpoint(dev: files.DeviceFile | None, timeout: float = 1.0) -> Check:
    """Resolve and send one UDP datagram. WireGuard never answers a stranger, so "answering"
    here means: resolvable, routable, and no ICMP port-unreachable came back."""
    if dev is None:
        return Check("endpoint", SKIP, "no device state")
    try:
        target = await resolve(dev.endpoint)
    except DammError as exc:
        return Check("endpoint", FAIL, exc.detail)
    host, port = split_endpoint(target)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.connect((host, port))
        sock.send(b"\x00damm-diagnose")
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_recv(sock, 64), timeout)
        except TimeoutError:
            return Check("endpoint", PASS, f"{dev.endpoint} ({target}): probe sent, no rejection")
        return Check("endpoint", PASS, f"{dev.endpoint} ({target}) answered")
    except OSError as exc:
        return Check("endpoint", FAIL, f"{dev.endpoint} ({target}): {exc.strerror or exc}")
    finally:
        sock.close()


async def check_standing(
    state_dir: Path,
    dev: files.DeviceFile | None,
    connect: Callable[[], Awaitable[NATS]] | None,
    timeout: float = 5.0,
) -> Check:
    """Ask the control plane whether this device may use the service at all."""
    if dev is None:
        return Check("standing", SKIP, "no device state")
    if connect is None:
        return Check("standing", SKIP, "no NATS URL")
    try:
        try:
            nc = await asyncio.wait_for(connect(), timeout)
        except TimeoutError:
            return Check("standing", FAIL, f"unavailable: cannot reach NATS within {timeout:g}s")
        try:
            standing = await check_in(nc, state_dir, dev, timeout=timeout)
        finally:
            await nc.close()
    except DammError as exc:
        return Check("standing", FAIL, exc.line())
    return Check(
        "standing",
        PASS,
        f"{standing.status} on {standing.gateway_id}/{standing.front_door_id}",
    )


async def check_catalog(
    dev: files.DeviceFile | None,
    connect: Callable[[], Awaitable[NATS]] | None,
    now: float,
    timeout: float = 5.0,
) -> Check:
    if dev is None:
        return Check("catalog", SKIP, "no device state")
    if connect is None:
        return Check("catalog", SKIP, "no NATS URL")
    try:
        trust = device_trust(dev)
        try:
            nc = await asyncio.wait_for(connect(), timeout)
        except TimeoutError:
            return Check("catalog", FAIL, f"unavailable: cannot reach NATS within {timeout:g}s")
        try:
            signed = await fetch_catalog(nc, trust.region)
        finally:
            await nc.close()
        checked = verify_for_device(signed, trust, now=int(now))
    except DammError as exc:
        return Check("catalog", FAIL, exc.line())
    cat = checked.catalog
    listed = any(g.id == dev.gateway_id for g in cat.gateways)
    if not listed:
        return Check(
            "catalog", FAIL, f"version {cat.version} verified but {dev.gateway_id} is not listed"
        )
    return Check(
        "catalog",
        PASS,
        f"version {cat.version} by key {checked.key_id}, expires in "
        f"{cat.expires_at - int(now)}s, lists {dev.gateway_id}",
    )


async def diagnose(
    state_dir: Path,
    *,
    interface: str | None = None,
    connect: Callable[[], Awaitable[NATS]] | None = None,
    probe_endpoint: bool = True,
    now: float | None = None,
    timeout: float = 5.0,
) -> Report:
    now = time.time() if now is None else now
    checks = [check_files(state_dir)]
    dev: files.DeviceFile | None
    try:
        dev = files.load(state_dir)
    except DammError as exc:
        dev = None
        checks.append(Check("state", FAIL, exc.detail))
    else:
        checks.append(Check("state", PASS, f"device {dev.device_id} via {dev.gateway_id}"))
    checks.append(await check_config(state_dir, dev))
    checks += await check_interface(interface, dev, now)
    if probe_endpoint:
        checks.append(await check_endpoint(dev))
    else:
        checks.append(Check("endpoint", SKIP, "probe disabled"))
    standing = await check_standing(state_dir, dev, connect, timeout)
    checks.append(standing)
    if standing.failed and standing.reason.startswith(REFUSALS):
        checks.append(Check("catalog", SKIP, "the control plane refused this device"))
    else:
        checks.append(await check_catalog(dev, connect, now, timeout))
    info = None
    if dev is not None:
        info = DeviceInfo(
            device_id=dev.device_id, public_key=dev.public_key, gateway_id=dev.gateway_id,
            front_door_id=dev.front_door_id, endpoint=dev.endpoint, address=dev.address,
            region=dev.trust.region if dev.trust else None,
            catalog_min_version=dev.trust.min_version if dev.trust else None,
        )  # fmt: skip
    return Report(
        generated_at=int(now),
        ok=not any(c.failed for c in checks),
        device=info,
        checks=tuple(checks),
    )


def render_lines(report: Report) -> list[str]:
    return [f"{c.status:<4}  {c.name:<9} {c.reason}" for c in report.checks]


def export(report: Report, path: Path) -> None:
    from damm.private_files import write_atomic

    write_atomic(path, msgspec.json.format(msgspec.json.encode(report)).decode() + "\n", 0o600)
