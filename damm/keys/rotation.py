"""Proof of possession for key rotation without a second device key.

WireGuard keys are X25519, which cannot sign. A device proves it holds its old private key by
MACing the rotation request with the Diffie-Hellman secret between that key and the control
plane's rotation key; only the holder of the old private key (or the control plane) can compute it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base

from damm.keys.wireguard import key_bytes
from damm.private_files import load_or_create_seed, private_dir


def _message(device_id: str, new_public_key: str, request_id: str) -> bytes:
    return f"damm-rotate-v1|{device_id}|{new_public_key}|{request_id}".encode()


_decode_key = key_bytes


def _request_message(command: str, body: bytes) -> bytes:
    return b"damm-device-v1|" + command.encode() + b"|" + body


def prove_request(private_key_b64: str, rotation_public_b64: str, command: str, body: bytes) -> str:
    """A device's signature-equivalent over a request it sends under its own identity.

    ``body`` is the request encoded with an empty proof field: the MAC binds every field, so a
    proof made by one device cannot be reused for another device or another request.
    """
    shared = crypto_scalarmult(_decode_key(private_key_b64), _decode_key(rotation_public_b64))
    mac = hmac.new(shared, _request_message(command, body), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def prove(
    private_key_b64: str,
    rotation_public_b64: str,
    device_id: str,
    new_public_key: str,
    request_id: str,
) -> str:
    shared = crypto_scalarmult(_decode_key(private_key_b64), _decode_key(rotation_public_b64))
    mac = hmac.new(shared, _message(device_id, new_public_key, request_id), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


class RotationKey:
    def __init__(self, private: bytes) -> None:
        self._private = private
        self.public_b64 = base64.b64encode(crypto_scalarmult_base(private)).decode()

    def __repr__(self) -> str:
        return f"RotationKey(public={self.public_b64})"

    @classmethod
    def load_or_create(cls, path: Path) -> RotationKey:
        private_dir(path.parent)
        return cls(load_or_create_seed(path, "rotation key"))

    def verify(
        self,
        proof_b64: str,
        old_public_key: str,
        device_id: str,
        new_public_key: str,
        request_id: str,
    ) -> bool:
        try:
            shared = crypto_scalarmult(self._private, _decode_key(old_public_key))
        except RuntimeError:  # libsodium refuses a low-order point: no proof can hold
            return False
        mac = hmac.new(shared, _message(device_id, new_public_key, request_id), hashlib.sha256)
        return _matches(mac.digest(), proof_b64)

    def verify_request(self, proof_b64: str, public_key: str, command: str, body: bytes) -> bool:
        """Did the holder of ``public_key``'s private key send exactly this request?"""
        shared = crypto_scalarmult(self._private, _decode_key(public_key))
        mac = hmac.new(shared, _request_message(command, body), hashlib.sha256)
        return _matches(mac.digest(), proof_b64)


def _matches(expected: bytes, proof_b64: str) -> bool:
    try:
        given = base64.b64decode(proof_b64, validate=True)
    except ValueError:
        return False
    return hmac.compare_digest(expected, given)
