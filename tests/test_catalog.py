"""Signed catalogs: canonical bytes, TUF-style verification, failover choice, signing key files."""

from __future__ import annotations

import base64
import os
import pickle
import random
import stat
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damm.catalog.canonical import canonical_encode, decode, key_id_for
from damm.catalog.document import (
    Catalog,
    CatalogFrontDoor,
    CatalogGateway,
    KeyAnnouncement,
    SignedCatalog,
    decode_signed,
    encode_signed,
)
from damm.catalog.signing import CatalogSigner, build_catalog
from damm.catalog.verify import TrustState, choose_failover, initial_trust, verify
from damm.errors import Code, DammError

NOW = 1_700_000_000
TTL = 3600
SIGNER = CatalogSigner.generate()
OTHER = CatalogSigner.generate()


def wg_key(seed: int) -> str:
    return base64.b64encode(seed.to_bytes(32, "big")).decode()


def front_door(fd_id: str, endpoint: str, priority: int) -> CatalogFrontDoor:
    return CatalogFrontDoor(id=fd_id, endpoint=endpoint, transport="udp", priority=priority)


def gateway(gw_id: str, *doors: CatalogFrontDoor, region: str = "eu") -> CatalogGateway:
    return CatalogGateway(
        id=gw_id,
        region=region,
        public_key=wg_key(int.from_bytes(gw_id.encode(), "big")),
        front_doors=doors,
        egress_countries=("NL", "DE"),
    )


GW1 = gateway(
    "gw-1",
    front_door("fd-c", "203.0.113.9:51820", 30),
    front_door("fd-a", "203.0.113.7:51820", 10),
    front_door("fd-b", "[2001:db8::7]:51820", 20),
)
GW2 = gateway("gw-2", front_door("fd-only", "gw2.example.net:443", 10))


def make_catalog(
    *,
    version: int = 1,
    now: int = NOW,
    region: str = "eu",
    gateways: tuple[CatalogGateway, ...] = (GW2, GW1),
    next_keys: tuple[KeyAnnouncement, ...] = (),
) -> Catalog:
    return build_catalog(
        region, gateways, version=version, now=now, ttl_seconds=TTL, next_keys=next_keys
    )


def trust_for(signer: CatalogSigner = SIGNER, *, min_version: int = 0) -> TrustState:
    return initial_trust("eu", signer.key_id, signer.public_key_b64, min_version)


def code_of(excinfo: pytest.ExceptionInfo[DammError]) -> Code:
    return excinfo.value.code


# -- strategies -----------------------------------------------------------------------------

idents = st.from_regex(r"[a-z0-9][a-z0-9-]{0,11}", fullmatch=True)
ports = st.integers(1, 65535)
ipv4_endpoints = st.builds(
    lambda a, b, p: f"198.51.{a}.{b}:{p}", st.integers(0, 255), st.integers(0, 255), ports
)
wg_keys = st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode())


@st.composite
def gateways(draw: st.DrawFn, gw_id: str) -> CatalogGateway:
    ids = draw(st.lists(idents, min_size=1, max_size=4, unique=True))
    doors = tuple(
        CatalogFrontDoor(
            id=fd_id,
            endpoint=draw(ipv4_endpoints),
            transport="udp",
            priority=draw(st.integers(0, 65535)),
        )
        for fd_id in ids
    )
    countries = draw(st.lists(st.sampled_from(["DE", "NL", "US", "FR", "JP"]), max_size=3))
    return CatalogGateway(
        id=gw_id,
        region=draw(idents),
        public_key=draw(wg_keys),
        front_doors=doors,
        egress_countries=tuple(countries),
    )


@st.composite
def catalogs(draw: st.DrawFn) -> Catalog:
    ids = draw(st.lists(idents, max_size=6, unique=True))
    gws = [draw(gateways(gw_id)) for gw_id in ids]
    announced = draw(st.lists(st.sampled_from([OTHER, SIGNER]), max_size=2, unique=True))
    return build_catalog(
        draw(idents),
        gws,
        version=draw(st.integers(0, 2**40)),
        now=draw(st.integers(0, 2**40)),
        ttl_seconds=draw(st.integers(1, 10**6)),
        next_keys=[s.announcement(draw(st.integers(0, 2**40))) for s in announced],
    )


