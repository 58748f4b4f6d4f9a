"""The bounds themselves, without servers: keys, request types, the fold's skip, reply subjects."""

from __future__ import annotations

import base64

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base

from damm.control.state import DecisionState
from damm.domain.ipam import Overlay
from damm.errors import Code, DammError
from damm.keys.wireguard import SMALL_ORDER_U, validate_key_spelling, validate_public_key
from damm.protocol import messages as p
from damm.protocol.router import REPLY_SUBJECT

P = 2**255 - 19


def b64(u: int) -> str:
    return base64.b64encode(u.to_bytes(32, "little")).decode()


@pytest.mark.parametrize("u", [*sorted(SMALL_ORDER_U), P, P + 1, P + 2, 2**255 + 9, 2**256 - 1])
def test_low_order_and_non_canonical_keys_are_refused(u: int) -> None:
    with pytest.raises(DammError) as info:
        validate_public_key(b64(u))
    assert info.value.code is Code.MALFORMED_KEY
    validate_key_spelling(b64(u))  # still 32 bytes: fine as a private key's spelling


def test_the_small_order_list_is_what_libsodium_refuses() -> None:
    for u in SMALL_ORDER_U:
        with pytest.raises(RuntimeError):
            crypto_scalarmult(b"\x01" * 32, u.to_bytes(32, "little"))


@given(st.binary(min_size=32, max_size=32))
def test_every_real_public_key_is_accepted(private: bytes) -> None:
    key = base64.b64encode(crypto_scalarmult_base(private)).decode()
    assert validate_public_key(key) == key


@pytest.mark.parametrize(
    ("cls", "body"),
    [
        (p.Heartbeat, {"peer_count": 2**31}),
        (p.Heartbeat, {"rx_bytes": 2**63}),
        (p.Heartbeat, {"load": -0.5}),
        (p.Enroll, {"request_id": "a\r\nNats-Msg-Id: x"}),
        (p.Enroll, {"token": "t" * 129}),
        (p.DefineTier, {"byte_limit": 2**63}),
        (p.DefineTier, {"regions": ["eu"] * 65}),
        (p.DefineTier, {"status": "paused"}),
        (p.CreateToken, {"uses": 0}),
        (p.ReportUsage, {"entries": [{"public_key": "k", "rx_bytes": 1, "tx_bytes": 1, "x": 1}]}),
        (p.Empty, {"anything": 1}),
    ],
)
def test_request_types_refuse_out_of_bounds(
    cls: type[msgspec.Struct], body: dict[str, object]
) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(body, cls)


def test_every_request_type_forbids_unknown_fields_and_has_no_untyped_field() -> None:
    requests = [
        p.DefineTier, p.CreateToken, p.RevokeToken, p.AddGateway, p.SetFrontDoor,
        p.SetGatewayStatus, p.DefineEgress, p.DeviceAction, p.ResetUsage, p.ExplainPlacement,
        p.Enroll, p.RotateKey, p.GetCatalog, p.RegisterGateway, p.Heartbeat, p.UsageEntry,
        p.ReportUsage, p.PeerSnapshotRequest, p.Empty, p.DeviceCheckIn, p.ReportFailover,
    ]  # fmt: skip
    for cls in requests:
        assert cls.__struct_config__.forbid_unknown_fields, cls
        for f in msgspec.structs.fields(cls):
            assert "Any" not in repr(f.type) and "object" not in repr(f.type), (cls, f.name)


def test_fold_skips_an_undecodable_message_but_takes_its_sequence() -> None:
    state = DecisionState(Overlay.parse("10.44.0.0/24"))
    state.skip("damm.evt.device.x", 7)
    assert state.seq_of("damm.evt.device.x") == 7
    assert state.applied_seq == 7
    state.skip("damm.evt.device.x", 3)  # a redelivery never moves it back
    assert state.seq_of("damm.evt.device.x") == 7


@pytest.mark.parametrize(
    ("reply", "ok"),
    [
        ("_R_.VTNnxm.PpHgiC", True),
        ("_INBOX.U1bpQlTFq7OvnguCF7YIff.1", True),
        ("_INBOX_admin.U1bpQlTFq7OvnguCF7YIff.1", True),
        ("damm.evt.device.x", False),
        ("damm.peers.gw1", False),
        ("$JS.API.STREAM.PURGE.DAMM_EVENTS", False),
        ("_INBOX.>", False),
        ("_R_", False),
    ],
)
def test_answers_go_only_to_inboxes(reply: str, ok: bool) -> None:
    assert bool(REPLY_SUBJECT.fullmatch(reply)) is ok
