"""Every attack of issue 10 against the real stack on its shipped configuration (the auth
callout decides every connection), as an anonymous device, as a gateway beyond its scope and as
a device acting on another device; then the same fleet still works.

Under the callout the server itself refuses much of what the control plane used to: a party
publishing outside its grant or subscribing to another's inbox gets no answer, only a
permissions violation from the server; those attacks assert that refusal.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from typing import Any

import asyncpg
import msgspec
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from damm.catalog.verify import initial_trust, verify
from damm.errors import Code, DammError
from damm.events import codec
from damm.events import model as m
from damm.keys import nats_identity
from damm.keys.rotation import prove
from damm.keys.wireguard import SMALL_ORDER_U
from damm.projections import replay as rp
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.protocol.device_auth import sign
from damm.subjects import EVENTS_STREAM
from tests.fleet import enroll, keypair
from tests.security.conftest import (
    Fleet,
    code_of,
    last_seq,
    party_of,
    refused_by_server,
    request,
    wait_for,
)


def b64(u: int) -> str:
    return base64.b64encode(u.to_bytes(32, "little")).decode()


LOW_ORDER_KEYS = sorted(b64(u) for u in SMALL_ORDER_U)
P = 2**255 - 19
# Second spellings: p and p+1 are 0 and 1 again; the top bit set is ignored by X25519.
NON_CANONICAL_KEYS = [b64(P), b64(P + 1), b64(2**255 + 9)]


async def refused(code: Code, coro: Any) -> DammError:
    with pytest.raises(DammError) as info:
        await coro
    assert info.value.code is code, info.value.line()
    return info.value


async def raw(
    nc: NATS, subject: str, body: bytes, headers: dict[str, str] | None = None
) -> str | None:
    return code_of(await request(nc, subject, body, headers))


async def subject_count(nc: NATS, subject: str) -> int:
    info = await nc.jetstream().stream_info(EVENTS_STREAM, subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


async def events_since(nc: NATS, after: int) -> list[m.Envelope]:
    """Every event appended after ``after``; raises if any of them cannot be decoded."""
    js = nc.jetstream()
    head = await last_seq(nc)
    return [
        codec.decode((await js.get_msg(EVENTS_STREAM, seq)).data or b"", seq=seq)
        for seq in range(after + 1, head + 1)
    ]


class ReplyWatcher:
    """The admin's view of the control plane's account: every answer the control plane sends
    shows up here, on the subject it was sent to."""

    def __init__(self) -> None:
        self.answers: list[str] = []

    async def start(self, admin: NATS) -> ReplyWatcher:
        async def seen(msg: Msg) -> None:
            if msg.data.startswith(b'{"ok":'):
                self.answers.append(msg.subject)

        await admin.subscribe(">", cb=seen)
        await admin.flush()
        return self

    def elsewhere(self, gateways: tuple[str, ...] = ("gw1",)) -> list[str]:
        """Answers on anything but a mapped reply (``_R_``: the requester's own inbox in its
        account), the admin's inbox, or the reply subjects of the gateways that asked."""
        own = ("_R_.", "_INBOX_admin.", *(f"damm.gwr.{g}." for g in gateways))
        return [s for s in self.answers if not s.startswith(own)]


def check_in(
    dev: p.Enrolled, private: str, public: str, device_id: str | None = None
) -> p.DeviceCheckIn:
    req = p.DeviceCheckIn(
        device_id=device_id or dev.device_id, public_key=public, at=int(time.time())
    )
    return sign(req, "device.status", private, dev.rotation_key)


def dropped(fleet: Fleet, command: str) -> float:
    """Requests the control plane dropped unanswered, having nowhere safe to answer them."""
    registry = fleet.plane.metrics.registry
    labels = {"route": command, "code": Code.BAD_REPLY_SUBJECT.slug}
    return registry.get_sample_value("damm_requests_total", labels) or 0.0


# --- finding 1: reply-subject injection ---------------------------------------------------------


