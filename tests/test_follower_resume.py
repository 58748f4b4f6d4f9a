"""The decision-state follower against a real nats-server that restarts under it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import urlsplit

from damm.control.follower import StateFollower
from damm.control.state import DecisionState
from damm.events import model as m
from damm.events.store import Append, EventStore, envelope
from damm.events.streams import ensure_streams
from damm.protocol.bus import connect
from damm.settings import ControlSettings
from damm.stack.nats_server import NatsServer
from damm.subjects import event_subject

ADMIN = m.Actor("admin", "alice")


def tier(name: str) -> Append:
    subject = event_subject("tier", name)
    env = envelope(
        subject, m.TierDefined(tier=name, regions=("eu",)), actor=ADMIN, correlation_id=name
    )
    return Append(subject, env, expected_seq=0)


async def append_until_taken(store: EventStore, item: Append, timeout: float = 15.0) -> None:
    """Append once the log takes it: the writer may itself still be reconnecting."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await store.append(item)
            return
        except Exception:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_follower_folds_new_events_within_a_second_of_a_restart(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    followers: list[StateFollower] = []

    async def reconnected() -> None:
        for f in followers:
            f.reconnected()

    password = nats_server.passwords["control"]
    nc = await connect(
        nats_server.url, user="control", password=password, on_reconnected=reconnected
    )
    writer = await connect(nats_server.url, user="control", password=password)
    try:
        await ensure_streams(nc.jetstream())
        store = EventStore(writer)
        await store.append(tier("before"))
        state = DecisionState(ControlSettings(keys_dir=tmp_path / "keys").overlay)
        follower = StateFollower(nc, state)
        followers.append(follower)
        await follower.start()
        assert "before" in state.tiers

        port = urlsplit(nats_server.url).port
        assert port is not None
        nats_server.stop()
        nats_server.port = port
        nats_server.start()
        await append_until_taken(store, tier("after"))
        appended = time.monotonic()
        while "after" not in state.tiers:
            assert time.monotonic() - appended < 1.0, "follower blind after the restart"
            await asyncio.sleep(0.01)
        await follower.sync(timeout=1.0)
        await follower.stop()
    finally:
        await writer.close()
        await nc.close()


class _LeaderlessJetStream:
    """A JetStream whose consumer creation goes unanswered until ``ready_at`` (a cluster that
    lost its meta leader elects another): a request sent before then waits out its timeout."""

    def __init__(self, timeout: float, ready_at: float) -> None:
        self.timeout = timeout
        self.ready_at = ready_at

    async def subscribe(self, *args: object, **kwargs: object) -> object:
        loop = asyncio.get_running_loop()
        if loop.time() < self.ready_at:
            await asyncio.sleep(self.timeout)
            raise TimeoutError
        return _Sub()


class _Sub:
    async def unsubscribe(self) -> None:
        return None


class _LeaderlessConnection:
    def __init__(self, ready_at: float) -> None:
        self.ready_at = ready_at

    def jetstream(self, timeout: float = 5.0) -> _LeaderlessJetStream:
        return _LeaderlessJetStream(timeout, self.ready_at)


async def test_resume_retries_soon_after_the_meta_leader_returns() -> None:
    """Killing the node that led JetStream's meta group left one replica's follower without
    its consumer for 10.4 s at 200/s (its first attempt waited out a 10 s request timeout),
    and half of all enrollments failed meanwhile. Each attempt now gives up after a second."""
    loop = asyncio.get_running_loop()
    nc = _LeaderlessConnection(ready_at=loop.time() + 1.5)
    follower = StateFollower(nc, DecisionState(ControlSettings().overlay))  # type: ignore[arg-type]
    started = loop.time()
    await asyncio.wait_for(follower._resume(), 30)
    assert len(follower._subs) == 2
    assert loop.time() - started < 4.0
