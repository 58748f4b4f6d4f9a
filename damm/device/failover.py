"""`damm device failover`: move to another front door of the same gateway, on signed evidence only.

Fetch the region's catalog, verify it against the pinned keys (signature, freshness, version),
choose the next active front door of the device's gateway, then write: the config (atomically),
the state file (atomically, with the new trust: the accepted version and any announced key) and
finally the live interface. Everything that can fail on the catalog fails before the first
write, so a refused catalog leaves both files byte for byte as they were.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgspec
from nats.aio.client import Client as NATS

from damm.catalog.document import Catalog, decode_signed
from damm.catalog.verify import TrustState, choose_failover, verify
from damm.device import files
from damm.device.standing import check_in, report_failover
from damm.device.wgconfig import parse_endpoint, replace_endpoint
from damm.errors import Code, DammError
from damm.private_files import write_atomic
from damm.protocol import messages as p
from damm.protocol.client import call

CLOCK_SKEW_S = 60


class EndpointSetter(Protocol):
    async def set_peer_endpoint(self, public_key: str, endpoint: str) -> None: ...


class FailoverResult(msgspec.Struct, frozen=True, kw_only=True):
    device_id: str
    gateway_id: str
    old_endpoint: str
    new_endpoint: str
    front_door_id: str
    catalog_version: int
    key_id: str
    live_updated: bool
    live_interface: str | None = None
    reported: bool = False  # the control plane recorded the move
    report_error: str = ""


@dataclass(frozen=True)
class Verified:
    catalog: Catalog
    trust: TrustState
    key_id: str


async def fetch_catalog(nc: NATS, region: str, timeout: float = 5.0) -> bytes:
    reply = await call(
        nc, "catalog.get", p.GetCatalog(region=region), p.SignedCatalogReply, timeout=timeout
    )
    return reply.signed


def verify_for_device(
    signed_bytes: bytes, trust: TrustState, *, now: int, skew_seconds: int = CLOCK_SKEW_S
) -> Verified:
    """`verify`, with the wrong-region refusal given its own catalogued code."""
    signed = decode_signed(signed_bytes)
    try:
        catalog, new_trust = verify(signed, trust, now=now, skew_seconds=skew_seconds)
    except DammError as exc:
        if exc.code is Code.INVALID_ARGUMENT and "region" in exc.detail:
            raise DammError(Code.CATALOG_WRONG_REGION, exc.detail) from None
        raise
    return Verified(catalog, new_trust, signed.key_id)


def device_trust(dev: files.DeviceFile) -> TrustState:
    if dev.trust is None:
        raise DammError(
            Code.STATE_MISSING,
            "device.json has no catalog trust (enrolled without a catalog key): re-enroll",
        )
    return dev.trust


async def failover(
    nc: NATS,
    state_dir: Path,
    *,
    now: int | None = None,
    live_interface: str | None = None,
    backend: EndpointSetter | None = None,
) -> FailoverResult:
    state_dir = Path(state_dir)
    dev = files.load(state_dir)
    trust = device_trust(dev)
    config_path = state_dir / files.CONFIG
    try:
        config_text = config_path.read_text()
    except FileNotFoundError:
        raise DammError(Code.STATE_MISSING, f"no {config_path}: enroll first") from None
    current = parse_endpoint(config_text)
    # A revoked, suspended or over-quota device stops here, before anything is written.
    await check_in(nc, state_dir, dev)

    signed_bytes = await fetch_catalog(nc, trust.region)
    checked = verify_for_device(signed_bytes, trust, now=int(time.time()) if now is None else now)
    door = choose_failover(checked.catalog, dev.gateway_id, current)
    new_text = replace_endpoint(config_text, door.endpoint)
    new_dev = msgspec.structs.replace(
        dev, endpoint=door.endpoint, front_door_id=door.id, trust=checked.trust
    )

    # Writes: config, then state; if the state write fails, put the old config back.
    write_atomic(config_path, new_text, mode=0o600)
    try:
        files.save(state_dir, new_dev)
    except BaseException:
        write_atomic(config_path, config_text, mode=0o600)
        raise
    files.save_catalog(state_dir, signed_bytes)  # the evidence, after the state that relies on it

    live_updated = False
    if backend is None and live_interface is not None:
        from damm.wireguard.uapi import UapiBackend

        backend = UapiBackend(live_interface)
    if backend is not None:
        await backend.set_peer_endpoint(dev.gateway_public_key, await resolve(door.endpoint))
        live_updated = True

    reported, report_error = True, ""
    try:
        await report_failover(
            nc,
            state_dir,
            new_dev,
            from_front_door_id=dev.front_door_id,
            catalog_version=checked.catalog.version,
        )
    except DammError as err:
        # The move itself happened and stays; the caller tells the user it went unrecorded.
        reported, report_error = False, err.line()

    return FailoverResult(
        device_id=dev.device_id,
        gateway_id=dev.gateway_id,
        old_endpoint=current,
        new_endpoint=door.endpoint,
        front_door_id=door.id,
        catalog_version=checked.catalog.version,
        key_id=checked.key_id,
        live_updated=live_updated,
        live_interface=live_interface,
        reported=reported,
        report_error=report_error,
    )


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


async def resolve(endpoint: str) -> str:
    """An ``ip:port`` the UAPI accepts (it does not resolve names itself)."""
    host, port = split_endpoint(endpoint)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise DammError(Code.UNAVAILABLE, f"cannot resolve {host}: {exc}") from None
        ip = ipaddress.ip_address(infos[0][4][0])
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
