"""Real servers for tests: a fresh nats-server per test, one PostgreSQL per session."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from nats.aio.client import Client as NATS

from damm import log
from damm.bus import connect
from damm.events.store import EventStore
from damm.events.streams import ensure_streams
from damm.projections.migrate import migrate
from damm.stack.nats_server import NatsServer
from damm.stack.postgres import Postgres

log.configure("warning", json=False)


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
