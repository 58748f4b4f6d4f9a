"""Connecting to NATS as one of DAMM's roles."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS

from damm import log
from damm.errors import Code, DammError
from damm.keys import nats_identity
from damm.protocol.client import connection_dropped, use_private_replies
from damm.subjects import GATEWAY_USER_PREFIX, inbox_prefix

_log = log.get("damm.protocol.bus")


async def connect(
    url: str,
    *,
    user: str | None = None,
    password: str | None = None,
    name: str = "damm",
    reconnect: bool = True,
    connect_timeout: float = 2.0,
    on_disconnected: Callable[[], Awaitable[None]] | None = None,
    on_reconnected: Callable[[], Awaitable[None]] | None = None,
    identity_seed: bytes | None = None,
) -> NATS:
    """Connect as ``user`` (replies on that user's own inbox), or anonymously as a device.

    A long-lived process reconnects forever; a one-shot client (``reconnect=False``) fails fast.
    """
    errors: list[Exception] = []
    made: list[NATS] = []  # the connection, once made, for its disconnect callback

    async def _error(exc: Exception) -> None:
        errors.append(exc)
        _log.debug("nats error", error=repr(exc))

    async def _disconnected() -> None:
        _log.info("nats disconnected", name=name)
        if made:
            connection_dropped(made[0])
        if on_disconnected is not None:
            await on_disconnected()

    async def _reconnected() -> None:
        _log.info("nats reconnected", name=name)
        if on_reconnected is not None:
            await on_reconnected()

    options: dict[str, Any] = {
        "servers": [u.strip() for u in url.split(",") if u.strip()],
        "name": name,
        "connect_timeout": connect_timeout,
        "allow_reconnect": reconnect,
        "max_reconnect_attempts": -1 if reconnect else 0,
        "reconnect_time_wait": 0.5,
        "error_cb": _error,
        "disconnected_cb": _disconnected,
        "reconnected_cb": _reconnected,
    }
    if user:
        options["user"] = user
        options["password"] = password or ""
        options["inbox_prefix"] = inbox_prefix(user)
    nc = NATS()
    made.append(nc)
    if not user and identity_seed:
        # The device's own key signs the server's nonce; its replies come to an inbox named
        # after that key, which the server lets no other connection read.
        signer = nats_identity.Signer(identity_seed)
        options["nkeys_seed_str"] = identity_seed.decode("ascii")
        options["inbox_prefix"] = inbox_prefix(signer.public)
        _sign_nonces_with(nc, signer)
    if reconnect:
        await nc.connect(**options)
        return _private_replies(_plain_inbox_without_identities(nc, identity_seed), user)
    # A one-shot client (the CLI) must fail fast: nats-py keeps retrying an unreachable server.
    options["max_reconnect_attempts"] = 0
    try:
        await asyncio.wait_for(nc.connect(**options), connect_timeout * 2)
        return _private_replies(_plain_inbox_without_identities(nc, identity_seed), user)
    except TimeoutError:
        last = errors[-1] if errors else None
        raise refusal(last) or ConnectionError(str(last) if last else "timed out") from None
    except Exception as exc:
        raise refusal(exc) or refusal(errors[-1] if errors else None) or exc from None


def _sign_nonces_with(nc: NATS, signer: nats_identity.Signer) -> None:
    """nats-py derives the key pair from the seed in pure Python for the public key and again
    for every nonce; a device connects once per command, so it is derived once, here."""

    def setup() -> None:
        nc._public_nkey = signer.public
        nc._signature_cb = lambda nonce: base64.b64encode(signer.sign(nonce.encode()))

    nc._setup_nkeys_seed_connect = setup  # type: ignore[method-assign]


def _private_replies(nc: NATS, user: str | None) -> NATS:
    if user and user.startswith(GATEWAY_USER_PREFIX):
        use_private_replies(nc, user[len(GATEWAY_USER_PREFIX) :])
    return nc


def _plain_inbox_without_identities(nc: NATS, identity_seed: bytes | None) -> NATS:
    """A server without the auth callout sends no nonce and knows no identities: there the
    device keeps the shared ``_INBOX`` its permissions allow. nats-py builds its reply
    subscription on the first request, so setting the prefix now is early enough."""
    if identity_seed and "nonce" not in nc._server_info:
        nc._inbox_prefix = bytearray(b"_INBOX")
    return nc


_SERVER_REFUSALS = (
    ("maximum account active connections exceeded", Code.TOO_MANY_CONNECTIONS),
    ("maximum connections exceeded", Code.TOO_MANY_CONNECTIONS),
    ("maximum subscriptions exceeded", Code.TOO_MANY_SUBSCRIPTIONS),
    ("authorization violation", Code.UNAUTHORIZED),
)


def refusal(exc: BaseException | None) -> DammError | None:
    """The catalogued code for a limit or refusal the server stated in words, if it was one."""
    text = str(exc).lower() if exc is not None else ""
    for words, code in _SERVER_REFUSALS:
        if words in text:
            return DammError(code, str(exc))
    return None