async def attack_reply_subjects_cannot_be_aimed_at_the_log(fleet: Fleet) -> None:
    priv, pub = keypair()
    victim, device = await fleet.enrolled(public_key=pub)
    assert fleet.plane.nc is not None
    nc = fleet.plane.nc
    targets = [
        f"damm.evt.device.{victim.device_id}",
        "damm.evt.ipam.default-200",
        "damm.evt.catalog.eu",
        "damm.peers.gw1",
        "damm.gwr.gw2.stolen",
        f"$JS.API.STREAM.PURGE.{EVENTS_STREAM}",
        "_INBOX_admin.stolen.1",
        "_INBOX_gw-gw2.stolen.1",
    ]
    before = await last_seq(nc)
    watcher = await ReplyWatcher().start(fleet.admin)
    _, newcomer = await fleet.newcomer()
    status = msgspec.json.encode(check_in(victim, priv, pub))
    attacks = [
        (await fleet.anonymous(), "damm.req.catalog.get", b'{"region":"eu"}', None),
        (newcomer, "damm.req.enroll", b"{}", None),
        (device, "damm.req.device.status", status, None),
        # A gateway is answered only on its own reply subjects, by the token it names.
        (fleet.gw1, "damm.req.gateway.heartbeat", b"{}", {"Damm-Reply-Token": "t"}),
    ]
    for party, subject, body, headers in attacks:
        for target in targets:
            await party.publish(subject, body, reply=target, headers=headers)
        await party.flush()
    # Every one was answered, into the attacker's own account (mapped) or, for the gateway, on
    # its own reply subject, and nowhere else.
    await wait_for(lambda: len(watcher.answers) >= len(attacks) * len(targets), 10)
    assert watcher.elsewhere() == []
    assert watcher.answers.count("damm.gwr.gw1.t") == len(targets)
    # Without a reply token a gateway's request names nowhere it may be answered: no answer.
    heard = len(watcher.answers)
    before_drops = dropped(fleet, "gateway.heartbeat")
    for target in targets:
        await fleet.gw1.publish("damm.req.gateway.heartbeat", b"{}", reply=target)
    await fleet.gw1.flush()
    await wait_for(lambda: dropped(fleet, "gateway.heartbeat") == before_drops + len(targets))
    assert watcher.answers[heard:] == []
    # Only the control plane's own decisions (a catalog publication, say) and the device's own
    # check-in landed meanwhile.
    actors = {(e.actor.kind, e.actor.id) for e in await events_since(nc, before)}
    assert {a for a in actors if a[0] != "system"} <= {("device", victim.device_id)}, actors
    # The aggregates an answer would have poisoned still take appends.
    await call(
        fleet.admin, "admin.device.revoke", p.DeviceAction(device_id=victim.device_id), p.Done
    )
    await fleet.enrolled()


async def attack_control_plane_answers_only_inboxes(fleet: Fleet) -> None:
    """Defence in depth behind the accounts: a party inside the control plane's own account
    (the admin tool) naming a log subject as its reply gets no answer written there."""
    victim, _ = await fleet.enrolled()
    assert fleet.plane.nc is not None
    subject = f"damm.evt.device.{victim.device_id}"
    before = await subject_count(fleet.plane.nc, subject)
    watcher = await ReplyWatcher().start(fleet.admin)
    await fleet.admin.publish("damm.req.catalog.get", b'{"region":"eu"}', reply=subject)
    await fleet.admin.publish("damm.req.catalog.get", b'{"region":"eu"}', reply="damm.peers.gw1")
    # a later honest request is answered: the two above were dropped, not queued
    await call(fleet.admin, "catalog.get", p.GetCatalog(region="eu"), p.SignedCatalogReply)
    assert watcher.elsewhere() == []
    assert await subject_count(fleet.plane.nc, subject) == before
    await call(
        fleet.admin, "admin.device.suspend", p.DeviceAction(device_id=victim.device_id), p.Done
    )


# --- finding 2: out-of-range values ---------------------------------------------------------


def heartbeat(token: str, **over: Any) -> bytes:
    body = {
        "gateway_id": "gw1",
        "token": token,
        "peer_count": 0,
        "active_peers": 0,
        "rx_bytes": 0,
        "tx_bytes": 0,
        "load": 0.1,
    }
    return json.dumps({**body, **over}).encode()


OUT_OF_RANGE_HEARTBEATS: list[dict[str, Any]] = [
    {"peer_count": 2**31},
    {"active_peers": -1},
    {"rx_bytes": 2**63},
    {"tx_bytes": -5},
    {"load": -1.0},
    {"load": 1e300},
    {"peer_set_revision": 2**63},
    {"extra": 1},
]


