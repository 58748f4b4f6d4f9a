"""Peer values, key validation and the diff: the decision the reconciler is built on."""

from __future__ import annotations

import base64
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.public import PrivateKey

from damm.errors import Code, DammError
from damm.keys.wireguard import hex_to_key, key_to_hex, validate_key_spelling, validate_public_key
from damm.wireguard.peer_diff import (
    Peer,
    PeerDiff,
    apply,
    diff,
    normalise_allowed_ips,
    peers_from,
)

KEYS = [base64.b64encode(bytes([i]) * 32).decode() for i in range(2, 10)]
CIDRS = ["10.44.0.10/32", "10.44.0.11/32", "0.0.0.0/0", "::/0", "fd00::/64", "10.0.0.0/8"]

peers_st = st.builds(
    Peer,
    public_key=st.sampled_from(KEYS),
    allowed_ips=st.lists(st.sampled_from(CIDRS), unique=True, max_size=3).map(
        lambda ips: tuple(sorted(ips))
    ),
    persistent_keepalive=st.sampled_from([0, 25]),
)
peer_sets = st.lists(peers_st, max_size=8).map(lambda ps: {p.public_key: p for p in ps})


@given(peer_sets, peer_sets)
def test_apply_diff_reaches_desired(actual: dict[str, Peer], desired: dict[str, Peer]) -> None:
    assert apply(actual, diff(actual, desired)) == desired


@given(peer_sets)
def test_diff_of_equal_sets_is_empty(peers: dict[str, Peer]) -> None:
    change = diff(peers, dict(peers))
    assert change.is_empty
    assert len(change) == 0


@given(peer_sets, peer_sets)
def test_diff_is_minimal(actual: dict[str, Peer], desired: dict[str, Peer]) -> None:
    change = diff(actual, desired)
    added = {p.public_key for p in change.add}
    updated = {p.public_key for p in change.update}
    removed = set(change.remove)
    assert added == desired.keys() - actual.keys()
    assert removed == actual.keys() - desired.keys()
    assert updated == {k for k in actual.keys() & desired.keys() if actual[k] != desired[k]}
    # a kept key is never removed and re-added (that would reset its session and counters)
    assert not (added & removed) and not (updated & removed)
    assert len(change) == len(added) + len(removed) + len(updated)


def test_diff_is_deterministic_and_sorted() -> None:
    desired = {k: Peer(k, ("10.44.0.10/32",)) for k in reversed(KEYS)}
    change = diff({}, desired)
    assert [p.public_key for p in change.add] == sorted(KEYS)
    assert change.summary() == "add=8 remove=0 update=0"


def test_keepalive_change_is_an_update() -> None:
    old = Peer(KEYS[0], ("10.44.0.10/32",), 0)
    new = Peer(KEYS[0], ("10.44.0.10/32",), 25)
    assert diff({old.public_key: old}, {new.public_key: new}) == PeerDiff(update=(new,))


def test_validate_public_key_accepts_real_keys() -> None:
    key = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
    assert validate_public_key(key) == key
    assert hex_to_key(key_to_hex(key)) == key
    assert len(key_to_hex(key)) == 64


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not base64 at all!!",
        base64.b64encode(b"x" * 31).decode(),  # wrong length
        base64.b64encode(b"x" * 33).decode(),
        base64.b64encode(b"x" * 32).decode().rstrip("="),  # missing padding
        base64.b64encode(b"x" * 32).decode()[:42] + "j=",  # non-canonical trailing bits
        base64.urlsafe_b64encode(b"\xff" * 32).decode(),  # urlsafe alphabet
    ],
)
def test_validate_public_key_rejects(bad: str) -> None:
    with pytest.raises(DammError) as info:
        validate_public_key(bad)
    assert info.value.code is Code.MALFORMED_KEY


def test_hex_to_key_rejects_wrong_length() -> None:
    with pytest.raises(DammError) as info:
        hex_to_key("00" * 31)
    assert info.value.code is Code.MALFORMED_KEY


def test_build_normalises_allowed_ips() -> None:
    peer = Peer.build(KEYS[1], ["10.44.0.10", "10.0.0.5/8", "10.44.0.10/32", "FD00::1/64"])
    assert peer.allowed_ips == ("10.0.0.0/8", "10.44.0.10/32", "fd00::/64")
    assert normalise_allowed_ips([]) == ()


def test_build_rejects_bad_input() -> None:
    with pytest.raises(DammError) as info:
        Peer.build(KEYS[1], ["10.44.0.300/32"])
    assert info.value.code is Code.INVALID_ARGUMENT
    with pytest.raises(DammError):
        Peer.build(KEYS[1], [], persistent_keepalive=70000)
    with pytest.raises(DammError) as info:
        Peer.build("nope", [])
    assert info.value.code is Code.MALFORMED_KEY


@given(
    st.one_of(
        st.tuples(*[st.integers(0, 300)] * 4, st.sampled_from(["/32", "/31", ""])).map(
            lambda t: ".".join(map(str, t[:4])) + t[4]
        ),
        st.text(alphabet="0123456789./ x", max_size=20),
        st.sampled_from(["010.1.1.1/32", "1.1.1.1/032", "1.1.1.01/32", "\u0661.1.1.1/32"]),
    )
)
def test_the_fast_path_normalises_exactly_like_ipaddress(cidr: str) -> None:
    try:
        expected: tuple[str, ...] | None = (str(ipaddress.ip_network(cidr.strip(), strict=False)),)
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(DammError):
            normalise_allowed_ips([cidr])
    else:
        assert normalise_allowed_ips([cidr]) == expected


@given(st.binary(min_size=30, max_size=34), st.text(alphabet="AEQw=+/x", max_size=3))
def test_key_fast_path_accepts_exactly_the_canonical_spellings(raw: bytes, tail: str) -> None:
    for key in (base64.b64encode(raw).decode(), base64.b64encode(raw).decode()[:-1] + tail):
        try:
            canonical = len(base64.b64decode(key, validate=True)) == 32 and (
                base64.b64encode(base64.b64decode(key)).decode() == key
            )
        except ValueError:
            canonical = False
        if canonical:
            assert validate_key_spelling(key) == key
        else:
            with pytest.raises(DammError):
                validate_key_spelling(key)


entry_lists = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from(KEYS),
            st.binary(min_size=31, max_size=33).map(lambda b: base64.b64encode(b).decode()),
        ),
        st.lists(
            st.one_of(
                st.sampled_from(CIDRS),
                st.tuples(*[st.integers(0, 300)] * 4).map(lambda t: ".".join(map(str, t)) + "/32"),
            ),
            min_size=1,
            max_size=2,
        ).map(tuple),
    ),
    max_size=6,
)


@given(entry_lists)
def test_peers_from_a_whole_set_equals_building_each(
    entries: list[tuple[str, tuple[str, ...]]],
) -> None:
    try:
        expected: dict[str, Peer] | None = {k: Peer.build(k, ips) for k, ips in entries}
    except DammError:
        expected = None
    if expected is None:
        with pytest.raises(DammError):
            peers_from(entries)
    else:
        assert peers_from(entries) == expected
