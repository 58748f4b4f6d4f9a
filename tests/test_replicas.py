"""Two control planes, one system: shared sealed keys, one published catalog, a fenced leader.

Each test runs two real ControlPlane instances against one nats-server, each with its own key
directory: everything they must agree on comes from the event log, never from their disks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from damm.catalog.document import decode_signed
from damm.catalog.signing import CatalogSigner
from damm.catalog.verify import TrustState, initial_trust, verify
from damm.control.handlers import signing_keys
from damm.control.leadership import Leadership
from damm.control.process import ControlPlane
from damm.domain.ipam import Overlay
from damm.errors import Code, DammError
from damm.events import codec
from damm.events import model as m
from damm.keys.rotation import RotationKey
from damm.keys.sealing import LocalKek
from damm.protocol import messages as p
from damm.protocol.client import call
from damm.protocol.router import Call
from damm.settings import ControlSettings
from damm.stack.nats_server import NatsServer
from damm.subjects import EVENTS_STREAM, LEASE_BUCKET
from tests.fleet import enroll, setup_fleet

ADMIN = m.Actor("admin", "test")


def settings(tmp_path: Path, kek: LocalKek | None, name: str) -> ControlSettings:
    return ControlSettings(
        overlay=Overlay.parse("10.44.0.0/24"), keys_dir=tmp_path / f"keys-{name}", kek=kek
    )


def plane(url: str, password: str, dsn: str, s: ControlSettings) -> ControlPlane:
    return ControlPlane(url, dsn, s, password=password, run_projectors=False)


@pytest.fixture
async def second(
    control: ControlPlane, nats_server: NatsServer, dsn: str, tmp_path: Path
) -> AsyncIterator[ControlPlane]:
    """Another replica beside the ``control`` fixture's, with its own (empty) key directory."""
    other = plane(
        nats_server.url,
        nats_server.passwords["control"],
        dsn,
        settings(tmp_path, control.settings.kek, "second"),
    )
    await other.start()
    yield other
    await other.stop()


