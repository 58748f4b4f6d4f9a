"""NATS auth callout: the control plane decides every outside connection from the event log.

Why auth callout rather than decentralised JWT mode: the accounts (DAMM, DEV, ANON, GW) stay in
the server's configuration file as they are, and who may connect as what is decided from the
same fold every handler decides from. Enrolling a device or adding a gateway changes nothing on
the server (no reload, at 100k devices or at one), a revoked device is refused at its next
connection with nothing to distribute, and there is no second key hierarchy (operator, account
JWTs, resolver) to run beside the event log. The cost is one round trip to the control plane
per connection, answered from memory by any replica in a queue group.

Grants:
- a key that proves itself (its signature over the server's nonce) and belongs to an active
  device: account DEV, the device requests, and an inbox ``_INBOX_<key>`` nobody else may read;
- a key that proves itself but belongs to no active device: account ANON, only enrollment and
  the catalog, with the same private inbox, so its enrollment reply is its own;
- a gateway user ``gw-<id>`` with its token: account GW, its own peer set and reply subjects
  (``damm.gwr.<id>.>``: the control plane answers a gateway only there);
- no credentials at all: account ANON, only the catalog (its answers are public anyway).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import bcrypt
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from damm import log
from damm.control.state import DecisionState
from damm.errors import Code, DammError
from damm.keys import nats_identity
from damm.subjects import REQUEST_PREFIX, gateway_reply_prefix, inbox_prefix, peers_subject

_log = log.get("damm.control.callout")

AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"
QUEUE = "damm-callout"
DEVICE_PUBLISH = (
    f"{REQUEST_PREFIX}.device.>",
    f"{REQUEST_PREFIX}.catalog.>",
    f"{REQUEST_PREFIX}.enroll",
)
ENROLLING_PUBLISH = (f"{REQUEST_PREFIX}.enroll", f"{REQUEST_PREFIX}.catalog.>")
ANON_PUBLISH = (f"{REQUEST_PREFIX}.catalog.>",)
GATEWAY_PUBLISH = (f"{REQUEST_PREFIX}.gateway.>",)
# Subscriptions per connection, as the user JWT states it. nats-server 2.15 in config mode was
# seen not to enforce it for callout users; the ANON account's max_subscriptions is what holds.
OUTSIDE_SUBS = 8
GRANT_TTL_S = 24 * 3600

Account = Literal["DEV", "ANON", "GW"]


class ConnectOptions(msgspec.Struct, frozen=True):
    nkey: str = ""
    sig: str = ""
    user: str = ""
    # ``pass`` is a Python keyword
    password: str = msgspec.field(default="", name="pass")


class ClientInfo(msgspec.Struct, frozen=True):
    host: str = ""
    id: int = 0
    nonce: str = ""


class ServerId(msgspec.Struct, frozen=True):
    id: str = ""


class AuthRequest(msgspec.Struct, frozen=True):
    server_id: ServerId
    user_nkey: str
    client_info: ClientInfo = ClientInfo()
    connect_opts: ConnectOptions = ConnectOptions()


@dataclass(frozen=True)
class Grant:
    account: Account
    name: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    subs: int = OUTSIDE_SUBS


def device_inbox(identity: str) -> str:
    return inbox_prefix(identity)


class PasswordCache:
    """Gateway tokens that already matched the bcrypt hash the log holds for their gateway.

    bcrypt is slow on purpose (about 60 ms), and after a NATS restart every gateway reconnects
    at once. Keyed by the hash from the log, so a new token (a new hash) or a removed gateway is
    never answered from here. Only a keyed digest of each token is kept, under a key made for
    this process, never the token.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._key = os.urandom(32)
        self._ok: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    def _digest(self, password: str) -> bytes:
        return hmac.new(self._key, password.encode(), hashlib.sha256).digest()

    def known(self, gateway_id: str, hashed: str, password: str) -> bool:
        seen = self._ok.get((gateway_id, hashed))
        return seen is not None and hmac.compare_digest(seen, self._digest(password))

    def remember(self, gateway_id: str, hashed: str, password: str) -> None:
        self._ok[(gateway_id, hashed)] = self._digest(password)
        self._ok.move_to_end((gateway_id, hashed))
        if len(self._ok) > self.capacity:
            self._ok.popitem(last=False)


def _gateway_hash(state: DecisionState, gateway_id: str) -> str | None:
    gateway = state.gateways.get(gateway_id)
    return gateway.nats_password_bcrypt if gateway else None


def needs_bcrypt(req: AuthRequest, state: DecisionState, passwords: PasswordCache) -> bool:
    """Whether deciding ``req`` means a bcrypt check (then it runs off the event loop)."""
    opts = req.connect_opts
    if not opts.password or not opts.user.startswith("gw-"):
        return False
    hashed = _gateway_hash(state, opts.user[3:])
    return hashed is not None and not passwords.known(opts.user[3:], hashed, opts.password)