async def attack_out_of_range_numbers(fleet: Fleet) -> None:
    for over in OUT_OF_RANGE_HEARTBEATS:
        body = heartbeat(fleet.tokens["gw1_token"], **over)
        assert await raw(fleet.gw1, "damm.req.gateway.heartbeat", body) == "malformed_request"
    _, pub = keypair()
    await fleet.enrolled(public_key=pub)
    for rx in (2**63, 2**49, -1):
        usage = {
            "gateway_id": "gw1",
            "token": fleet.tokens["gw1_token"],
            "report_id": uuid.uuid4().hex,
            "entries": [{"public_key": pub, "rx_bytes": rx, "tx_bytes": 0}],
        }
        code = await raw(fleet.gw1, "damm.req.gateway.usage", json.dumps(usage).encode())
        assert code == "malformed_request", rx
    await fleet.projected()


# --- findings 3, 4, 6: headers, sizes, nesting, lax types ------------------------------------


async def attack_oversized_correlation_and_actor_headers(fleet: Fleet) -> None:
    anon = await fleet.anonymous()
    body = msgspec.json.encode(p.GetCatalog(region="eu"))
    for headers in (
        {"Damm-Correlation-Id": "c" * 1000},
        {"Damm-Correlation-Id": "not allowed!"},
        {"Damm-Actor": "a" * 65},
        {"Damm-Actor": "x y"},
    ):
        assert await raw(anon, "damm.req.catalog.get", body, headers) == "bad_header"
    # An enrollment with a 1 KB correlation id is refused whole: nothing reaches the log.
    assert fleet.plane.nc is not None
    before = await fleet.events_head()
    _, newcomer = await fleet.newcomer()
    req = p.Enroll(token=fleet.tokens["token"], public_key=keypair()[1], request_id="r-1")
    code = await raw(
        newcomer,
        "damm.req.enroll",
        msgspec.json.encode(req),
        {"Damm-Correlation-Id": "c" * 1024},
    )
    assert code == "bad_header"
    assert all(e.actor.kind == "system" for e in await events_since(fleet.plane.nc, before))


async def attack_huge_headers_and_bodies_never_reach_the_control_plane(fleet: Fleet) -> None:
    """Over the outside accounts' max_payload (24 KiB; a gateway's 272 KiB) the server drops
    the connection itself; the control plane never sees the message."""
    url = fleet.server.url
    for size_body, size_header in ((1024 * 1024 - 200, 0), (0, 600_000), (30_000, 0)):
        for subject in ("damm.req.catalog.get", "damm.req.enroll"):
            attacker = await connect(url, reconnect=False)
            headers = {"Damm-Correlation-Id": "c" * size_header} if size_header else None
            await dropped_for_its_size(attacker, subject, b"x" * size_body, headers)
    gw_attacker = await connect(
        url, user="gw-gw2", password=fleet.tokens["gw2_token"], reconnect=False
    )
    await dropped_for_its_size(gw_attacker, "damm.req.gateway.usage", b"x" * 400_000)
    # The control plane kept every connection and answers at once.
    for nc in (fleet.plane.nc, fleet.plane.service_nc, fleet.plane.follow_nc):
        assert nc is not None and nc.is_connected
    await fleet.enrolled()
    # Between the route limit (16 KiB) and the account's max_payload: refused by the handler.
    assert await raw(await fleet.anonymous(), "damm.req.catalog.get", b"x" * 20_000) == (
        "request_too_large"
    )
    _, newcomer = await fleet.newcomer()
    assert await raw(newcomer, "damm.req.enroll", b"x" * 20_000) == "request_too_large"


async def dropped_for_its_size(
    nc: NATS, subject: str, body: bytes, headers: dict[str, str] | None = None
) -> None:
    """The server closes ``nc`` for a message over its account's max_payload (no answer to
    wait for: the connection is gone)."""
    with contextlib.suppress(nats.errors.Error, TimeoutError, OSError):
        await nc.publish(subject, body, reply="_INBOX.size.1", headers=headers)
        await nc.flush(timeout=5)
    await wait_for(lambda: nc.is_closed, 5)
    assert "maximum payload" in str(nc.last_error).lower()


def nested(depth: int) -> bytes:
    return b'{"token":' + b"[" * depth + b"]" * depth + b"}"


