"""Real servers for tests: a fresh nats-server per test, one PostgreSQL per session."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import hypothesis
import pytest
from nats.aio.client import Client as NATS

from damm import log
from damm.control.process import ControlPlane
from damm.events.store import EventStore
from damm.events.streams import ensure_streams
from damm.projections.migrate import migrate
from damm.protocol.bus import connect
from damm.stack.nats_server import NatsServer
from damm.stack.postgres import Postgres
from tests.planes import running_plane, settings_for

log.configure("warning", json=False)

# Hypothesis's per-example deadline measures this machine's load, not a property: on two busy
# cores a codec round trip over a large example passed 200 ms and failed a green run.
hypothesis.settings.register_profile(
    "damm", deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow]
)
hypothesis.settings.load_profile("damm")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await connect(
        nats_server.url, user="control", password=nats_server.passwords["control"], name="test"
    )
    await ensure_streams(client.jetstream())
    yield client
    await client.close()


@pytest.fixture
async def store(nc: NATS) -> EventStore:
    return EventStore(nc)


@pytest.fixture(scope="session")
def pg_uri() -> Iterator[str]:
    root = Path(tempfile.mkdtemp(prefix="damm-test-pg-", dir="/tmp"))
    server = Postgres(root / "pgdata", delete_on_stop=True)
    uri = server.start()
    yield uri
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def _with_database(uri: str, name: str) -> str:
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture
async def dsn(pg_uri: str) -> AsyncIterator[str]:
    """A fresh database with the read-model schema migrated."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(pg_uri)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    url = _with_database(pg_uri, name)
    conn = await asyncpg.connect(url)
    await migrate(conn, "damm")
    await conn.close()
    yield url
    admin = await asyncpg.connect(pg_uri)
    await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await admin.close()


@pytest.fixture
async def control(nats_server: NatsServer, dsn: str, tmp_path: Path) -> AsyncIterator[ControlPlane]:
    async with running_plane(nats_server, dsn, settings_for(tmp_path)) as plane:
        yield plane


@pytest.fixture
def callout_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """The shipped layout: no device or gateway users in the file; the control plane's auth
    callout decides each connection (a module opts in by overriding ``nats_server``)."""
    server = NatsServer(tmp_path / "nats", callout=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def callout_control(
    callout_nats_server: NatsServer, dsn: str, tmp_path: Path
) -> AsyncIterator[ControlPlane]:
    """A control plane that answers the auth callout (with ``callout_nats_server``)."""
    async with running_plane(callout_nats_server, dsn, settings_for(tmp_path)) as plane:
        yield plane


@pytest.fixture
async def admin_nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    client = await connect(nats_server.url, user="admin", password=nats_server.passwords["admin"])
    yield client
    await client.close()


@pytest.fixture
async def device_nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """Devices connect with no credentials: the server maps them to the narrow device user."""
    client = await connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
async def gateway_nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    # Handler tests simulate many gateways over one connection (the operator's unrestricted
    # admin user: the control-plane user may not send requests); per-gateway NATS users are
    # exercised by the agent tests, tests/test_stack.py and tests/security.
    client = await connect(nats_server.url, user="admin", password=nats_server.passwords["admin"])
    yield client
    await client.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long soaks (`@pytest.mark.slow`) are opt-in: `-m slow` or DAMM_SLOW=1.

    The whole suite must stay well under ten minutes on two cores; each slow test has a
    CI-sized sibling that always runs and checks the same invariants.
    """
    if os.environ.get("DAMM_SLOW") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow soak: run with -m slow or DAMM_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
