"""Secrets at rest: enrollment and gateway tokens are stored only as hashes.

Enrollment tokens are looked up by their SHA-256 (they are long random strings, so a fast hash is
enough and lets the fold index them). A gateway token is also the gateway's NATS password, and
nats-server checks it against a bcrypt hash in its configuration.
"""

from __future__ import annotations

import hashlib

import bcrypt

BCRYPT_ROUNDS = 10  # checked by nats-server on every gateway connect: ~60 ms here


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def gateway_password_hash(token: str) -> str:
    """bcrypt in the ``$2a$`` form nats-server reads; computed once, when the token is issued."""
    return bcrypt.hashpw(token.encode(), bcrypt.gensalt(BCRYPT_ROUNDS, prefix=b"2a")).decode()
