"""Every attack of issue 10 against the real stack, as an anonymous device, as a gateway beyond
its scope and as a device acting on another device; then the same fleet still works."""

from __future__ import annotations

import asyncio
import base64
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
from damm.keys.rotation import prove
from damm.keys.wireguard import SMALL_ORDER_U
from damm.projections import replay as rp
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.subjects import EVENTS_STREAM
from tests.fleet import enroll, keypair
from tests.security.conftest import Fleet, as_gateway, code_of, last_seq, wait_for


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
    reply = await nc.request(subject, body, timeout=5, headers=headers)
    return code_of(reply)


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

    def elsewhere(self) -> list[str]:
        return [s for s in self.answers if not s.startswith(("_R_.", "_INBOX_admin."))]


# --- finding 1: reply-subject injection ---------------------------------------------------------


async def attack_reply_subjects_cannot_be_aimed_at_the_log(fleet: Fleet) -> None:
    victim = await enroll(fleet.device, fleet.tokens["token"])
    assert fleet.plane.nc is not None
    nc = fleet.plane.nc
    targets = [
        f"damm.evt.device.{victim.device_id}",
        "damm.evt.ipam.default-200",
        "damm.evt.catalog.eu",
        "damm.peers.gw1",
        f"$JS.API.STREAM.PURGE.{EVENTS_STREAM}",
        "_INBOX_admin.stolen.1",
        "_INBOX_gw-gw2.stolen.1",
    ]
    before = await last_seq(nc)
    watcher = await ReplyWatcher().start(fleet.admin)
    attacks = [
        (fleet.device, "damm.req.catalog.get", b'{"region":"eu"}'),
        (fleet.device, "damm.req.enroll", b"{}"),
        (fleet.gw1, "damm.req.gateway.heartbeat", b"{}"),
    ]
    for party, subject, body in attacks:
        for target in targets:
            await party.publish(subject, body, reply=target)
        await party.flush()
    # Every one was answered, into the attacker's own account (mapped), nowhere else.
    await wait_for(lambda: len(watcher.answers) >= len(attacks) * len(targets), 10)
    assert watcher.elsewhere() == []
    # Only the control plane's own decisions landed meanwhile (a catalog publication, say).
    assert all(e.actor.kind == "system" for e in await events_since(nc, before))
    # The aggregates an answer would have poisoned still take appends.
    await call(
        fleet.admin, "admin.device.revoke", p.DeviceAction(device_id=victim.device_id), p.Done
    )
    await enroll(fleet.device, fleet.tokens["token"])


async def attack_control_plane_answers_only_inboxes(fleet: Fleet) -> None:
    """Defence in depth behind the accounts: a party inside the control plane's own account
    (the admin tool) naming a log subject as its reply gets no answer written there."""
    victim = await enroll(fleet.device, fleet.tokens["token"])
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
    await enroll(fleet.device, fleet.tokens["token"], public_key=pub)
    for rx in (2**63, 2**49, -1):
        body = {
            "gateway_id": "gw1",
            "token": fleet.tokens["gw1_token"],
            "report_id": uuid.uuid4().hex,
            "entries": [{"public_key": pub, "rx_bytes": rx, "tx_bytes": 0}],
        }
        code = await raw(fleet.gw1, "damm.req.gateway.usage", json.dumps(body).encode())
        assert code == "malformed_request", rx
    await fleet.projected()


# --- findings 3, 4, 6: headers, sizes, nesting, lax types ------------------------------------


async def attack_oversized_correlation_and_actor_headers(fleet: Fleet) -> None:
    body = msgspec.json.encode(p.GetCatalog(region="eu"))
    for headers in (
        {"Damm-Correlation-Id": "c" * 1000},
        {"Damm-Correlation-Id": "not allowed!"},
        {"Damm-Actor": "a" * 65},
        {"Damm-Actor": "x y"},
    ):
        assert await raw(fleet.device, "damm.req.catalog.get", body, headers) == "bad_header"
    # An enrollment with a 1 KB correlation id is refused whole: nothing reaches the log.
    assert fleet.plane.nc is not None
    before = await fleet.events_head()
    req = p.Enroll(token=fleet.tokens["token"], public_key=keypair()[1], request_id="r-1")
    code = await raw(
        fleet.device,
        "damm.req.enroll",
        msgspec.json.encode(req),
        {"Damm-Correlation-Id": "c" * 1024},
    )
    assert code == "bad_header"
    assert all(e.actor.kind == "system" for e in await events_since(fleet.plane.nc, before))


