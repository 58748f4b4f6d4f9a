"""The auth callout's decision and the throttle, as values: no server."""

from __future__ import annotations

import base64

import msgspec
import nkeys
import pytest
from hypothesis import given
from hypothesis import strategies as st

from damm.control import callout
from damm.control.callout import (
    ANON_PUBLISH,
    AuthRequest,
    ClientInfo,
    ConnectOptions,
    ServerId,
    _RequestClaims,
    decide,
    response,
)
from damm.control.state import DecisionState, DeviceState, GatewayState
from damm.domain.ipam import Overlay
from damm.domain.throttle import Buckets, Rate
from damm.errors import Code, DammError
from damm.keys import nats_identity
from damm.keys.tokens import gateway_password_hash

NONCE = "n0nce-from-the-server"


def _signed(seed: bytes, nonce: str = NONCE) -> str:
    return base64.b64encode(nkeys.from_seed(bytearray(seed)).sign(nonce.encode())).decode()


def _request(**opts: str) -> AuthRequest:
    return AuthRequest(
        server_id=ServerId(id="NSERVER"),
        user_nkey="UCONN",
        client_info=ClientInfo(host="198.51.100.7", id=9, nonce=NONCE),
        connect_opts=ConnectOptions(**opts),
    )


def _state_with_device(identity: str, status: str = "active") -> DecisionState:
    state = DecisionState(Overlay.parse("10.44.0.0/24"))
    state.devices["d1"] = DeviceState(
        device_id="d1", public_key="pk", token_id="t1", tier="gold", gateway_id="gw1",
        front_door_id="fd1", egress_pool_id=None, address="10.44.0.10/24", index=10,
        status=status, identity_key=identity,  # type: ignore[arg-type]
    )  # fmt: skip
    state.identities[identity] = "d1"
    return state


def test_a_key_that_signs_the_nonce_and_is_enrolled_is_that_device() -> None:
    seed = nats_identity.new_user_seed()
    key = nats_identity.public_key(seed)
    grant = decide(_request(nkey=key, sig=_signed(seed)), _state_with_device(key))
    assert (grant.account, grant.name) == ("DEV", f"device:{key}")
    assert grant.subscribe == (f"_INBOX_{key}.>",)


def test_a_key_not_enrolled_may_only_enroll_and_fetch_catalogs() -> None:
    seed = nats_identity.new_user_seed()
    key = nats_identity.public_key(seed)
    state = DecisionState(Overlay.parse("10.44.0.0/24"))
    grant = decide(_request(nkey=key, sig=_signed(seed)), state)
    assert grant.account == "ANON"
    assert set(grant.publish) == {"damm.req.enroll", "damm.req.catalog.>"}
    assert grant.subscribe == (f"_INBOX_{key}.>",)


def test_a_revoked_device_is_back_to_enrolling() -> None:
    seed = nats_identity.new_user_seed()
    key = nats_identity.public_key(seed)
    grant = decide(_request(nkey=key, sig=_signed(seed)), _state_with_device(key, "revoked"))
    assert grant.account == "ANON"


@pytest.mark.parametrize("how", ["other key", "other nonce", "no signature", "garbage"])
def test_a_key_that_does_not_sign_the_nonce_is_refused(how: str) -> None:
    seed, other = nats_identity.new_user_seed(), nats_identity.new_user_seed()
    key = nats_identity.public_key(seed)
    sig = {
        "other key": _signed(other),
        "other nonce": _signed(seed, "another"),
        "no signature": "",
        "garbage": "%%%",
    }[how]
    with pytest.raises(DammError) as caught:
        decide(_request(nkey=key, sig=sig), _state_with_device(key))
    assert caught.value.code is Code.IDENTITY_REFUSED


def test_no_credentials_reads_only_catalogs_on_the_shared_inbox() -> None:
    grant = decide(_request(), DecisionState(Overlay.parse("10.44.0.0/24")))
    assert (grant.account, grant.publish, grant.subscribe) == ("ANON", ANON_PUBLISH, ("_INBOX.>",))


def test_an_unknown_user_or_gateway_is_refused() -> None:
    state = DecisionState(Overlay.parse("10.44.0.0/24"))
    for opts in ({"user": "gw-nope", "password": "x"}, {"user": "control", "password": "x"}):
        with pytest.raises(DammError) as caught:
            decide(_request(**opts), state)
        assert caught.value.code is Code.UNAUTHORIZED


def test_the_response_is_signed_by_the_issuer_and_names_the_account() -> None:
    issuer = nats_identity.new_account_seed()
    grant = decide(_request(), DecisionState(Overlay.parse("10.44.0.0/24")))
    outer = nats_identity.decode_jwt(response(_request(), grant, issuer, 1_800_000_000).decode())
    assert outer["iss"] == nats_identity.public_key(issuer)
    assert outer["aud"] == "NSERVER"
    user = nats_identity.decode_jwt(outer["nats"]["jwt"])
    assert (user["aud"], user["sub"], user["name"]) == ("ANON", "UCONN", "anon:-")
    refused = response(_request(), DammError(Code.UNAUTHORIZED, "x"), issuer, 1_800_000_000)
    assert nats_identity.decode_jwt(refused.decode())["nats"]["error"].startswith("unauthorized")


