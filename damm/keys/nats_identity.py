"""NATS identities: nkeys (Ed25519) made at the edge, and the JWTs NATS auth callout exchanges.

A device's identity is an nkey user seed made on the device at enrollment; only its public key
ever leaves. A WireGuard key cannot sign, so it cannot prove who is connecting. The JWTs here
are the few claims the server's auth callout reads: the server's authorization request, our
answer, and the user claims (account and permissions) inside that answer.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
from typing import Any, TypeVar

import msgspec
import nacl.exceptions
import nacl.signing
import nkeys  # type: ignore[import-untyped]

_HEADER = (
    base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"ed25519-nkey"}').rstrip(b"=").decode("ascii")
)
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(dict[str, Any]).decode


T = TypeVar("T")


class IdentityError(Exception):
    """A key, signature or token that does not verify."""


def new_user_seed() -> bytes:
    """A fresh nkey user seed (``SU…``), made from the OS's randomness."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def new_account_seed() -> bytes:
    """A fresh nkey account seed (``SA…``): the auth callout's issuer signs with it."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_ACCOUNT))


def _crc16(data: bytes) -> bytes:
    """nkeys' checksum (CRC-16/XMODEM, little-endian), in C rather than nkeys' Python loop."""
    return binascii.crc_hqx(data, 0).to_bytes(2, "little")


def public_key(seed: bytes) -> str:
    """The public nkey of ``seed``, as ``nkeys`` derives it; a device computes it at every
    connection (its inbox is named after it), so without nkeys' pure-Python checksum."""
    try:
        text = bytes(seed).strip()
        raw = base64.b32decode(text + b"=" * (-len(text) % 8))
    except (ValueError, TypeError):
        raise IdentityError("not an nkey seed: not base32") from None
    body = raw[:-2]
    if len(body) != 34 or _crc16(body) != raw[-2:] or body[0] & 0xF8 != nkeys.PREFIX_BYTE_SEED:
        raise IdentityError("not an nkey seed")
    role = ((body[0] & 0x07) << 5) | ((body[1] & 0xF8) >> 3)
    public = bytes([role]) + bytes(nacl.signing.SigningKey(body[2:]).verify_key)
    return base64.b32encode(public + _crc16(public)).decode("ascii").rstrip("=")


def as_user_key(public: str) -> str:
    """The same Ed25519 key as an nkey *user* key (``U…``)."""
    raw = base64.b32decode(public)[1:-2]
    body = bytes([nkeys.PREFIX_BYTE_USER]) + raw
    return base64.b32encode(body + bytes(nkeys.crc16_checksum(body))).decode("ascii")


def is_user_key(value: str) -> bool:
    return _valid_public(value, "U")


def _valid_public(value: str, role: str) -> bool:
    if len(value) != 56 or not value.startswith(role):
        return False
    try:
        raw = base64.b32decode(value)
    except ValueError:
        return False
    return bytes(raw[-2:]) == bytes(nkeys.crc16_checksum(raw[:-2]))


@functools.lru_cache(maxsize=4096)
def _verify_key(public: str) -> nacl.signing.VerifyKey | None:
    """A public key parsed once (devices reconnect under the same key); None if not an nkey."""
    if len(public) != 56 or public[0] not in "UNA":
        return None
    try:
        raw = base64.b32decode(public)
    except ValueError:
        return None
    if raw[-2:] != _crc16(raw[:-2]):
        return None
    return nacl.signing.VerifyKey(bytes(raw[1:-2]))


def verify(public: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``data`` was made by the holder of ``public``'s seed."""
    key = _verify_key(public)
    if key is None:
        return False
    try:
        key.verify(data, signature)
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True


def verify_nonce(public: str, nonce: str, signature_b64: str) -> bool:
    """The proof a client sends at CONNECT: its key's signature over the server's nonce."""
    try:
        padded = signature_b64 + "=" * (-len(signature_b64) % 4)
        signature = base64.urlsafe_b64decode(padded.replace("+", "-").replace("/", "_"))
    except ValueError:
        return False
    return verify(public, nonce.encode(), signature)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """An nkey ready to sign: deriving it from the seed costs more than signing, so once."""

    def __init__(self, seed: bytes) -> None:
        self.public = public_key(seed)
        self._key = nacl.signing.SigningKey(bytes(nkeys.decode_seed(bytearray(seed))[1]))

    def sign(self, data: bytes) -> bytes:
        return bytes(self._key.sign(data).signature)


def encode_jwt(claims: dict[str, Any], signer: Signer | bytes) -> str:
    """Sign ``claims`` as NATS does: ``jti`` is the hash of the claims, ``iss`` the signer."""
    key = signer if isinstance(signer, Signer) else Signer(signer)
    body = {**claims, "iss": key.public, "jti": ""}
    body["jti"] = base64.b32encode(hashlib.sha256(_encode(body)).digest()).decode().rstrip("=")
    payload = _b64(_encode(body))
    signature = key.sign(f"{_HEADER}.{payload}".encode("ascii"))
    return f"{_HEADER}.{payload}.{_b64(signature)}"


def unverified_claims(token: str, claims_type: type[T]) -> T:
    """A JWT's claims, typed, its signature not checked. Only for the server's authorization
    requests: they arrive on a subject only the server and DAMM's own users may publish to, and
    are signed by a per-server key nobody vouches for, so checking the signature against the
    token's own ``iss`` would prove nothing about who sent it (and cost an Ed25519 verify per
    connection). The client's own proof, its signature over the nonce, is checked."""
    parts = token.split(".")
    if len(parts) != 3:
        raise IdentityError("not a JWT")
    try:
        return msgspec.json.decode(_unb64(parts[1]), type=claims_type)
    except (ValueError, msgspec.DecodeError):
        raise IdentityError("not a JWT") from None


def decode_jwt(token: str) -> dict[str, Any]:
    """The claims of a JWT whose signature verifies against its own ``iss`` key."""
    parts = token.split(".")
    if len(parts) != 3:
        raise IdentityError("not a JWT")
    try:
        claims = _decode(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (ValueError, msgspec.DecodeError):
        raise IdentityError("not a JWT") from None
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or not verify(
        issuer, f"{parts[0]}.{parts[1]}".encode("ascii"), signature
    ):
        raise IdentityError("JWT signature does not verify")
    return claims