async def attack_deep_nesting_and_unknown_fields(fleet: Fleet) -> None:
    _, newcomer = await fleet.newcomer()
    _, device = await fleet.enrolled()
    anon = await fleet.anonymous()
    for subject, party in (
        ("damm.req.enroll", newcomer),
        ("damm.req.catalog.get", anon),
        ("damm.req.device.rotate_key", device),
        ("damm.req.device.status", device),
        ("damm.req.gateway.usage", fleet.gw1),
        ("damm.req.gateway.register", fleet.gw1),
    ):
        for body in (nested(3000), b'{"x":' * 2500 + b"1" + b"}" * 2500, b"[" * 15000):
            assert await raw(party, subject, body) == "malformed_request", subject
    for command in ("admin.catalog.announce", "admin.catalog.activate"):
        assert await raw(fleet.admin, f"damm.req.{command}", b'{"anything":1}') == (
            "malformed_request"
        )
        assert await raw(fleet.admin, f"damm.req.{command}", nested(5000)) == "malformed_request"


# --- finding 5: private replies -----------------------------------------------------------------


async def attack_devices_read_no_other_replies(fleet: Fleet) -> None:
    """Another device, an anonymous client and a gateway each try to listen where a device's
    enrollment answer goes: the server refuses each subscription, and nobody hears it."""
    _, spy_device = await fleet.enrolled()
    spies = [spy_device, await fleet.anonymous(), fleet.gw2]
    seed, victim = await fleet.newcomer()
    inbox = f"_INBOX_{nats_identity.public_key(seed)}.>"
    heard: list[bytes] = []

    async def keep(msg: Msg) -> None:
        heard.append(msg.data)

    for spy in spies:
        before = party_of(spy).violations()
        subjects = (inbox, "*.*.>", ">", "damm.evt.>")
        for subject in subjects:
            await spy.subscribe(subject, cb=keep)
        await refused_by_server(spy, before, len(subjects))
    await (await fleet.anonymous()).subscribe("_INBOX.>", cb=keep)  # its own, allowed
    # A client without a key may not even ask to enroll: its reply would be readable by all.
    anon = await fleet.anonymous()
    before = party_of(anon).violations()
    await anon.publish("damm.req.enroll", b"{}", reply="_INBOX.x.y")
    await refused_by_server(anon, before)
    enrolled = await enroll(victim, fleet.tokens["token"])
    for spy in spies:
        await spy.flush()
    assert not any(enrolled.device_id.encode() in data for data in heard)


# --- findings 7, 8: keys ----------------------------------------------------------------------


async def attack_low_order_keys_refused_everywhere(fleet: Fleet) -> None:
    for key in [*LOW_ORDER_KEYS, *NON_CANONICAL_KEYS, "A" * 43 + "="]:
        _, newcomer = await fleet.newcomer()  # each a device of its own, as an attacker would
        await refused(Code.MALFORMED_KEY, enroll(newcomer, fleet.tokens["token"], public_key=key))
        await refused(
            Code.MALFORMED_KEY,
            call(
                fleet.gw2,
                "gateway.register",
                p.RegisterGateway(
                    gateway_id="gw2",
                    token=fleet.tokens["gw2_token"],
                    public_key=key,
                    listen_port=51820,
                ),
                p.Registered,
            ),
        )
    priv, pub = keypair()
    dev, device = await fleet.enrolled(public_key=pub)
    for key in LOW_ORDER_KEYS:
        rid = uuid.uuid4().hex
        await refused(
            Code.MALFORMED_KEY,
            call(
                device,
                "device.rotate_key",
                p.RotateKey(
                    device_id=dev.device_id,
                    old_public_key=pub,
                    new_public_key=key,
                    proof=prove(priv, dev.rotation_key, dev.device_id, key, rid)
                    if key != LOW_ORDER_KEYS[0]
                    else "AAAA",
                    request_id=rid,
                ),
                p.KeyRotated,
            ),
        )
    await wait_for(lambda: pub in fleet.backend.peers, 5)
    assert not set(LOW_ORDER_KEYS) & set(fleet.backend.peers)