def decide(req: AuthRequest, state: DecisionState, passwords: PasswordCache | None = None) -> Grant:
    """Who this connection is and what it may do; a DammError when it may not connect."""
    opts = req.connect_opts
    if opts.nkey:
        nonce = req.client_info.nonce
        if not nonce or not nats_identity.verify_nonce(opts.nkey, nonce, opts.sig):
            raise DammError(Code.IDENTITY_REFUSED, "the key's signature over the nonce")
        inbox = (f"{device_inbox(opts.nkey)}.>",)
        device_id = state.identities.get(opts.nkey)
        device = state.devices.get(device_id) if device_id else None
        if device is not None and device.status != "revoked":
            return Grant("DEV", f"device:{opts.nkey}", DEVICE_PUBLISH, inbox)
        return Grant("ANON", f"enrolling:{opts.nkey}", ENROLLING_PUBLISH, inbox)
    if opts.user.startswith("gw-"):
        gateway_id = opts.user[3:]
        hashed = _gateway_hash(state, gateway_id)
        if not hashed or not opts.password:
            raise DammError(Code.UNAUTHORIZED, f"gateway {gateway_id!r}")
        if passwords is None or not passwords.known(gateway_id, hashed, opts.password):
            if not _bcrypt_ok(opts.password, hashed):
                raise DammError(Code.UNAUTHORIZED, f"gateway {gateway_id!r}")
            if passwords is not None:
                passwords.remember(gateway_id, hashed, opts.password)
        return Grant(
            "GW",
            f"gateway:{gateway_id}",
            GATEWAY_PUBLISH,
            (peers_subject(gateway_id), f"{gateway_reply_prefix(gateway_id)}.>"),
        )
    if opts.user or opts.password:
        raise DammError(Code.UNAUTHORIZED, "unknown user")
    return Grant("ANON", "anon:-", ANON_PUBLISH, ("_INBOX.>",))


def _bcrypt_ok(password: str, hashed: str) -> bool:
    try:
        return bcrypt.checkpw(password.encode()[:72], hashed.encode())
    except ValueError:
        return False


def response(
    req: AuthRequest, outcome: Grant | DammError, seed: nats_identity.Signer | bytes, now: float
) -> bytes:
    """The signed authorization response: a user JWT for a grant, or the refusal's code."""
    claims: dict[str, Any] = {"type": "authorization_response", "version": 2}
    if isinstance(outcome, DammError):
        claims["error"] = f"{outcome.code.slug}: {outcome.detail}"[:200]
    else:
        user = {
            "sub": req.user_nkey,
            "aud": outcome.account,
            "name": outcome.name,
            "iat": int(now),
            "exp": int(now) + GRANT_TTL_S,
            "nats": {
                "pub": {"allow": list(outcome.publish)},
                "sub": {"allow": list(outcome.subscribe)},
                "subs": outcome.subs,
                "data": -1,
                "payload": -1,
                "type": "user",
                "version": 2,
            },
        }
        claims["jwt"] = nats_identity.encode_jwt(user, seed)
    token = nats_identity.encode_jwt(
        {"sub": req.user_nkey, "aud": req.server_id.id, "iat": int(now), "nats": claims}, seed
    )
    return token.encode("ascii")


class _RequestClaims(msgspec.Struct, frozen=True):
    nats: AuthRequest


class CalloutService:
    """Answers the server's authorization requests, on a connection of its own so a flood of
    requests elsewhere cannot make the server drop it as a slow consumer."""

    def __init__(self, nc: NATS, state: DecisionState, seed: bytes) -> None:
        self.nc = nc
        self.state = state
        self.issuer = nats_identity.Signer(seed)
        self.passwords = PasswordCache()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(AUTH_SUBJECT, queue=QUEUE, cb=self._on_request)
        await self.nc.flush()

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _check_password(self, req: AuthRequest) -> None:
        """bcrypt is slow on purpose: off the event loop, and the cache (touched only on the
        loop) remembers the hash it was checked against, even if the log moved meanwhile."""
        gateway_id, password = req.connect_opts.user[3:], req.connect_opts.password
        hashed = _gateway_hash(self.state, gateway_id)
        if hashed is None:
            return
        if not await asyncio.to_thread(_bcrypt_ok, password, hashed):
            raise DammError(Code.UNAUTHORIZED, f"gateway {gateway_id!r}")
        self.passwords.remember(gateway_id, hashed, password)

    async def _on_request(self, msg: Msg) -> None:
        try:
            req = nats_identity.unverified_claims(msg.data, _RequestClaims).nats
        except (nats_identity.IdentityError, msgspec.ValidationError):
            _log.warning("auth callout request not understood")
            return  # the server times the connection out; nothing to sign for
        if needs_bcrypt(req, self.state, self.passwords):
            # Its own task: nats-py runs one callback at a time, and the next connection
            # must not wait out this one's bcrypt.
            task = asyncio.create_task(self._answer(msg, req, slow=True))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            await self._answer(msg, req, slow=False)

    async def _answer(self, msg: Msg, req: AuthRequest, *, slow: bool) -> None:
        try:
            outcome: Grant | DammError
            if slow:
                await self._check_password(req)
            outcome = decide(req, self.state, self.passwords)
        except DammError as err:
            outcome = err
            _log.info("connection refused", code=err.code.slug, host=req.client_info.host)
        if msg.reply:
            await self.nc.publish(msg.reply, response(req, outcome, self.issuer, time.time()))