# -- canonical encoding ---------------------------------------------------------------------


@given(catalogs())
def test_canonical_encoding_round_trips(catalog: Catalog) -> None:
    payload = canonical_encode(catalog)
    assert decode(payload) == catalog
    assert canonical_encode(decode(payload)) == payload


@given(catalogs(), st.randoms(use_true_random=False))
def test_encoding_does_not_depend_on_input_order(catalog: Catalog, rnd: random.Random) -> None:
    shuffled_gateways = []
    for gw in catalog.gateways:
        doors = list(gw.front_doors)
        rnd.shuffle(doors)
        countries = list(gw.egress_countries)
        rnd.shuffle(countries)
        shuffled_gateways.append(
            msgspec.structs.replace(gw, front_doors=tuple(doors), egress_countries=tuple(countries))
        )
    rnd.shuffle(shuffled_gateways)
    keys = list(catalog.next_keys)
    rnd.shuffle(keys)
    shuffled = msgspec.structs.replace(
        catalog, gateways=tuple(shuffled_gateways), next_keys=tuple(keys)
    )
    assert canonical_encode(shuffled) == canonical_encode(catalog)


def test_build_catalog_orders_front_doors_by_priority_then_id() -> None:
    catalog = make_catalog()
    assert [g.id for g in catalog.gateways] == ["gw-1", "gw-2"]
    assert [fd.id for fd in catalog.gateways[0].front_doors] == ["fd-a", "fd-b", "fd-c"]
    assert catalog.gateways[0].egress_countries == ("DE", "NL")
    assert catalog.expires_at == NOW + TTL


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        msgspec.msgpack.encode({"region": "eu"}),
        msgspec.msgpack.encode({"region": "eu", "version": -1, "issued_at": 0, "expires_at": 1}),
        msgspec.msgpack.encode({"region": "eu", "version": 1.5, "issued_at": 0, "expires_at": 1}),
        msgspec.msgpack.encode(
            {"region": "eu", "version": 1, "issued_at": 0, "expires_at": 1, "surprise": True}
        ),
        msgspec.msgpack.encode({"region": "eu", "version": 1, "issued_at": 5, "expires_at": 1}),
    ],
)
def test_decode_rejects_unknown_shapes(payload: bytes) -> None:
    with pytest.raises(DammError) as excinfo:
        decode(payload)
    assert code_of(excinfo) is Code.MALFORMED_REQUEST


def test_decode_rejects_duplicate_gateways_and_mislabelled_announcements() -> None:
    dup = msgspec.structs.replace(make_catalog(), gateways=(GW1, GW1))
    with pytest.raises(DammError) as excinfo:
        decode(msgspec.msgpack.encode(dup))
    assert code_of(excinfo) is Code.MALFORMED_REQUEST

    lying = KeyAnnouncement(key_id=SIGNER.key_id, public_key=OTHER.public_key_b64)
    with pytest.raises(DammError) as excinfo:
        decode(canonical_encode(make_catalog(next_keys=(lying,))))
    assert code_of(excinfo) is Code.MALFORMED_REQUEST


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"\x93\x01\x02\x03", b"{}", os.urandom(64)])
def test_decode_signed_rejects_garbage(garbage: bytes) -> None:
    with pytest.raises(DammError) as excinfo:
        decode_signed(garbage)
    assert code_of(excinfo) is Code.MALFORMED_REQUEST


def test_signed_envelope_round_trips() -> None:
    signed = SIGNER.sign(make_catalog())
    assert decode_signed(encode_signed(signed)) == signed


# -- verification: what must fail -----------------------------------------------------------

SIGNED = SIGNER.sign(make_catalog(version=7))
WIRE = encode_signed(SIGNED)


def test_verify_accepts_a_good_catalog_from_bytes_and_struct() -> None:
    for signed in (SIGNED, WIRE):
        catalog, trust = verify(signed, trust_for(), now=NOW + 10)
        assert catalog == make_catalog(version=7)
        assert trust.min_version == 7