async def attack_rotation_checks_the_proof_first(fleet: Fleet) -> None:
    priv_a, pub_a = keypair()
    a, a_nc = await fleet.enrolled(public_key=pub_a)
    _, pub_b = keypair()
    b, _ = await fleet.enrolled(public_key=pub_b)

    def rotate(device_id: str, old: str, new: str, proof: str) -> Any:
        return call(
            a_nc,
            "device.rotate_key",
            p.RotateKey(
                device_id=device_id,
                old_public_key=old,
                new_public_key=new,
                proof=proof,
                request_id=uuid.uuid4().hex,
            ),
            p.KeyRotated,
        )

    bogus = base64.b64encode(b"\0" * 32).decode()
    # new key == current key, no valid proof: once answered success with the device's details
    await refused(Code.UNAUTHORIZED, rotate(a.device_id, pub_b, pub_a, bogus))
    # A device acting on another: the callout put its identity on the connection, and only the
    # device's own identity may rotate it (checked first: it depends on the caller alone, so
    # it tells nothing about b), whatever proof it brings. Before the callout: unauthorized.
    rid = uuid.uuid4().hex
    _, new = keypair()
    proof = prove(priv_a, a.rotation_key, a.device_id, new, rid)
    await refused(Code.NOT_YOUR_DEVICE, rotate(b.device_id, pub_a, new, proof))
    await refused(Code.NOT_YOUR_DEVICE, rotate(b.device_id, pub_b, new, proof))
    # and an unknown device is not told apart from another's
    await refused(Code.NOT_YOUR_DEVICE, rotate("nosuchdevice", pub_a, new, bogus))
    # Nor may it speak for b otherwise: a check-in naming b, proved with a's own key.
    await refused(
        Code.UNAUTHORIZED,
        call(a_nc, "device.status", check_in(a, priv_a, pub_a, b.device_id), p.DeviceStanding),
    )
    standing = await call(a_nc, "device.status", check_in(a, priv_a, pub_a), p.DeviceStanding)
    assert standing.device_id == a.device_id


# --- finding 9: throttling -----------------------------------------------------------------------


async def attack_unauthenticated_floods_are_throttled(fleet: Fleet) -> None:
    """One anonymous connection past its burst is answered ``rate_limited_connection`` (the
    shipped rate, 2/s after 10); another device enrolls meanwhile."""
    anon = await fleet.anonymous()
    codes: list[str | None] = []
    for _ in range(20):
        codes.append(await raw(anon, "damm.req.catalog.get", b'{"region":"eu"}'))
    assert "rate_limited_connection" in codes
    assert codes.index("rate_limited_connection") >= 5  # an honest burst passes
    assert set(codes) <= {None, "not_found", "rate_limited_connection"}, codes
    await fleet.enrolled()


# --- gateways beyond their scope --------------------------------------------------------------


async def attack_gateway_speaks_only_for_itself(fleet: Fleet) -> None:
    gw2_token = fleet.tokens["gw2_token"]
    await refused(
        Code.UNAUTHORIZED,
        call(
            fleet.gw2,
            "gateway.heartbeat",
            p.Heartbeat(
                gateway_id="gw1",
                token=gw2_token,
                peer_count=0,
                active_peers=0,
                rx_bytes=0,
                tx_bytes=0,
                load=0.0,
            ),
            p.HeartbeatAck,
        ),
    )
    await refused(
        Code.UNAUTHORIZED,
        call(
            fleet.gw2,
            "gateway.peers",
            p.PeerSnapshotRequest(gateway_id="gw1", token=gw2_token),
            p.PeerSnapshot,
        ),
    )
    # Another gateway's identity: refused at the connection, by the callout.
    with pytest.raises(DammError) as caught:
        await connect(fleet.server.url, user="gw-gw1", password=gw2_token, reconnect=False)
    assert caught.value.code is Code.UNAUTHORIZED
    # Outside its grant the server refuses the publish itself (before the callout the
    # subject had no importer: a timeout): nothing answers, nothing is recorded.
    assert fleet.plane.nc is not None
    before = await fleet.events_head()
    party = party_of(fleet.gw2)
    for subject in ("damm.req.enroll", "damm.req.admin.token.create", "damm.evt.device.x"):
        seen = party.violations()
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await fleet.gw2.request(subject, b"{}", timeout=0.5)
        await refused_by_server(fleet.gw2, seen)
    # nor may it listen to another gateway's peer set or answers
    for subject in ("damm.peers.gw1", "damm.gwr.gw1.>"):
        seen = party.violations()
        await fleet.gw2.subscribe(subject)
        await refused_by_server(fleet.gw2, seen)
    assert all(e.actor.kind == "system" for e in await events_since(fleet.plane.nc, before))


# --- finding 10: usage dedupe ----------------------------------------------------------------