@given(
    st.lists(st.floats(min_value=0, max_value=0.5, allow_nan=False), min_size=1, max_size=300),
    st.floats(min_value=0.5, max_value=50),
    st.integers(min_value=1, max_value=30),
)
def test_a_bucket_never_grants_more_than_its_burst_plus_its_rate(
    gaps: list[float], rate: float, burst: int
) -> None:
    buckets = Buckets(Rate(rate, float(burst)))
    now, granted = 0.0, 0
    for gap in gaps:
        now += gap
        granted += buckets.take("k", now)
    assert granted <= burst + rate * now + 1e-9


def test_buckets_stay_bounded() -> None:
    buckets = Buckets(Rate(1, 1), capacity=100)
    for n in range(1000):
        assert buckets.take(f"source-{n}", 0.0)
    assert len(buckets) == 100


def test_identities_travel_in_state_snapshots() -> None:
    from damm.control import snapshots

    seed = nats_identity.new_user_seed()
    key = nats_identity.public_key(seed)
    state = _state_with_device(key)
    fresh = DecisionState(Overlay.parse("10.44.0.0/24"))
    snapshots.restore(snapshots.encode(state, 1), fresh)
    assert fresh.identities == {key: "d1"}
    grant = decide(_request(nkey=key, sig=_signed(seed)), fresh)
    assert grant.account == "DEV"


def test_a_server_request_is_read_typed_and_garbage_is_refused() -> None:
    seed = nats_identity.new_user_seed()
    key = nats_identity.public_key(seed)
    claims = {"nats": {"server_id": {"id": "NSERVER"}, "user_nkey": "UCONN",
                       "client_info": {"nonce": NONCE},
                       "connect_opts": {"nkey": key, "sig": _signed(seed)}}}  # fmt: skip
    token = nats_identity.encode_jwt(claims, nats_identity.new_account_seed())
    req = nats_identity.unverified_claims(token, _RequestClaims).nats
    assert req.connect_opts.nkey == key
    assert decide(req, DecisionState(Overlay.parse("10.44.0.0/24"))).account == "ANON"
    for garbage in ("", "a.b", "x.!!!.y", token.split(".")[0] + ".e30.sig"):
        with pytest.raises((nats_identity.IdentityError, msgspec.ValidationError)):
            nats_identity.unverified_claims(garbage, _RequestClaims)


def test_a_signature_checks_against_its_own_key_only() -> None:
    seed, other = nats_identity.new_user_seed(), nats_identity.new_user_seed()
    key = nats_identity.public_key(seed)
    assert nats_identity.verify_nonce(key, NONCE, _signed(seed))
    assert not nats_identity.verify_nonce(key, NONCE, _signed(other))
    assert not nats_identity.verify_nonce(key, "another nonce", _signed(seed))
    assert not nats_identity.verify_nonce(key[:-1] + ("A" if key[-1] != "A" else "B"), NONCE,
                                          _signed(seed))  # fmt: skip
    assert not nats_identity.verify_nonce("S" + key[1:], NONCE, _signed(seed))


def test_a_gateway_token_is_bcrypt_checked_once_per_hash_the_log_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reconnect storm (every gateway after a NATS restart) costs one bcrypt per gateway per
    process, not one per connection; a new hash in the log (a new token) is checked again."""
    state = DecisionState(Overlay.parse("10.44.0.0/24"))
    state.gateways["gw1"] = GatewayState("gw1", "eu", "th", nats_password_bcrypt=_HASH_A)
    checks: list[str] = []
    real = callout._bcrypt_ok

    def counted(password: str, hashed: str) -> bool:
        checks.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(callout, "_bcrypt_ok", counted)
    passwords = callout.PasswordCache()
    gw = _request(user="gw-gw1", password="token-a")
    for _ in range(3):
        assert decide(gw, state, passwords).account == "GW"
    assert checks == [_HASH_A]
    assert not callout.needs_bcrypt(gw, state, passwords)
    with pytest.raises(DammError) as caught:
        decide(_request(user="gw-gw1", password="token-b"), state, passwords)
    assert caught.value.code is Code.UNAUTHORIZED
    state.gateways["gw1"].nats_password_bcrypt = _HASH_B  # the token was replaced
    assert callout.needs_bcrypt(gw, state, passwords)
    with pytest.raises(DammError):
        decide(gw, state, passwords)
    assert decide(_request(user="gw-gw1", password="token-b"), state, passwords).account == "GW"
    del state.gateways["gw1"]
    with pytest.raises(DammError):
        decide(_request(user="gw-gw1", password="token-b"), state, passwords)
    assert len(checks) == 4


_HASH_A = gateway_password_hash("token-a")
_HASH_B = gateway_password_hash("token-b")


@given(st.binary(min_size=32, max_size=32), st.sampled_from(["user", "account"]))
def test_public_keys_are_what_nkeys_derives(raw: bytes, role: str) -> None:
    prefix = nkeys.PREFIX_BYTE_USER if role == "user" else nkeys.PREFIX_BYTE_ACCOUNT
    seed = bytes(nkeys.encode_seed(raw, prefix))
    expected = bytes(nkeys.from_seed(bytearray(seed)).public_key).decode()
    assert nats_identity.public_key(seed) == expected
    flipped = seed[:10] + (b"B" if seed[10:11] != b"B" else b"C") + seed[11:]
    with pytest.raises(nats_identity.IdentityError):
        nats_identity.public_key(flipped)