async def attack_huge_headers_and_bodies_never_reach_the_control_plane(fleet: Fleet) -> None:
    url = fleet.server.url
    for size_body, size_header in ((1024 * 1024 - 200, 0), (0, 600_000), (30_000, 0)):
        attacker = await connect(url, reconnect=False)
        headers = {"Damm-Correlation-Id": "c" * size_header} if size_header else None
        with pytest.raises((nats.errors.Error, TimeoutError, OSError)):
            await attacker.request("damm.req.enroll", b"x" * size_body, timeout=2, headers=headers)
        await wait_for(lambda a=attacker: a.is_closed, 5)  # type: ignore[misc]
        assert "maximum payload" in str(attacker.last_error).lower()
    gw_attacker = await as_gateway(fleet.server, "gw2", fleet.tokens["gw2_token"])
    with pytest.raises((nats.errors.Error, TimeoutError, OSError)):
        await gw_attacker.request("damm.req.gateway.usage", b"x" * 400_000, timeout=2)
    await wait_for(lambda: gw_attacker.is_closed, 5)
    # The control plane kept every connection and answers at once.
    for nc in (fleet.plane.nc, fleet.plane.service_nc, fleet.plane.follow_nc):
        assert nc is not None and nc.is_connected
    await enroll(fleet.device, fleet.tokens["token"])
    # Between the route limit (16 KiB) and the account's max_payload: refused by the handler.
    assert await raw(fleet.device, "damm.req.enroll", b"x" * 20_000) == "request_too_large"


def nested(depth: int) -> bytes:
    return b'{"token":' + b"[" * depth + b"]" * depth + b"}"


async def attack_deep_nesting_and_unknown_fields(fleet: Fleet) -> None:
    for subject, party in (
        ("damm.req.enroll", fleet.device),
        ("damm.req.catalog.get", fleet.device),
        ("damm.req.device.rotate_key", fleet.device),
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


# --- findings 7, 8: keys ----------------------------------------------------------------------


async def attack_low_order_keys_refused_everywhere(fleet: Fleet) -> None:
    for key in [*LOW_ORDER_KEYS, *NON_CANONICAL_KEYS, "A" * 43 + "="]:
        await refused(
            Code.MALFORMED_KEY, enroll(fleet.device, fleet.tokens["token"], public_key=key)
        )
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
    dev = await enroll(fleet.device, fleet.tokens["token"], public_key=pub)
    for key in LOW_ORDER_KEYS:
        rid = uuid.uuid4().hex
        await refused(
            Code.MALFORMED_KEY,
            call(
                fleet.device,
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
    a = await enroll(fleet.device, fleet.tokens["token"], public_key=pub_a)
    _, pub_b = keypair()
    b = await enroll(fleet.device, fleet.tokens["token"], public_key=pub_b)

    def rotate(device_id: str, old: str, new: str, proof: str) -> Any:
        return call(
            fleet.device,
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
    # a device acting on another: its own valid-looking proof does not hold for b
    rid = uuid.uuid4().hex
    _, new = keypair()
    proof = prove(priv_a, a.rotation_key, a.device_id, new, rid)
    await refused(Code.UNAUTHORIZED, rotate(b.device_id, pub_a, new, proof))
    await refused(Code.UNAUTHORIZED, rotate(b.device_id, pub_b, new, proof))
    # and an unknown device is not told apart from a wrong proof
    await refused(Code.UNAUTHORIZED, rotate("nosuchdevice", pub_a, new, bogus))


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
    # outside its imports and permissions: nothing answers, nothing is recorded
    assert fleet.plane.nc is not None
    before = await fleet.events_head()
    for subject in ("damm.req.enroll", "damm.req.admin.token.create", "damm.evt.device.x"):
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await fleet.gw2.request(subject, b"{}", timeout=0.5)
    assert all(e.actor.kind == "system" for e in await events_since(fleet.plane.nc, before))


# --- finding 10: usage dedupe ----------------------------------------------------------------


async def attack_usage_reports_deduplicated_forever_and_truthfully(fleet: Fleet) -> None:
    _, pub = keypair()
    dev = await enroll(fleet.device, fleet.tokens["token"], public_key=pub)
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
    dev = await enroll(fleet.device, fleet.tokens["token"], public_key=pub)
    await wait_for(lambda: pub in fleet.backend.peers, 5)
    await call(fleet.admin, "admin.device.revoke", p.DeviceAction(device_id=dev.device_id), p.Done)
    await wait_for(lambda: pub not in fleet.backend.peers, 5)

    for region in ("eu", "us"):
        enrolled = await enroll(fleet.device, fleet.tokens["token"], region=region)
        assert enrolled.catalog is not None and enrolled.catalog.region == region
        trust = initial_trust(
            region,
            enrolled.catalog.key_id,
            enrolled.catalog.public_key,
            enrolled.catalog.min_version,
        )
        signed = await fetch_catalog(fleet.device, region)
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
    attack_deep_nesting_and_unknown_fields,  # finding 6
    attack_low_order_keys_refused_everywhere,  # finding 7
    attack_rotation_checks_the_proof_first,  # finding 8
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