async def attack_usage_reports_deduplicated_forever_and_truthfully(fleet: Fleet) -> None:
    _, pub = keypair()
    dev, _ = await fleet.enrolled(public_key=pub)
    token = fleet.tokens["gw1_token"]

    def report(report_id: str, ledger: str = "", seq: int = 0) -> Any:
        return call(
            fleet.gw1,
            "gateway.usage",
            p.ReportUsage(
                gateway_id="gw1",
                token=token,
                report_id=report_id,
                entries=(p.UsageEntry(pub, 1000, 10),),
                ledger_id=ledger,
                report_seq=seq,
            ),
            p.Done,
        )

    first = await report("r1", "ledger1", 1)
    assert not first.duplicate and first.seq > 0
    # The same report resent after JetStream's window: its msg id is no longer remembered there
    # (a new report id stands in for that); the ledger number still is.
    again = await report("r1-after-window", "ledger1", 1)
    assert again.duplicate
    assert not (await report("r2", "ledger1", 2)).duplicate
    # unnumbered (older agents): the window's dedupe, answered truthfully
    assert not (await report("legacy-1")).duplicate
    assert (await report("legacy-1")).duplicate
    await fleet.projected()
    conn = await asyncpg.connect(fleet.plane.database_url)
    try:
        total = await conn.fetchval(
            "SELECT sum(rx_bytes) FROM damm.usage_totals WHERE device_id = $1", dev.device_id
        )
    finally:
        await conn.close()
    assert total == 3000


# --- and then the fleet still works -----------------------------------------------------------


async def test_after_the_attacks_the_fleet_works(fleet: Fleet) -> None:
    """Every attack on one stack (one stack: each costs seconds to build), then the fleet:
    enroll, revoke, catalogs, projections, replay."""
    for attack in ATTACKS:
        await attack(fleet)

    _, pub = keypair()
    dev, device = await fleet.enrolled(public_key=pub)
    await wait_for(lambda: pub in fleet.backend.peers, 5)
    await call(fleet.admin, "admin.device.revoke", p.DeviceAction(device_id=dev.device_id), p.Done)
    await wait_for(lambda: pub not in fleet.backend.peers, 5)

    for region in ("eu", "us"):
        enrolled, device = await fleet.enrolled(region=region)
        assert enrolled.catalog is not None and enrolled.catalog.region == region
        trust = initial_trust(
            region,
            enrolled.catalog.key_id,
            enrolled.catalog.public_key,
            enrolled.catalog.min_version,
        )
        signed = await fetch_catalog(device, region)
        catalog, _ = verify(signed, trust, now=int(time.time()))
        assert catalog.region == region and catalog.gateways

    await fleet.projected()
    assert fleet.plane.nc is not None
    report = await rp.verify(fleet.plane.nc, fleet.plane.database_url)
    assert report.ok, rp.describe(report)
    assert report.quarantined == ()


ATTACKS = (
    attack_reply_subjects_cannot_be_aimed_at_the_log,  # finding 1
    attack_control_plane_answers_only_inboxes,  # finding 1, defence in depth
    attack_out_of_range_numbers,  # finding 2
    attack_oversized_correlation_and_actor_headers,  # finding 3
    attack_huge_headers_and_bodies_never_reach_the_control_plane,  # finding 4
    attack_devices_read_no_other_replies,  # finding 5
    attack_deep_nesting_and_unknown_fields,  # finding 6
    attack_low_order_keys_refused_everywhere,  # finding 7
    attack_rotation_checks_the_proof_first,  # finding 8, a device acting on another
    attack_unauthenticated_floods_are_throttled,  # finding 9
    attack_gateway_speaks_only_for_itself,  # a gateway beyond its scope
    attack_usage_reports_deduplicated_forever_and_truthfully,  # finding 10
)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.__name__.removeprefix("attack_"))
async def test_each_attack_alone(fleet: Fleet, attack: Any) -> None:
    """One stack per attack, so a failure names its finding (slow: the combined test above
    runs them all on one stack)."""
    await attack(fleet)


async def fetch_catalog(device: NATS, region: str) -> bytes:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        try:
            reply = await call(
                device, "catalog.get", p.GetCatalog(region=region), p.SignedCatalogReply
            )
            return reply.signed
        except DammError as err:
            if err.code is not Code.NOT_FOUND or loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)
