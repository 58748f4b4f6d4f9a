"""Random bodies, headers and reply subjects at every request subject, as every party.

Whatever arrives, the answer is a catalogued code other than ``internal``, nothing an outside
party sends changes the log, and every answer goes to a mapped reply in the requester's own
account (or the admin's own inbox), never onto another subject of the control plane's account.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from damm.control.process import ControlPlane
from damm.protocol import messages as p
from damm.stack.nats_server import NatsServer
from tests.fleet import enroll, setup_fleet
from tests.security.conftest import CATALOGUED, as_gateway, code_of, last_seq, wait_for
from tests.security.test_hostile_clients import ReplyWatcher, events_since

DEVICE = {
    "damm.req.enroll": p.Enroll,
    "damm.req.device.rotate_key": p.RotateKey,
    "damm.req.catalog.get": p.GetCatalog,
    "damm.req.device.status": p.DeviceCheckIn,
    "damm.req.device.failover": p.ReportFailover,
}
GATEWAY = {
    "damm.req.gateway.register": p.RegisterGateway,
    "damm.req.gateway.heartbeat": p.Heartbeat,
    "damm.req.gateway.usage": p.ReportUsage,
    "damm.req.gateway.peers": p.PeerSnapshotRequest,
}
ADMIN = {
    "damm.req.admin.token.revoke": p.RevokeToken,
    "damm.req.admin.device.revoke": p.DeviceAction,
    "damm.req.admin.usage.reset": p.ResetUsage,
    "damm.req.admin.explain_placement": p.ExplainPlacement,
    "damm.req.admin.catalog.announce": p.Empty,
}

_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00"),
    max_size=300,
)
_json: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)
_numbers = st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, 1.5])
_values = st.one_of(_numbers, _text, st.none(), st.lists(_text, max_size=3), _json)


def shaped(request_type: type[msgspec.Struct]) -> st.SearchStrategy[bytes]:
    """An object with the request's own field names and hostile values: reaches the handler."""
    fields = {name: _values for name in request_type.__struct_fields__}
    return st.fixed_dictionaries({}, optional=fields).map(lambda d: json.dumps(d).encode())


def bodies(request_type: type[msgspec.Struct]) -> st.SearchStrategy[bytes]:
    depth = st.integers(min_value=100, max_value=4000)
    return st.one_of(
        st.binary(max_size=400),
        _json.map(lambda v: json.dumps(v).encode()),
        shaped(request_type),
        depth.map(lambda n: b"[" * n + b"]" * n),
        depth.map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    )


_header_value = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=2000
)
headers = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {}, optional={"Damm-Correlation-Id": _header_value, "Damm-Actor": _header_value}
    ),
)
_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12)
aimed_replies = st.one_of(
    st.sampled_from(
        [
            "damm.evt.device.x",
            "damm.evt.ipam.default-10",
            "damm.evt.catalog.eu",
            "damm.evt.token.t",
            "damm.peers.gw1",
            "damm.tel.heartbeat.gw1",
            "$JS.API.STREAM.PURGE.DAMM_EVENTS",
            "_INBOX_admin.x.y",
        ]
    ),
    st.lists(_token, min_size=1, max_size=4).map(".".join),
)


@dataclass
class Parties:
    plane: ControlPlane
    device: NATS
    gateway: NATS
    admin: NATS
    watcher: ReplyWatcher
    events_head: int
    sent_outside: int = 0


@pytest.fixture
async def parties(
    control: ControlPlane,
    admin_nc: NATS,
    gateway_nc: NATS,
    device_nc: NATS,
    nats_server: NatsServer,
) -> AsyncIterator[Parties]:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    gw1 = await as_gateway(nats_server, "gw1", fleet["gw1_token"])
    assert control.nc is not None
    watcher = await ReplyWatcher().start(admin_nc)
    parties = Parties(control, device_nc, gw1, admin_nc, watcher, await last_seq(control.nc))
    yield parties
    # After every example: each outside request was answered into its requester's own account,
    # no answer went anywhere else, the log did not move, and honest requests still work.
    await wait_for(
        lambda: sum(s.startswith("_R_.") for s in watcher.answers) >= parties.sent_outside, 15
    )
    assert watcher.elsewhere() == []
    # nothing an outside party sent reached the log: only the control plane's own decisions
    # (a catalog publication) and the admin's may have landed meanwhile
    kinds = {e.actor.kind for e in await events_since(control.nc, parties.events_head)}
    assert kinds <= {"system", "admin"}, kinds
    enrolled = await enroll(device_nc, fleet["token"])
    assert enrolled.device_id
    await gw1.close()


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_random_requests_from_every_party(parties: Parties, data: st.DataObject) -> None:
    party = data.draw(st.sampled_from(["device", "gateway", "admin"]))
    routes = {"device": DEVICE, "gateway": GATEWAY, "admin": ADMIN}[party]
    nc = {"device": parties.device, "gateway": parties.gateway, "admin": parties.admin}[party]
    subject = data.draw(st.sampled_from(sorted(routes)))
    body = data.draw(bodies(routes[subject]))
    hdrs = data.draw(headers)
    if data.draw(st.booleans()):
        reply = data.draw(aimed_replies)
        await nc.publish(subject, body, reply=reply, headers=hdrs)
        await nc.flush()
        if party != "admin":
            parties.sent_outside += 1
        return
    try:
        answer = await nc.request(subject, body, timeout=5, headers=hdrs)
    except nats.errors.TimeoutError:
        pytest.fail(f"no answer from {subject}")
    code = code_of(answer)
    assert code is None or (code in CATALOGUED and code != "internal"), (subject, code)
    if party != "admin":
        parties.sent_outside += 1
        # nothing an outsider guesses succeeds, except reading a public catalog
        assert code is not None or subject == "damm.req.catalog.get", (subject, body)
    assert parties.watcher.elsewhere() == []
