"""Random bodies, headers and reply subjects at every request subject, as every party, on the
shipped configuration (the auth callout decides each connection).

Whatever a party may send is answered with a catalogued code other than ``internal``; what its
grant does not cover the server refuses itself (a permissions violation, no answer). Nothing an
outside party sends changes the log, and every answer goes to the requester's own inbox (a
mapped reply in its account, a gateway's own ``damm.gwr.<id>.``, the admin's inbox), never
onto another subject.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from damm.protocol import messages as p
from tests.security.conftest import (
    CATALOGUED,
    Fleet,
    code_of,
    last_seq,
    party_of,
    refused_by_server,
    request,
    wait_for,
)
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
ADMIN_ONLY = {
    "damm.req.admin.token.revoke": p.RevokeToken,
    "damm.req.admin.device.revoke": p.DeviceAction,
    "damm.req.admin.usage.reset": p.ResetUsage,
    "damm.req.admin.explain_placement": p.ExplainPlacement,
    "damm.req.admin.catalog.announce": p.Empty,
}
ROUTES: dict[str, type[msgspec.Struct]] = {**DEVICE, **GATEWAY, **ADMIN_ONLY}
# What each party's grant lets it publish (damm.control.callout); the admin may send anything.
GRANTS: dict[str, tuple[str, ...]] = {
    "anonymous": ("damm.req.catalog.",),
    "newcomer": ("damm.req.enroll", "damm.req.catalog."),
    "device": ("damm.req.enroll", "damm.req.catalog.", "damm.req.device."),
    "gateway": ("damm.req.gateway.",),
    "admin": ("damm.req.",),
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
    fleet: Fleet
    device: NATS
    watcher: ReplyWatcher
    events_head: int
    answers_due: int = 0  # answers owed to outside parties (mapped replies, a gateway's own)

    async def connection(self, party: str) -> NATS:
        """Anonymous clients and newcomers connect afresh each time, as many devices would (one
        connection past its burst would be answered only ``rate_limited_connection``)."""
        if party == "anonymous":
            return await self.fleet.anonymous()
        if party == "newcomer":
            return (await self.fleet.newcomer())[1]
        return {"device": self.device, "gateway": self.fleet.gw1, "admin": self.fleet.admin}[party]


@pytest.fixture
async def parties(fleet: Fleet) -> AsyncIterator[Parties]:
    _, device = await fleet.enrolled()
    assert fleet.plane.nc is not None
    watcher = await ReplyWatcher().start(fleet.admin)
    parties = Parties(fleet, device, watcher, await last_seq(fleet.plane.nc))
    yield parties
    # After every example: each outside request was answered in its requester's own inbox, no
    # answer went anywhere else, the log did not move, and honest requests still work.
    own = ("_R_.", "damm.gwr.gw1.")
    await wait_for(
        lambda: sum(s.startswith(own) for s in watcher.answers) >= parties.answers_due, 15
    )
    assert watcher.elsewhere() == []
    # nothing an outside party sent reached the log: only the control plane's own decisions
    # (a catalog publication) and the admin's may have landed meanwhile
    kinds = {e.actor.kind for e in await events_since(fleet.plane.nc, parties.events_head)}
    assert kinds <= {"system", "admin"}, kinds
    enrolled, _ = await fleet.enrolled()
    assert enrolled.device_id


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_random_requests_from_every_party(parties: Parties, data: st.DataObject) -> None:
    party = data.draw(st.sampled_from(sorted(GRANTS)))
    nc = await parties.connection(party)
    allowed = sorted(s for s in ROUTES if s.startswith(GRANTS[party]))
    beyond = sorted(set(ROUTES) - set(allowed))
    # mostly within the grant, where the control plane answers; a quarter beyond it
    within = not beyond or data.draw(st.integers(0, 3)) > 0
    subject = data.draw(st.sampled_from(allowed if within else beyond))
    body = data.draw(bodies(ROUTES[subject]))
    hdrs = data.draw(headers)
    outside = party != "admin"
    if not subject.startswith(GRANTS[party]):
        # Outside its grant: the server refuses the publish; nothing reaches the control plane.
        seen = party_of(nc).violations()
        await nc.publish(subject, body, reply=data.draw(aimed_replies), headers=hdrs)
        await refused_by_server(nc, seen)
        event(f"{party}: refused by the server")
        return
    if data.draw(st.booleans()):
        reply = data.draw(aimed_replies)
        if party == "gateway" and data.draw(st.booleans()):
            # its own reply token: answered on damm.gwr.gw1.<token>, whatever reply it named
            hdrs = {**(hdrs or {}), "Damm-Reply-Token": data.draw(_token)}
            parties.answers_due += 1
        elif outside and party != "gateway":
            parties.answers_due += 1  # the server maps the reply into the requester's account
        await nc.publish(subject, body, reply=reply, headers=hdrs)
        await nc.flush()
        event(f"{party}: aimed reply")
        return
    try:
        answer = await request(nc, subject, body, headers=hdrs)
    except nats.errors.TimeoutError:
        pytest.fail(f"no answer from {subject}")
    code = code_of(answer)
    event(f"{party}: {code or 'ok'}")
    assert code is None or (code in CATALOGUED and code != "internal"), (subject, code)
    if outside:
        parties.answers_due += 1
        # nothing an outsider guesses succeeds, except reading a public catalog
        assert code is not None or subject == "damm.req.catalog.get", (subject, body)
    assert parties.watcher.elsewhere() == []
