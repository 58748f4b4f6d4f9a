"""Requests a device sends under its own identity: the proof covers every field.

Devices connect to NATS without credentials; the proof (``damm.keys.rotation.prove_request``,
made with the device's WireGuard private key) is what lets the control plane tell one device
from another. Both sides compute the covered bytes here, so they cannot drift apart.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from damm.keys.rotation import prove_request
from damm.protocol import messages as p

_encoder = msgspec.json.Encoder()

Signed = p.DeviceCheckIn | p.ReportFailover
S = TypeVar("S", p.DeviceCheckIn, p.ReportFailover)


def signed_body(req: Signed) -> bytes:
    """The bytes a device's proof covers: the request with an empty proof field."""
    return _encoder.encode(msgspec.structs.replace(req, proof=""))


def sign(req: S, command: str, private_key_b64: str, rotation_public_b64: str) -> S:
    proof = prove_request(private_key_b64, rotation_public_b64, command, signed_body(req))
    return msgspec.structs.replace(req, proof=proof)
