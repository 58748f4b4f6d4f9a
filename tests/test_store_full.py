"""A full JetStream store (issue 11, finding 5), against a real nats-server whose file store is
a few hundred kilobytes: the device hears `unavailable` with the reason, nothing half-recorded,
and the stream is intact."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from damm.control.process import ControlPlane
from damm.errors import Code, DammError
from damm.events import model as m
from damm.events.store import Append, AppendError, EventStore, envelope
from damm.stack.nats_server import NatsServer
from damm.subjects import EVENTS_STREAM, event_subject
from tests.fleet import enroll, setup_fleet

ADMIN = m.Actor("admin", "filler")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", max_file_store=512 * 1024)
    server.start()
    yield server
    server.stop()


async def fill(store: EventStore) -> int:
    """Append filler until the log refuses; return how many landed."""
    regions = tuple(f"r{n:04d}" for n in range(200))  # about 2 kB an event
    n = 0
    while True:
        subject = event_subject("tier", f"filler{n}")
        env = envelope(subject, m.TierDefined(tier=f"filler{n}", regions=regions), actor=ADMIN,
                       correlation_id=f"f{n}")  # fmt: skip
        try:
            await store.append(Append(subject, env))
        except AppendError as err:
            assert "insufficient resources" in err.detail, err.line()
            return n
        n += 1
        assert n < 1000, "the store never filled"


async def test_a_full_store_answers_unavailable_with_the_reason(
    control: ControlPlane, admin_nc: NATS, gateway_nc: NATS, device_nc: NATS, nc: NATS
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    store = EventStore(nc)
    assert await fill(store) > 10
    before = await store.stream_last_seq()
    with pytest.raises(DammError) as info:
        await enroll(device_nc, fleet["token"])
    assert info.value.code is Code.UNAVAILABLE, info.value.line()
    assert "insufficient resources" in info.value.detail
    assert await store.stream_last_seq() == before, "a refused enrollment left events behind"
    js = nc.jetstream()
    state = (await js.stream_info(EVENTS_STREAM)).state
    assert state.messages == state.last_seq  # nothing lost or torn
