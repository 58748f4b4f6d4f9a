"""Control planes for tests: one way to build and run one against a test's nats-server.

The fixtures that need a control plane (the usual one, the callout one, a wider overlay, the
hostile suite's) differ only in settings and in the server's layout; this module holds what
they share, so a change to how a control plane starts is made once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from damm.clock import SkewedClock
from damm.control.process import ControlPlane
from damm.domain.ipam import Overlay
from damm.keys.sealing import LocalKek
from damm.settings import ControlSettings
from damm.stack.gateway_users import follow_gateways
from damm.stack.nats_server import NatsServer


def settings_for(
    tmp_path: Path, overlay: str = "10.44.0.0/24", **overrides: Any
) -> ControlSettings:
    """Settings for one test's control plane: its own keys directory and a fresh KEK."""
    overrides.setdefault("kek", LocalKek.generate())
    return ControlSettings(overlay=Overlay.parse(overlay), keys_dir=tmp_path / "keys", **overrides)


def plane_on(
    server: NatsServer, dsn: str, settings: ControlSettings, **options: Any
) -> ControlPlane:
    """A control plane for ``server``'s layout: on the callout layout it answers the callout."""
    options.setdefault("clock", SkewedClock())
    if server.callout:
        options.setdefault("callout_seed", server.callout_seed)
    return ControlPlane(server.url, dsn, settings, password=server.passwords["control"], **options)


@asynccontextmanager
async def running_plane(
    server: NatsServer, dsn: str, settings: ControlSettings, *, leader: bool = False, **options: Any
) -> AsyncIterator[ControlPlane]:
    """A started control plane, stopped on exit.

    On the static layout (no callout) the server's gateway users follow the log, as `damm up`
    did before the callout; ``leader`` waits until this plane holds the lease.
    """
    plane = plane_on(server, dsn, settings, **options)
    await plane.start()
    users_stop = asyncio.Event()
    users: asyncio.Task[None] | None = None
    try:
        assert plane.ctx is not None and plane.leadership is not None
        if not server.callout:
            users = asyncio.create_task(follow_gateways(server, plane.ctx.state, users_stop))
        if leader:
            await asyncio.wait_for(plane.leadership.gained.wait(), 5)
        yield plane
    finally:
        users_stop.set()
        if users is not None:
            await users
        await plane.stop()
