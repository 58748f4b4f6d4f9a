"""Enrollment and key rotation.

``decide_enrollment`` is the pure decision. ``EnrollmentCommitter`` is the group commit around it:
requests that arrive while a batch is in flight are decided together and appended as one atomic
batch, so a popular token (whose aggregate every enrollment must update in order) does not cap
throughput at one fsync per enrollment. Each enrollment appends, atomically:
token.used (expects the token's sequence) · key.bound (expects an unused key) ·
ipam.allocated (expects the address's sequence) · device.enrolled (expects a new device).
"""

from __future__ import annotations

import asyncio
import math
import random
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from damm import log
from damm.clock import cancel_and_wait
from damm.control.context import APPEND_ACK_TIMEOUT_S, Attempts, Context, Planned
from damm.control.placement_view import candidates, pools, tier_policy
from damm.control.state import DecisionState, DeviceState, TokenState
from damm.domain import egress
from damm.domain import placement as pl
from damm.domain.lifecycle import OVER_QUOTA
from damm.errors import Code, DammError
from damm.events import model as m
from damm.events.model import Actor
from damm.events.store import Append, AppendError, ConflictError
from damm.keys.tokens import token_hash
from damm.keys.wireguard import validate_public_key
from damm.protocol import messages as p
from damm.protocol.router import BUS_TROUBLE, Call, Route, route
from damm.settings import ControlSettings
from damm.subjects import DEFAULT_POOL, address_subject, event_subject, key_subject

_log = log.get("damm.enrollment")

MAX_GROUP = 200  # 4 messages each, under JetStream's 1,000-message atomic batch limit
# After losing a race, a replica takes its addresses from a random window of the lowest free
# ones for a while: two replicas both taking the lowest collide every time.
SPREAD_S = 10.0
SPREAD_WINDOW = 64


@dataclass
class Tentative:
    """Effects of the decisions already in this group, not yet in the state."""

    uses: Counter[str] = field(default_factory=Counter)
    keys: set[str] = field(default_factory=set)
    requests: set[str] = field(default_factory=set)
    subjects: set[str] = field(default_factory=set)
    egress: dict[str, Counter[str]] = field(default_factory=dict)

    def egress_address(self, state: DecisionState, pool_id: str) -> str | None:
        """Assign from the pool counting this group's own assignments, and record the choice."""
        taken = self.egress.setdefault(pool_id, Counter())
        address = egress.assign(
            state.pool_addresses.get(pool_id, ()),
            state.egress_in_use.get(pool_id, Counter()) + taken,
        )
        if address is not None:
            taken[address] += 1
        return address

    assigned: Counter[str] = field(default_factory=Counter)

    def expect(self, state: DecisionState, subject: str) -> int | None:
        """Only a subject's first message in a batch carries the expectation."""
        if subject in self.subjects:
            return None
        self.subjects.add(subject)
        return state.seq_of(subject)


def enrolled_reply(ctx: Context, dev: DeviceState) -> p.Enrolled:
    gw = ctx.state.gateways[dev.gateway_id]
    door = gw.front_doors[dev.front_door_id]
    prefix = ctx.settings.overlay.network.prefixlen
    six = ctx.settings.overlay.ula
    return p.Enrolled(
        device_id=dev.device_id,
        address=f"{dev.address}/{prefix}",
        address6=f"{dev.address6}/{six.prefixlen}" if dev.address6 and six else None,
        gateway_id=gw.gateway_id,
        gateway_public_key=gw.public_key or "",
        front_door_id=door.front_door_id,
        endpoint=door.endpoint,
        allowed_ips=ctx.settings.client_allowed_ips,
        dns=ctx.settings.dns,
        egress_pool_id=dev.egress_pool_id,
        key_expires_at=dev.key_expires_at,
        rotation_key=ctx.rotation.public_b64,
        # Pin the version published now: an older catalog replayed later is a rollback.
        catalog=p.CatalogTrust(
            ctx.signer.key_id,
            ctx.signer.public_key_b64,
            ctx.state.catalog_versions.get(gw.region, 0),
            gw.region,
            ctx.keyring.announcements() if ctx.keyring is not None else (),
        ),
    )


