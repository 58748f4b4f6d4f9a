"""The device asking the control plane about itself, and telling it where it moved.

Both requests are signed with the device's own key (``damm.protocol.device_auth``): the control
plane answers a revoked, suspended or over-quota device with that code, which `failover` and
`diagnose` pass on before touching anything.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from nats.aio.client import Client as NATS

from damm.catalog.verify import TrustState
from damm.device import files
from damm.errors import Code, DammError
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.protocol.device_auth import sign


def _rotation_key(dev: files.DeviceFile) -> str:
    """The control plane's key the device's proofs are made against (pinned at enrollment)."""
    if not dev.rotation_key:
        raise DammError(Code.STATE_MISSING, "device.json has no rotation key: re-enroll")
    return dev.rotation_key


def _pinned(trust: TrustState | None) -> tuple[str, ...]:
    return tuple(sorted(trust.pinned)) if trust is not None else ()


async def check_in(
    nc: NATS, state_dir: Path, dev: files.DeviceFile, *, timeout: float = 5.0
) -> p.DeviceStanding:
    """Where the device stands; raises the catalogued error when it may not carry on."""
    req = p.DeviceCheckIn(
        device_id=dev.device_id,
        public_key=files.public_key(state_dir),
        at=int(time.time()),
        pinned_keys=_pinned(dev.trust),
    )
    signed = sign(req, "device.status", files.private_key(state_dir), _rotation_key(dev))
    return await call(nc, "device.status", signed, p.DeviceStanding, timeout=timeout)


async def report_failover(
    nc: NATS,
    state_dir: Path,
    dev: files.DeviceFile,
    *,
    from_front_door_id: str,
    catalog_version: int,
    timeout: float = 5.0,
) -> p.Done:
    """Record, under the device's identity, the front door ``dev`` now uses."""
    req = p.ReportFailover(
        device_id=dev.device_id,
        public_key=files.public_key(state_dir),
        at=int(time.time()),
        gateway_id=dev.gateway_id,
        from_front_door_id=from_front_door_id,
        front_door_id=dev.front_door_id,
        catalog_version=catalog_version,
        pinned_keys=_pinned(dev.trust),
        request_id=uuid.uuid4().hex,
    )
    signed = sign(req, "device.failover", files.private_key(state_dir), _rotation_key(dev))
    return await call(nc, "device.failover", signed, p.Done, timeout=timeout)