@settings(max_examples=300)
@given(st.data())
def test_any_single_byte_change_to_payload_or_signature_fails(data: st.DataObject) -> None:
    field = data.draw(st.sampled_from(["payload", "signature"]))
    original: bytes = getattr(SIGNED, field)
    index = data.draw(st.integers(0, len(original) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = bytearray(original)
    tampered[index] ^= flip
    signed = msgspec.structs.replace(SIGNED, **{field: bytes(tampered)})
    with pytest.raises(DammError) as excinfo:
        verify(signed, trust_for(), now=NOW)
    assert code_of(excinfo) in {Code.CATALOG_BAD_SIGNATURE, Code.MALFORMED_REQUEST}


@settings(max_examples=300)
@given(st.integers(0, len(WIRE) - 1), st.integers(1, 255))
def test_any_single_byte_change_to_the_wire_bytes_fails(index: int, flip: int) -> None:
    tampered = bytearray(WIRE)
    tampered[index] ^= flip
    with pytest.raises(DammError) as excinfo:
        verify(bytes(tampered), trust_for(), now=NOW)
    assert code_of(excinfo) in {
        Code.CATALOG_BAD_SIGNATURE,
        Code.MALFORMED_REQUEST,
        Code.CATALOG_UNKNOWN_KEY,
    }


FIELD_CHANGES = {
    "version": lambda c: msgspec.structs.replace(c, version=c.version + 1),
    "expires_at": lambda c: msgspec.structs.replace(c, expires_at=c.expires_at + 86400 * 365),
    "issued_at": lambda c: msgspec.structs.replace(c, issued_at=c.issued_at - 1),
    "region": lambda c: msgspec.structs.replace(c, region="us"),
    "drop gateway": lambda c: msgspec.structs.replace(c, gateways=c.gateways[1:]),
    "endpoint": lambda c: msgspec.structs.replace(
        c,
        gateways=(
            msgspec.structs.replace(
                c.gateways[0],
                front_doors=(
                    msgspec.structs.replace(c.gateways[0].front_doors[0], endpoint="6.6.6.6:53"),
                    *c.gateways[0].front_doors[1:],
                ),
            ),
            *c.gateways[1:],
        ),
    ),
    "gateway key": lambda c: msgspec.structs.replace(
        c,
        gateways=(msgspec.structs.replace(c.gateways[0], public_key=wg_key(666)), *c.gateways[1:]),
    ),
    "announce attacker key": lambda c: msgspec.structs.replace(
        c, next_keys=(OTHER.announcement(),)
    ),
}


@pytest.mark.parametrize("change", sorted(FIELD_CHANGES))
def test_any_field_change_without_re_signing_fails(change: str) -> None:
    changed = FIELD_CHANGES[change](decode(SIGNED.payload))
    payload = canonical_encode(changed)
    assert payload != SIGNED.payload
    with pytest.raises(DammError) as excinfo:
        verify(msgspec.structs.replace(SIGNED, payload=payload), trust_for(), now=NOW)
    assert code_of(excinfo) is Code.CATALOG_BAD_SIGNATURE


def test_forged_signature_under_the_pinned_key_id_fails() -> None:
    forged = OTHER.sign(make_catalog(version=99))
    as_pinned = msgspec.structs.replace(forged, key_id=SIGNER.key_id)
    random_sig = msgspec.structs.replace(SIGNED, signature=os.urandom(64))
    for signed in (as_pinned, random_sig):
        with pytest.raises(DammError) as excinfo:
            verify(signed, trust_for(), now=NOW)
        assert code_of(excinfo) is Code.CATALOG_BAD_SIGNATURE


def test_unknown_key_fails() -> None:
    with pytest.raises(DammError) as excinfo:
        verify(OTHER.sign(make_catalog()), trust_for(), now=NOW)
    assert code_of(excinfo) is Code.CATALOG_UNKNOWN_KEY


def test_expired_catalog_is_stale_but_clock_skew_is_allowed() -> None:
    expires = NOW + TTL
    verify(SIGNED, trust_for(), now=expires + 60)  # within the default 60 s skew
    with pytest.raises(DammError) as excinfo:
        verify(SIGNED, trust_for(), now=expires + 61)
    assert code_of(excinfo) is Code.CATALOG_STALE
    verify(SIGNED, trust_for(), now=expires + 300, skew_seconds=300)
    with pytest.raises(DammError) as excinfo:
        verify(SIGNED, trust_for(), now=expires + 1, skew_seconds=0)
    assert code_of(excinfo) is Code.CATALOG_STALE


def test_catalog_issued_in_the_future_is_stale() -> None:
    verify(SIGNED, trust_for(), now=NOW - 60)
    with pytest.raises(DammError) as excinfo:
        verify(SIGNED, trust_for(), now=NOW - 3600)
    assert code_of(excinfo) is Code.CATALOG_STALE


def test_replayed_older_catalog_is_a_rollback() -> None:
    _, trust = verify(SIGNER.sign(make_catalog(version=8)), trust_for(), now=NOW)
    assert trust.min_version == 8
    with pytest.raises(DammError) as excinfo:
        verify(SIGNED, trust, now=NOW)  # version 7, validly signed, still fresh
    assert code_of(excinfo) is Code.CATALOG_ROLLBACK
    _, again = verify(SIGNER.sign(make_catalog(version=8)), trust, now=NOW)  # equal is fine
    assert again.min_version == 8


def test_catalog_for_another_region_is_refused() -> None:
    other_region = SIGNER.sign(make_catalog(region="us"))
    with pytest.raises(DammError) as excinfo:
        verify(other_region, trust_for(), now=NOW)
    assert code_of(excinfo) is Code.INVALID_ARGUMENT


def test_verify_never_mutates_the_input_trust() -> None:
    trust = trust_for()
    snapshot = msgspec.json.encode(trust)
    verify(SIGNER.sign(make_catalog(version=3, next_keys=(OTHER.announcement(),))), trust, now=NOW)
    assert msgspec.json.encode(trust) == snapshot


def test_trust_state_survives_a_round_trip_through_the_state_file() -> None:
    trust = trust_for(min_version=4)
    assert msgspec.json.decode(msgspec.json.encode(trust), type=TrustState) == trust


def test_initial_trust_refuses_a_key_id_that_does_not_match_the_key() -> None:
    with pytest.raises(DammError) as excinfo:
        initial_trust("eu", OTHER.key_id, SIGNER.public_key_b64)
    assert code_of(excinfo) is Code.INVALID_ARGUMENT


def test_initial_trust_pins_announced_keys_checked_like_the_signing_key() -> None:
    trust = initial_trust("eu", SIGNER.key_id, SIGNER.public_key_b64, 0, (OTHER.announcement(),))
    assert set(trust.pinned) == {SIGNER.key_id, OTHER.key_id}
    forged = KeyAnnouncement(key_id=SIGNER.key_id, public_key=OTHER.public_key_b64)
    with pytest.raises(DammError) as excinfo:
        initial_trust("eu", SIGNER.key_id, SIGNER.public_key_b64, 0, (forged,))
    assert code_of(excinfo) is Code.INVALID_ARGUMENT


# -- key rotation ---------------------------------------------------------------------------


def test_rotation_needs_the_announcement_signed_by_the_old_key() -> None:
    key2 = CatalogSigner.generate()
    by_key2 = key2.sign(make_catalog(version=11))

    with pytest.raises(DammError) as excinfo:
        verify(by_key2, trust_for(), now=NOW)  # never saw the announcement
    assert code_of(excinfo) is Code.CATALOG_UNKNOWN_KEY

    announcing = SIGNER.sign(make_catalog(version=10, next_keys=(key2.announcement(NOW + 60),)))
    _, trust = verify(announcing, trust_for(), now=NOW)
    assert trust.pinned[key2.key_id] == key2.public_key_b64
    assert SIGNER.key_id in trust.pinned

    catalog, trust = verify(by_key2, trust, now=NOW)
    assert catalog.version == 11 and trust.min_version == 11


def test_announcement_by_an_unpinned_key_pins_nothing() -> None:
    key2 = CatalogSigner.generate()
    attacker = OTHER.sign(make_catalog(version=50, next_keys=(key2.announcement(),)))
    with pytest.raises(DammError):
        verify(attacker, trust_for(), now=NOW)


# -- failover -------------------------------------------------------------------------------


def test_failover_moves_to_the_next_front_door_by_priority_and_wraps() -> None:
    catalog = make_catalog()
    assert choose_failover(catalog, "gw-1", "203.0.113.7:51820").id == "fd-b"
    assert choose_failover(catalog, "gw-1", "[2001:db8::7]:51820").id == "fd-c"
    assert choose_failover(catalog, "gw-1", "203.0.113.9:51820").id == "fd-a"  # wraps around


def test_failover_from_an_unlisted_endpoint_starts_at_the_most_preferred() -> None:
    assert choose_failover(make_catalog(), "gw-1", "192.0.2.1:51820").id == "fd-a"


def test_failover_skips_doors_sharing_the_current_endpoint_and_unknown_transports() -> None:
    gw = gateway(
        "gw-3",
        front_door("fd-a", "192.0.2.1:51820", 10),
        front_door("fd-a2", "192.0.2.1:51820", 15),
        CatalogFrontDoor(id="fd-q", endpoint="192.0.2.3:443", transport="quic", priority=20),
        front_door("fd-b", "192.0.2.2:51820", 30),
    )
    catalog = Catalog(region="eu", version=1, issued_at=0, expires_at=1, gateways=(gw,))
    assert choose_failover(catalog, "gw-3", "192.0.2.1:51820").id == "fd-b"


def test_failover_errors() -> None:
    catalog = make_catalog()
    with pytest.raises(DammError) as excinfo:
        choose_failover(catalog, "gw-missing", "203.0.113.7:51820")
    assert code_of(excinfo) is Code.CATALOG_NO_GATEWAY
    with pytest.raises(DammError) as excinfo:
        choose_failover(catalog, "gw-2", "gw2.example.net:443")
    assert code_of(excinfo) is Code.NO_ALTERNATE_FRONT_DOOR


# -- signing --------------------------------------------------------------------------------


def test_signer_refuses_a_catalog_clients_would_reject() -> None:
    bad = gateway("gw-bad", front_door("fd-x", "evil.example\nPostUp = id:1", 10))
    with pytest.raises(DammError) as excinfo:
        SIGNER.sign(make_catalog(gateways=(bad,)))
    assert code_of(excinfo) is Code.INVALID_ARGUMENT
    with pytest.raises(DammError):
        SIGNER.sign(msgspec.structs.replace(make_catalog(), version=-1))


def test_key_id_is_a_sha256_prefix_of_the_public_key() -> None:
    public = base64.b64decode(SIGNER.public_key_b64)
    assert SIGNER.key_id == key_id_for(public) and len(SIGNER.key_id) == 16


def test_private_key_never_shows_in_repr_str_or_pickle() -> None:
    signer = CatalogSigner.from_seed(b"\x07" * 32)
    seed_forms = {b"\x07" * 32, base64.b64encode(b"\x07" * 32), (b"\x07" * 32).hex().encode()}
    for text in (repr(signer), str(signer), f"{signer}", repr([signer])):
        assert signer.key_id in text
        assert not any(form.decode("latin-1") in text for form in seed_forms)
    with pytest.raises(TypeError):
        pickle.dumps(signer)


def test_key_file_is_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "catalog.key"
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        first = CatalogSigner.load_or_create(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 32
    assert CatalogSigner.load_or_create(path).key_id == first.key_id
    assert [p.name for p in tmp_path.iterdir()] == ["catalog.key"]  # no temporary left behind


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "catalog.key"
    CatalogSigner.load_or_create(path)
    path.chmod(0o644)
    with pytest.raises(DammError) as excinfo:
        CatalogSigner.load_or_create(path)
    assert code_of(excinfo) is Code.INVALID_ARGUMENT
    assert "0644" in str(excinfo.value) and "chmod 600" in str(excinfo.value)


def test_truncated_or_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    fd = os.open(short, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"\x01" * 31)
    os.close(fd)
    with pytest.raises(DammError, match="31 bytes"):
        CatalogSigner.load_or_create(short)

    real = tmp_path / "real.key"
    CatalogSigner.load_or_create(real)
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(DammError, match="symlink"):
        CatalogSigner.load_or_create(link)

    with pytest.raises(DammError) as excinfo:
        CatalogSigner.load_or_create(tmp_path / "missing-dir" / "catalog.key")
    assert code_of(excinfo) is Code.INVALID_ARGUMENT


def test_signed_catalog_repr_is_short() -> None:
    assert len(repr(SIGNED)) < 120
    assert isinstance(SIGNED, SignedCatalog)
