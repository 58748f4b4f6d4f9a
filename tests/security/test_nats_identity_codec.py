"""The identity primitives the callout runs per connection, against the reference libraries.

The callout signs twice and verifies once per connection, and reads or writes nkeys (base32)
each time; these are its own fast paths, so each is held to what nkeys, PyNaCl and the standard
library say, including what they refuse.
"""

from __future__ import annotations

import base64
import hashlib

import nacl.signing
import nkeys
import pytest
from hypothesis import given
from hypothesis import strategies as st

from damm.keys import nats_identity

NONCE = "bm9uY2UtZnJvbS10aGUtc2VydmVy"


def _seed() -> bytes:
    return nats_identity.new_user_seed()


@given(st.binary(max_size=80))
def test_base32_is_the_standard_alphabet_without_padding(data: bytes) -> None:
    expected = base64.b32encode(data).decode().rstrip("=")
    assert nats_identity.b32encode(data) == expected


@given(st.binary(min_size=35, max_size=35))
def test_a_public_key_decodes_as_the_standard_library_does(raw: bytes) -> None:
    text = base64.b32encode(raw).decode()
    assert len(text) == 56
    assert nats_identity.b32decode_key(text) == raw


@pytest.mark.parametrize(
    "text",
    [
        "a" * 56,  # the alphabet is upper case only
        "A" * 55,
        "A" * 57,
        "A" * 55 + "=",
        "A" * 55 + "1",
        "A" * 55 + "_",
        " " + "A" * 55,
        "-" + "A" * 55,
        "A" * 27 + "_" + "A" * 28,  # int() would take underscores between digits
    ],
)
def test_a_public_key_that_is_not_56_base32_characters_is_refused(text: str) -> None:
    assert nats_identity.b32decode_key(text) is None


@given(st.binary(min_size=1, max_size=300))
def test_the_signer_signs_as_nkeys_does(data: bytes) -> None:
    seed = nats_identity.new_account_seed()
    expected = bytes(nkeys.from_seed(bytearray(seed)).sign(data))
    signer = nats_identity.Signer(seed)
    assert signer.sign(data) == expected
    assert signer.public == bytes(nkeys.from_seed(bytearray(seed)).public_key).decode()


def _nonce_signature(seed: bytes, message: bytes) -> bytes:
    return bytes(nkeys.from_seed(bytearray(seed)).sign(message))


def test_a_nonce_signature_must_be_exactly_one_signature() -> None:
    """Signature and message travel apart: a longer 'signature' whose tail, followed by the nonce,
    the key did sign must not pass for a signature over the nonce alone."""
    seed = _seed()
    key = nats_identity.public_key(seed)
    good = _nonce_signature(seed, NONCE.encode())
    assert nats_identity.verify(key, NONCE.encode(), good)
    other = _nonce_signature(seed, b"x" + NONCE.encode())
    assert not nats_identity.verify(key, NONCE.encode(), other + b"x")
    assert not nats_identity.verify(key, NONCE.encode(), good[:63])
    assert not nats_identity.verify(key, NONCE.encode(), good + b"\0")
    assert not nats_identity.verify(key, NONCE.encode(), b"")
    stretched = base64.b64encode(other + b"x").decode()
    assert not nats_identity.verify_nonce(key, NONCE, stretched)


def test_a_signature_by_another_key_or_over_other_data_is_refused() -> None:
    seed, other = _seed(), _seed()
    key = nats_identity.public_key(seed)
    good = _nonce_signature(seed, NONCE.encode())
    assert not nats_identity.verify(key, NONCE.encode() + b".", good)
    assert not nats_identity.verify(key, NONCE.encode(), _nonce_signature(other, NONCE.encode()))
    flipped = bytes([good[0] ^ 1]) + good[1:]
    assert not nats_identity.verify(key, NONCE.encode(), flipped)
    for bad_key in ("S" + key[1:], key.lower(), key[:-1], "U" * 56):
        assert not nats_identity.verify(bad_key, NONCE.encode(), good)


def test_a_jwt_is_signed_by_its_issuer_and_identified_by_the_hash_of_its_claims() -> None:
    seed = nats_identity.new_account_seed()
    signer = nats_identity.Signer(seed)
    token = nats_identity.encode_jwt({"sub": "UCONN", "aud": "NSERVER", "nats": {"a": [1]}}, signer)
    claims = nats_identity.decode_jwt(token)
    assert claims["iss"] == signer.public
    header, payload, signature = token.split(".")
    assert base64.urlsafe_b64decode(header + "==") == b'{"typ":"JWT","alg":"ed25519-nkey"}'
    unsigned = {**claims, "jti": ""}
    digest = hashlib.sha256(nats_identity._encode(unsigned)).digest()
    assert claims["jti"] == base64.b32encode(digest).decode().rstrip("=")
    key = nacl.signing.VerifyKey(base64.b32decode(signer.public)[1:-2])
    key.verify(f"{header}.{payload}".encode(), base64.urlsafe_b64decode(signature + "=="))
    assert "=" not in token
    assert nats_identity.encode_jwt({"sub": "UCONN"}, seed) == nats_identity.encode_jwt(
        {"sub": "UCONN"}, signer
    )