def prior_enrollment(state: DecisionState, req: p.Enroll) -> str | None:
    """The device this request already enrolled: by its request id, or by the same key on the
    same token. ``damm device enroll`` run again after a timeout mints a new request id but
    keeps its key; it must get the enrollment that was recorded, not ``key_reused`` with its
    token use and address spent. Nothing secret is in the answer (the client holds the private
    key), so a stranger who knows the public key and the token learns nothing it could not
    enroll for itself."""
    known = state.requests.get(req.request_id)
    if known is not None:
        return known
    owner = state.bound_keys.get(req.public_key)
    if owner is None or not req.token.startswith("dmt_") or len(req.token) > 100:
        return None
    dev = state.devices.get(owner)
    tok = state.tokens_by_hash.get(token_hash(req.token))
    if dev is None or tok is None or dev.token_id != tok.token_id:
        return None
    return owner if dev.public_key == req.public_key else None


def replayed(ctx: Context, req: p.Enroll, device_id: str) -> p.Enrolled:
    """The answer to a retried enrollment: the original one, if it still holds."""
    dev = ctx.state.devices[device_id]
    if dev.public_key != req.public_key:
        raise DammError(Code.CONFLICT, "that request id enrolled another key")
    if dev.status == "revoked":
        raise DammError(Code.DEVICE_REVOKED, f"device {dev.device_id}")
    if dev.status == "suspended":
        code = Code.OVER_QUOTA if dev.reason == OVER_QUOTA else Code.DEVICE_SUSPENDED
        raise DammError(code, f"device {dev.device_id} is suspended ({dev.reason})")
    return enrolled_reply(ctx, dev)


def check_token(
    state: DecisionState, token: str, now: datetime, pending: Mapping[str, int] | None = None
) -> tuple[m.TierDefined, TokenState]:
    """The token's tier and state, or the catalogued reason it cannot enroll; ``pending`` counts
    uses already decided in this group but not yet in the state."""
    if not token.startswith("dmt_") or len(token) > 100:
        raise DammError(Code.TOKEN_UNKNOWN, "not an enrollment token")
    tok = state.tokens_by_hash.get(token_hash(token))
    if tok is None:
        raise DammError(Code.TOKEN_UNKNOWN)
    if tok.revoked:
        raise DammError(Code.TOKEN_REVOKED, f"token {tok.token_id}")
    if tok.expires_at is not None and now >= tok.expires_at:
        raise DammError(
            Code.TOKEN_EXPIRED, f"token {tok.token_id} expired {tok.expires_at:%Y-%m-%d %H:%M}Z"
        )
    if tok.max_uses is not None and tok.uses + (pending or {}).get(tok.token_id, 0) >= tok.max_uses:
        raise DammError(Code.TOKEN_USED_UP, f"token {tok.token_id} allowed {tok.max_uses} uses")
    tier = state.tiers.get(tok.tier)
    if tier is None or tier.status != "active":
        raise DammError(Code.OUT_OF_POLICY, f"tier {tok.tier} is not active")
    return tier, tok