async def until(check: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> float:
    """Poll ``check`` until true; return the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > timeout:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(step)
    return loop.time() - start


async def fetch(plane: ControlPlane, region: str = "eu") -> bytes:
    """Ask one replica (not the queue group) for its served catalog."""
    assert plane.catalogs is not None
    reply = await plane.catalogs.get(p.GetCatalog(region=region), Call(uuid.uuid4().hex, ADMIN))
    return reply.signed


async def all_messages(nc: NATS) -> list[tuple[str, bytes]]:
    js = nc.jetstream()
    info = await js.stream_info(EVENTS_STREAM)
    out = []
    for seq in range(1, int(info.state.last_seq) + 1):
        raw = await js.get_msg(EVENTS_STREAM, seq)
        out.append((raw.subject or "", raw.data or b""))
    return out


def published(plane: ControlPlane, region: str = "eu") -> m.CatalogPublished | None:
    assert plane.ctx is not None
    return plane.ctx.state.catalogs.get(region)


def leader_of(*planes: ControlPlane) -> ControlPlane:
    leaders = [x for x in planes if x.leadership is not None and x.leadership.is_leader]
    assert len(leaders) == 1, "exactly one leader"
    return leaders[0]


# --- signing material in the log ---------------------------------------------------------------


async def test_replicas_share_sealed_keys_and_no_seed_is_in_the_log(
    control: ControlPlane, second: ControlPlane
) -> None:
    assert control.ctx is not None and second.ctx is not None
    assert control.ctx.signer.key_id == second.ctx.signer.key_id
    assert control.ctx.rotation.public_b64 == second.ctx.rotation.public_b64
    assert not (second.settings.keys_dir / "catalog.key").exists()  # nothing on the replica's disk
    assert control.nc is not None and control.settings.kek is not None
    messages = await all_messages(control.nc)
    sealed = [
        e
        for _, data in messages
        if isinstance(e := codec.decode(data).event, m.SigningKeyAnnounced | m.RotationKeyStored)
    ]
    assert len(sealed) == 2
    seeds = [control.settings.kek.unseal(e.sealed_seed) for e in sealed]
    assert CatalogSigner.from_seed(seeds[0]).key_id == control.ctx.signer.key_id
    assert RotationKey(seeds[1]).public_b64 == control.ctx.rotation.public_b64
    for _, data in messages:
        for seed in seeds:
            for shape in (seed, base64.b64encode(seed), seed.hex().encode()):
                assert shape not in data


async def test_a_wrong_or_missing_kek_is_refused(
    control: ControlPlane, nats_server: NatsServer, dsn: str, tmp_path: Path
) -> None:
    assert control.nc is not None and control.leadership is not None
    await asyncio.wait_for(control.leadership.gained.wait(), 5)
    before = len(await all_messages(control.nc))
    for kek, code in ((LocalKek.generate(), Code.KEK_MISMATCH), (None, Code.KEK_MISSING)):
        wrong = plane(
            nats_server.url, nats_server.passwords["control"], dsn, settings(tmp_path, kek, "w")
        )
        with pytest.raises(DammError) as info:
            await wrong.start()
        await wrong.stop()
        assert info.value.code is code, info.value.line()
    assert len(await all_messages(control.nc)) == before  # it appended nothing


async def test_first_start_imports_the_keys_directory(
    nats_server: NatsServer, dsn: str, tmp_path: Path
) -> None:
    s = settings(tmp_path, LocalKek.generate(), "old")
    s.keys_dir.mkdir(mode=0o700)
    old = CatalogSigner.load_or_create(s.keys_dir / "catalog.key")
    rotation = RotationKey.load_or_create(s.keys_dir / "rotation.key")
    first = plane(nats_server.url, nats_server.passwords["control"], dsn, s)
    await first.start()
    try:
        assert first.ctx is not None
        assert first.ctx.signer.key_id == old.key_id
        assert first.ctx.rotation.public_b64 == rotation.public_b64
    finally:
        await first.stop()


# --- one published catalog, whichever replica answers -----------------------------------------


async def test_every_fetch_from_either_replica_verifies_under_one_key(
    control: ControlPlane,
    second: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc, uses=20)
    devices = [await enroll(device_nc, fleet["token"]) for _ in range(10)]
    await until(lambda: published(control) is not None and published(second) is not None)
    trusts: list[TrustState] = []
    keys = set()
    for dev in devices:
        assert dev.catalog is not None
        keys.add(dev.catalog.key_id)
        trusts.append(
            initial_trust(
                dev.catalog.region,
                dev.catalog.key_id,
                dev.catalog.public_key,
                dev.catalog.min_version,
            )
        )
    assert len(keys) == 1
    now = int(time.time())
    for n in range(30):
        for i, trust in enumerate(trusts):
            source = (control, second)[(n + i) % 2]
            signed = await fetch(source)
            # verify also refuses a version older than one this device accepted before
            _, trusts[i] = verify(signed, trust, now=now)
        over_bus = await call(
            device_nc, "catalog.get", p.GetCatalog(region="eu"), p.SignedCatalogReply
        )
        _, trusts[0] = verify(over_bus.signed, trusts[0], now=now)
    assert {decode_signed(await fetch(x)).key_id for x in (control, second)} == keys
    # Both replicas serve the very same published bytes (once both folded the latest).
    served: list[bytes] = []

    async def same() -> bool:
        served[:] = [await fetch(control), await fetch(second)]
        return served[0] == served[1]

    deadline = time.monotonic() + 5
    while not await same():
        assert time.monotonic() < deadline, "replicas serve different catalogs"
        await asyncio.sleep(0.02)


async def test_rotation_across_replicas(
    control: ControlPlane,
    second: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
) -> None:
    assert control.signing_keys is not None and second.signing_keys is not None
    fleet = await setup_fleet(admin_nc, gateway_nc, uses=40)
    before = [await enroll(device_nc, fleet["token"]) for _ in range(6)]
    trusts = []
    for dev in before:
        assert dev.catalog is not None
        trusts.append(
            initial_trust("eu", dev.catalog.key_id, dev.catalog.public_key, dev.catalog.min_version)
        )
    old_key = before[0].catalog.key_id  # type: ignore[union-attr]

    def fetch_all() -> Awaitable[None]:
        async def go() -> None:
            now = int(time.time())
            for i, trust in enumerate(trusts):
                for source in (control, second):
                    _, trusts[i] = verify(await fetch(source), trust, now=now)
                    trust = trusts[i]

        return go()

    announced = await control.signing_keys.announce(p.Empty(), Call("announce", ADMIN))
    assert announced.published
    await fetch_all()  # every device now pins the next key, whichever replica it asked
    assert all(announced.key_id in t.pinned for t in trusts)
    # Enrolled between announce and activate, and fetching nothing before the switch: its
    # enrollment pinned the announced key too.
    between = await enroll(device_nc, fleet["token"])
    assert between.catalog is not None
    assert [k.key_id for k in between.catalog.next_keys] == [announced.key_id]
    quiet = initial_trust(
        "eu",
        between.catalog.key_id,
        between.catalog.public_key,
        between.catalog.min_version,
        between.catalog.next_keys,
    )

    activated = await second.signing_keys.activate(p.Empty(), Call("activate", ADMIN))
    assert activated.key_id == announced.key_id and activated.retired_key_id == old_key
    assert activated.published
    await until(
        lambda: all(
            x.ctx is not None and x.ctx.signer.key_id == announced.key_id for x in (control, second)
        )
    )
    await fetch_all()
    for source in (control, second):
        assert decode_signed(await fetch(source)).key_id == announced.key_id
        verify(await fetch(source), quiet, now=int(time.time()))
    after = [await enroll(device_nc, fleet["token"]) for _ in range(12)]
    assert {d.catalog.key_id for d in after} == {announced.key_id}  # type: ignore[union-attr]
    assert not any(old_key in {k.key_id for k in d.catalog.next_keys} for d in after)  # type: ignore[union-attr]
    # a device enrolled after the switch verifies what either replica serves
    dev = after[-1]
    assert dev.catalog is not None
    trust = initial_trust("eu", dev.catalog.key_id, dev.catalog.public_key, dev.catalog.min_version)
    for source in (control, second):
        verify(await fetch(source), trust, now=int(time.time()))

    # activate again with nothing announced: a specific refusal, and nothing appended
    with pytest.raises(DammError) as info:
        await control.signing_keys.activate(p.Empty(), Call("again", ADMIN))
    assert info.value.code is Code.NOT_FOUND


async def test_a_fetch_during_the_switch_waits_for_the_new_key(
    control: ControlPlane,
    second: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between an activation and the leader's next catalog, a replica does not hand a device
    that pinned the new key a catalog signed by the retired one."""
    await setup_fleet(admin_nc, gateway_nc)
    await until(lambda: published(control) is not None and published(second) is not None)
    leader = leader_of(control, second)
    follower = second if leader is control else control
    assert leader.catalogs is not None and follower.signing_keys is not None
    # Every step is bounded: a hang here must fail with its place, not stall the suite.
    await asyncio.wait_for(follower.signing_keys.announce(p.Empty(), Call("a", ADMIN)), 15)
    await asyncio.wait_for(leader.catalogs.stop(), 15)  # the leader is slow to publish
    monkeypatch.setattr(signing_keys, "PUBLISH_WAIT_S", 0.3)
    activated = await asyncio.wait_for(
        follower.signing_keys.activate(p.Empty(), Call("b", ADMIN)), 15
    )
    assert not activated.published
    waiting = asyncio.create_task(fetch(follower))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    leader.catalogs.start()
    assert decode_signed(await asyncio.wait_for(waiting, 15)).key_id == activated.key_id


# --- leadership ---------------------------------------------------------------------------------


async def test_a_deposed_leader_cannot_publish(
    nats_server: NatsServer, dsn: str, tmp_path: Path, admin_nc: NATS, gateway_nc: NATS
) -> None:
    kek = LocalKek.generate()
    password = nats_server.passwords["control"]
    a = plane(nats_server.url, password, dsn, settings(tmp_path, kek, "a"))
    b = plane(nats_server.url, password, dsn, settings(tmp_path, kek, "b"))
    await a.start()
    try:
        assert a.leadership is not None and a.lease_task is not None
        await asyncio.wait_for(a.leadership.gained.wait(), 5)
        await b.start()
        assert b.leadership is not None
        await setup_fleet(admin_nc, gateway_nc)
        await until(lambda: published(a) is not None)
        a_term = a.leadership.term
        # A stops renewing (a paused process) while it still believes it leads; its lease ends.
        a.lease_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await a.lease_task
        assert a.nc is not None
        kv = await a.nc.jetstream().key_value(LEASE_BUCKET)
        await kv.delete(a.leadership.key)
        await until(lambda: b.leadership is not None and b.leadership.is_leader)
        assert a.leadership.is_leader  # it has not noticed
        assert b.leadership.term > a_term
        # A change A would publish a catalog for:
        await call(
            admin_nc,
            "admin.gateway.front_door",
            p.SetFrontDoor(
                gateway_id="gw1", front_door_id="fd2", endpoint="192.0.2.9:51820", priority=20
            ),
            p.Done,
        )
        assert a.ctx is not None and a.catalogs is not None
        await a.ctx.follower.sync()
        with pytest.raises(DammError) as info:
            await a.catalogs.tick()
        assert info.value.code is Code.NOT_LEADER
        assert not a.leadership.is_leader  # it stepped down
        # Every catalog appended after B's term began carries B's term.
        b_term = b.leadership.term
        await until(lambda: (p_b := published(b)) is not None and p_b.term == b_term)
        messages = await all_messages(a.nc)
        terms = [codec.decode(d).event for s, d in messages if s.startswith("damm.evt.catalog.")]
        start = max(
            i
            for i, e in enumerate(terms)
            if isinstance(e, m.LeaderTermStarted) and e.term == b_term
        )
        later = [e for e in terms[start + 1 :] if isinstance(e, m.CatalogPublished)]
        assert later and {e.term for e in later} == {b_term}
        versions = [e.version for e in terms if isinstance(e, m.CatalogPublished)]
        assert versions == sorted(versions) and len(set(versions)) == len(versions)
    finally:
        await b.stop()
        await a.stop()


async def test_leadership_moves_when_the_leader_stops(
    nats_server: NatsServer, dsn: str, tmp_path: Path
) -> None:
    kek = LocalKek.generate()
    password = nats_server.passwords["control"]
    a = plane(nats_server.url, password, dsn, settings(tmp_path, kek, "a"))
    b = plane(nats_server.url, password, dsn, settings(tmp_path, kek, "b"))
    await a.start()
    await b.start()
    try:
        await until(
            lambda: any(x.leadership is not None and x.leadership.is_leader for x in (a, b))
        )
        leader = leader_of(a, b)
        other = b if leader is a else a
        await leader.stop()
        assert other.leadership is not None
        took = await until(lambda: other.leadership is not None and other.leadership.is_leader)
        # A stopping leader releases its lease: the next renewal round takes it.
        assert took <= other.settings.lease_renew_s + 1.0, took
    finally:
        await a.stop()
        await b.stop()


async def test_a_renewal_that_landed_unseen_keeps_the_lease(control: ControlPlane) -> None:
    """A renewal that timed out here but reached the server must not cost the lease."""
    lead = control.leadership
    assert lead is not None
    await asyncio.wait_for(lead.gained.wait(), 5)
    term, since = lead.term, lead.changed_at
    stale = lead.revision - 1
    lead.revision = stale  # as if our last update's acknowledgement never arrived
    await until(lambda: lead.revision > stale + 1, 5)
    assert lead.is_leader and lead.term == term and lead.changed_at == since


class Proxy:
    """A TCP relay to nats-server that a test can cut: the leader 'loses NATS' for real."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{self.port}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        self.writers.clear()


async def test_leadership_moves_within_the_bound_when_the_leader_loses_nats(
    nats_server: NatsServer, dsn: str, tmp_path: Path
) -> None:
    kek = LocalKek.generate()
    password = nats_server.passwords["control"]
    proxy = Proxy(int(nats_server.url.rsplit(":", 1)[1]))
    a = plane(await proxy.start(), password, dsn, settings(tmp_path, kek, "a"))
    b = plane(nats_server.url, password, dsn, settings(tmp_path, kek, "b"))
    await a.start()
    try:
        assert a.leadership is not None
        await asyncio.wait_for(a.leadership.gained.wait(), 5)
        await b.start()
        assert b.leadership is not None
        loop = asyncio.get_running_loop()
        await proxy.cut()
        cut_at = loop.time()
        took = await until(lambda: b.leadership is not None and b.leadership.is_leader, 15)
        # A stepped down by itself, before B took over: never two leaders.
        assert not a.leadership.is_leader
        assert a.leadership.changed_at <= cut_at + took
        assert took <= Leadership.handover_bound(b.settings), took
    finally:
        await b.stop()
        await a.stop()


def test_control_run_without_a_kek_says_so(tmp_path: Path) -> None:
    """Refused before it connects anywhere: no server is needed to show it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAMM_KEK")}
    env |= {
        "DAMM_NATS_URL": "nats://127.0.0.1:1",
        "DAMM_DATABASE_URL": "postgresql://nobody@/none",
        "DAMM_CONTROL_PASSWORD": "unused",
        "DAMM_HOME": str(tmp_path / "nohome"),
    }
    damm = str(Path(sys.executable).parent / "damm")
    done = subprocess.run(
        [damm, "control", "run", "--keys-dir", str(tmp_path / "keys")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == Code.KEK_MISSING.exit_status, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {Code.KEK_MISSING.slug}: " + Code.KEK_MISSING.message
    ]