def decide_enrollment(
    req: p.Enroll,
    state: DecisionState,
    settings: ControlSettings,
    now: datetime,
    *,
    tentative: Tentative,
    index: int | None,
    device_id: str,
    correlation_id: str,
    identity_key: str | None = None,
) -> list[Planned]:
    """Validate and decide one enrollment against state plus this group's tentative effects.

    Pure: the same request, state, settings and clock give the same events. ``index`` is the
    address the group's allocator set aside for this request, ``device_id`` the id it minted.
    """
    public_key = validate_public_key(req.public_key)
    if req.request_id in tentative.requests:
        raise DammError(Code.CONFLICT, "the same request is already in flight")
    tier, tok = check_token(state, req.token, now, tentative.uses)
    token_id = tok.token_id
    if tier.session_limit is not None and (
        len(tok.sessions) + tentative.uses[token_id] >= tier.session_limit
    ):
        raise DammError(
            Code.SESSION_LIMIT, f"{tier.session_limit} active devices already use this token"
        )
    owner = state.bound_keys.get(public_key)
    if owner is not None or public_key in tentative.keys:
        dev = state.devices.get(owner or "")
        if dev is not None and dev.status == "revoked":
            raise DammError(Code.DEVICE_REVOKED, f"key belongs to revoked device {dev.device_id}")
        if dev is not None and dev.status == "suspended":
            code = Code.OVER_QUOTA if dev.reason == OVER_QUOTA else Code.DEVICE_SUSPENDED
            raise DammError(code, f"device {dev.device_id} is suspended ({dev.reason})")
        raise DammError(Code.KEY_REUSED, "generate a new key for a new enrollment")
    request = pl.PlacementRequest(req.region, req.exit_country)
    policy = tier_policy(tier)
    ttl = timedelta(seconds=settings.heartbeat_ttl_s)
    pool_list = pools(state, now)
    placement = pl.place_indexed(
        request,
        policy,
        state.placement,
        pool_list,
        now=now,
        heartbeat_ttl=ttl,
        pending=tentative.assigned,
    ) or pl.place(  # nothing placeable: the full pass raises the refusal with every reason
        request,
        policy,
        candidates(state, tentative.assigned),
        pool_list,
        now=now,
        heartbeat_ttl=ttl,
        capacity=state.placement.capacity,
    )
    if index is None:
        raise DammError(Code.POOL_EXHAUSTED, f"no free address in {settings.overlay.network}")
    pool = placement.egress_pool
    egress_address = tentative.egress_address(state, pool.id) if pool else None
    overlay = settings.overlay
    address = str(overlay.address(index))
    six = overlay.address6(index)
    address6 = str(six) if six is not None else None
    expires = now + timedelta(seconds=tier.key_lifetime_s) if tier.key_lifetime_s else None
    actor = Actor("device", device_id)
    token_sub = event_subject("token", token_id)
    limited = tok.max_uses is not None or tier.session_limit is not None
    key_sub = key_subject(public_key)
    ipam_sub = address_subject(index)
    device_sub = event_subject("device", device_id)
    items = [
        Planned(
            token_sub,
            m.TokenUsed(token_id=token_id, device_id=device_id),
            actor,
            correlation_id,
            # Uses and sessions are counted on the token's subject, so a limited token takes
            # its uses one decision at a time. One without limits has nothing to count: its
            # replicas need not queue on it (at 200/s, two of them on one token: p99 4 s).
            expected=tentative.expect(state, token_sub) if limited else None,
        ),
        Planned(
            key_sub,
            m.KeyBound(public_key=public_key, device_id=device_id),
            actor,
            correlation_id,
            expected=tentative.expect(state, key_sub),
        ),
        Planned(
            ipam_sub,
            m.AddressAllocated(
                pool=DEFAULT_POOL,
                index=index,
                address=address,
                address6=address6,
                device_id=device_id,
            ),
            actor,
            correlation_id,
            expected=tentative.expect(state, ipam_sub),
        ),
        Planned(
            device_sub,
            m.DeviceEnrolled(
                device_id=device_id,
                public_key=public_key,
                token_id=token_id,
                tier=tier.tier,
                gateway_id=placement.gateway.id,
                front_door_id=placement.front_door.id,
                egress_pool_id=placement.egress_pool.id if placement.egress_pool else None,
                address=address,
                address6=address6,
                key_expires_at=expires,
                region=placement.gateway.region,
                exit_country=req.exit_country,
                egress_address=egress_address,
                identity_key=identity_key,
            ),
            actor,
            # The request id is the device event's correlation id: a retry finds it in the fold.
            req.request_id,
            expected=0,
            msg_id=f"enroll-{req.request_id}",
        ),
    ]
    tentative.uses[token_id] += 1
    tentative.keys.add(public_key)
    tentative.requests.add(req.request_id)
    tentative.assigned[placement.gateway.id] += 1
    return items


def _settle(future: asyncio.Future[p.Enrolled], outcome: p.Enrolled | DammError) -> None:
    """Resolve a waiting request once; a caller that gave up (cancelled) is simply skipped."""
    if future.done():
        return
    if isinstance(outcome, DammError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


@dataclass
class _Waiting:
    req: p.Enroll
    call: Call
    future: asyncio.Future[p.Enrolled]
    attempts: Attempts


class EnrollmentCommitter:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._queue: list[_Waiting] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._spread_until = -math.inf  # loop time until which addresses are spread
        self._in_flight: dict[str, asyncio.Future[p.Enrolled]] = {}  # by request id

    def routes(self) -> list[Route]:
        return [
            route("enroll", p.Enroll, self.enroll),
            route("device.rotate_key", p.RotateKey, self.rotate_key),
        ]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            await cancel_and_wait(self._task)
        for waiting in self._queue:
            _settle(waiting.future, DammError(Code.UNAVAILABLE, "control plane stopping"))

    async def enroll(self, req: p.Enroll, call: Call) -> p.Enrolled:
        known = prior_enrollment(self.ctx.state, req)
        if known is not None:
            return replayed(self.ctx, req, known)
        first = self._in_flight.get(req.request_id)
        if first is not None and not first.done():
            # The client sent it again after its connection dropped (damm.protocol.client):
            # this copy gets the first one's outcome rather than racing it for the same key.
            await asyncio.wait((first,))
            if not first.cancelled():
                return first.result()
        future: asyncio.Future[p.Enrolled] = asyncio.get_running_loop().create_future()
        self._in_flight[req.request_id] = future
        future.add_done_callback(lambda _: self._in_flight.pop(req.request_id, None))
        self._queue.append(_Waiting(req, call, future, Attempts(call)))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                group, self._queue = self._queue[:MAX_GROUP], self._queue[MAX_GROUP:]
                try:
                    await self._commit(group)
                except DammError as err:  # the log refused the batch (full disk, lost leader)
                    _log.warning("enrollment group not recorded", error=err.line())
                    if isinstance(err, AppendError) and err.transient:
                        await self._again(group, err)
                    else:
                        self._fail(group, err)
                except BUS_TROUBLE as exc:
                    # Maybe recorded, maybe not: a retry is safe (the device event's message id
                    # and the expected sequences make a landed batch come back as a duplicate).
                    _log.warning("enrollment group failed on the bus", error=repr(exc))
                    await self._again(
                        group, DammError(Code.UNAVAILABLE, "event log did not answer")
                    )
                except Exception:  # never let one bad group stop enrollment
                    _log.exception("enrollment group failed")
                    self._fail(group, DammError(Code.INTERNAL, "enrollment failed; see logs"))

    async def _again(self, group: list[_Waiting], err: DammError) -> None:
        """Try the group again after a short pause while a cluster elects a stream leader; a
        request whose deadline passes meanwhile gets ``err``, the reason it was not recorded."""
        again = []
        for w in group:
            if w.future.done():
                continue
            if w.attempts.lost() is not None:
                _settle(w.future, err)
            else:
                again.append(w)
        if again:
            await asyncio.sleep(random.uniform(0.05, 0.15))
            self._queue[:0] = again

    @staticmethod
    def _fail(group: list[_Waiting], err: DammError) -> None:
        for w in group:
            _settle(w.future, err)

    async def _commit(self, group: list[_Waiting]) -> None:
        ctx = self.ctx
        tentative = Tentative()
        indices = iter(self._addresses(len(group)))
        decided: list[tuple[_Waiting, list[Append], str]] = []
        for w in group:
            if (late := w.attempts.too_late()) is not None:
                # Its caller has given up, or will before the append is acknowledged (it
                # queued behind a blocked log): recording it now would record an enrollment
                # its client was told failed.
                _settle(w.future, late)
                continue
            known = prior_enrollment(ctx.state, w.req)
            if known is not None:
                try:
                    _settle(w.future, replayed(ctx, w.req, known))
                except DammError as err:
                    _settle(w.future, err)
                continue
            device_id = uuid.uuid4().hex[:20]
            try:
                index = next(indices, None)
                items = ctx.appends(
                    decide_enrollment(
                        w.req,
                        ctx.state,
                        ctx.settings,
                        ctx.now(),
                        tentative=tentative,
                        index=index,
                        device_id=device_id,
                        correlation_id=w.call.correlation_id,
                        identity_key=w.call.identity,
                    )
                )
            except DammError as err:
                _settle(w.future, err)
                continue
            decided.append((w, items, device_id))
        if not decided:
            return
        batch = [item for _, items, _ in decided for item in items]
        try:
            result = await ctx.store.append_batch(batch, ack_timeout=APPEND_ACK_TIMEOUT_S)
        except ConflictError as exc:
            _log.info(
                "enrollment group lost a race",
                size=len(decided),
                subject=exc.subject,
                detail=exc.detail[-80:],
            )
            # The log names the batch's first guarded subject, not always the one that moved:
            # any lost race means another replica is enrolling too.
            self._spread_until = asyncio.get_running_loop().time() + SPREAD_S
            await ctx.follower.sync()
            await self._requeue([w for w, _, _ in decided])
            return
        if result.duplicate:
            # One of them was a retry of a request already recorded: decide each alone so the
            # others are not mistaken for it.
            await ctx.follower.sync()
            for w, _, _ in decided:
                if self._attempt(w):
                    await self._commit([w])
            return
        ctx.absorb(batch, result)
        for w, _, device_id in decided:
            _settle(w.future, enrolled_reply(ctx, ctx.state.devices[device_id]))

    def _addresses(self, n: int) -> list[int]:
        """The lowest ``n`` free addresses, or ``n`` in a row from a random place among the
        lowest free ones while another replica is taking addresses too."""
        pool = self.ctx.state.addresses
        if asyncio.get_running_loop().time() >= self._spread_until:
            return pool.peek(n)
        free = pool.peek(n + SPREAD_WINDOW)
        start = random.randrange(max(1, len(free) - n + 1))
        return free[start : start + n]

    @staticmethod
    def _attempt(w: _Waiting) -> bool:
        """Count a lost race; settle the request if it has no try left."""
        if (err := w.attempts.lost()) is not None:
            _settle(w.future, err)
            return False
        return True

    async def _requeue(self, waiting: list[_Waiting]) -> None:
        """After a lost race, decide the group again, first in line, after the pause of its
        most tried request."""
        again = [w for w in waiting if self._attempt(w)]
        if not again:
            return
        await max((w.attempts for w in again), key=lambda a: a.count).pause()
        self._queue[:0] = again

    # --- key rotation ------------------------------------------------------------------------

    async def rotate_key(self, req: p.RotateKey, call: Call) -> p.KeyRotated:
        ctx = self.ctx
        new_key = validate_public_key(req.new_public_key)
        old_key = validate_public_key(req.old_public_key)
        if call.caller is not None:
            # From outside, only the connection holding the device's identity may act on it.
            # It depends on nothing but the caller's own identity, so it tells nothing either.
            identity = call.identity or ""
            await ctx.fresh(lambda: ctx.state.identities.get(identity) == req.device_id)
            if ctx.state.identities.get(identity) != req.device_id:
                raise DammError(Code.NOT_YOUR_DEVICE, f"device {req.device_id!r}")
        # The proof first: until it holds, the caller learns nothing about the device, not even
        # whether it exists or what its current key is.
        if not ctx.rotation.verify(req.proof, old_key, req.device_id, new_key, req.request_id):
            raise DammError(Code.UNAUTHORIZED, "the proof of the old key does not verify")
        await ctx.fresh(lambda: req.device_id in ctx.state.devices)
        dev = ctx.state.devices.get(req.device_id)
        if dev is None:
            raise DammError(Code.NOT_FOUND, f"device {req.device_id!r}")
        if dev.status == "revoked":
            raise DammError(Code.DEVICE_REVOKED, f"device {dev.device_id}")
        if dev.public_key != old_key:
            if dev.public_key == new_key:  # a retry of a rotation that already happened
                return p.KeyRotated(dev.device_id, dev.public_key, dev.key_expires_at)
            raise DammError(Code.UNAUTHORIZED, "the old key is not this device's current key")
        tier = ctx.state.tiers.get(dev.tier)
        lifetime = tier.key_lifetime_s if tier else None
        expires = ctx.now() + timedelta(seconds=lifetime) if lifetime else None
        dcall = Call(call.correlation_id, Actor("device", dev.device_id))
        device_sub = event_subject("device", dev.device_id)
        key_sub = key_subject(new_key)

        def decide() -> list[Append]:
            # Re-checked on every attempt: a concurrent rotation may have won meanwhile.
            current = ctx.state.devices[dev.device_id]
            if current.public_key == new_key:
                return []
            if current.public_key != old_key or current.status == "revoked":
                raise DammError(Code.UNAUTHORIZED, "the old key is no longer this device's key")
            if new_key in ctx.state.bound_keys:
                raise DammError(Code.KEY_REUSED, "the new key is already bound")
            return [
                ctx.append(
                    key_sub,
                    m.KeyBound(public_key=new_key, device_id=dev.device_id),
                    dcall,
                    expected=ctx.state.seq_of(key_sub),
                ),
                ctx.append(
                    device_sub,
                    m.DeviceKeyRotated(
                        device_id=dev.device_id,
                        old_public_key=old_key,
                        new_public_key=new_key,
                        key_expires_at=expires,
                    ),
                    dcall,
                    expected=ctx.state.seq_of(device_sub),
                    msg_id=f"rotate-{req.request_id}",
                ),
            ]

        await ctx.commit(decide, call)
        return p.KeyRotated(dev.device_id, new_key, expires)
