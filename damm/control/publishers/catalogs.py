"""Publishing signed catalogs: one per region, built from the decision state's health evidence.

A catalog lists the region's healthy gateways (registered, active, heartbeat fresher than
``heartbeat_ttl_s``) with their active front doors and the egress countries of the region's
pools. Only the leader publishes. Every publication is a ``CatalogPublished`` event on
``damm.evt.catalog.<region>`` that carries the signed bytes and the leader's term; every replica
folds it and serves exactly those bytes on ``catalog.get``, so devices see one version sequence
whichever replica answers. A publication expects the last sequence of the whole catalog family
(every region and the leader term marker): a new leader's term marker therefore refuses every
later append of a deposed leader, which then steps down. A new version is published only when
the content changed (gateways, front doors, countries, announced keys, signing key) or the
current one is within a third of its lifetime of expiring.

The signing key never appears in an event (only its id and the signature over the payload do).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from nats.js.errors import NotFoundError

from damm import log
from damm.catalog.canonical import check_front_door, check_gateway
from damm.catalog.document import (
    COUNTRY_PATTERN,
    CatalogFrontDoor,
    CatalogGateway,
    KeyAnnouncement,
    SignedCatalog,
    encode_signed,
)
from damm.catalog.signing import build_catalog
from damm.clock import cancel_and_wait
from damm.control.context import Attempts, Context
from damm.control.leadership import Leadership
from damm.control.state import GatewayState
from damm.domain.health import gateway_health
from damm.errors import Code, DammError
from damm.events import codec
from damm.events import model as m
from damm.events.store import ConflictError
from damm.protocol import messages as p
from damm.protocol.router import Call, Route, route
from damm.subjects import (
    CATALOG_FAMILY,
    EVENTS_STREAM,
    LEADER_TERM_SUBJECT,
    check_id,
    event_subject,
)

_log = log.get("damm.catalogs")
_country = re.compile(COUNTRY_PATTERN)

ACTOR = m.Actor("system", "catalog-publisher")
KEYRING_POLL_S = 0.02
SWITCH_WAIT_S = 2.0
FIRST_WAIT_S = 5.0  # a leader election (lease TTL) and one publication


@dataclass(frozen=True)
class Published:
    """The latest catalog of one region, as this process holds it."""

    region: str
    version: int
    seq: int  # last sequence of the region's catalog subject
    digest: str
    expires_at: int
    content: tuple[object, ...] | None = None  # what changes force a new version; None: unknown
    signed: SignedCatalog | None = None
    encoded: bytes | None = None


def catalog_subject(region: str) -> str:
    return event_subject("catalog", region)


def digest_of(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class CatalogPublisher:
    def __init__(
        self,
        ctx: Context,
        leadership: Leadership | None = None,
        *,
        interval_s: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """Without ``leadership`` (tests, tools) this publisher always publishes, unfenced."""
        self.ctx = ctx
        self.leadership = leadership
        self.interval_s = interval_s
        self.clock = clock or (lambda: ctx.now().timestamp())
        self.latest: dict[str, Published] = {}
        self.family_seq: int | None = None  # last sequence of the catalog family we know of
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def leads(self) -> bool:
        return self.leadership is None or self.leadership.is_leader

    # --- request/reply ------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [route("catalog.get", p.GetCatalog, self.get)]

    async def get(self, req: p.GetCatalog, call: Call) -> p.SignedCatalogReply:
        """What the leader published last, as this replica folded it: the same on every one."""
        current = self.ctx.state.catalogs.get(req.region)
        # Not published yet (just started, or a region that appeared a moment ago): wait, bounded,
        # for the leader's first one -- ours, if we lead or come to lead meanwhile.
        if current is None and req.region in self.regions():
            for _ in range(round(FIRST_WAIT_S / KEYRING_POLL_S)):
                if self.leads():
                    await self.tick()
                current = self.ctx.state.catalogs.get(req.region)
                if current is not None:
                    break
                await asyncio.sleep(KEYRING_POLL_S)
        if current is None:
            raise DammError(Code.NOT_FOUND, f"no catalog for region {req.region!r}")
        if current.key_id != self.ctx.state.keyring.active:
            current = await self._after_switch(req.region, current)
        return p.SignedCatalogReply(signed=current.signed)

    async def _after_switch(self, region: str, current: m.CatalogPublished) -> m.CatalogPublished:
        """Just after an activation, wait (bounded) for the leader's catalog under the new key:
        devices enrolled since pin only that key and would refuse the previous catalog."""
        for _ in range(round(SWITCH_WAIT_S / KEYRING_POLL_S)):
            latest = self.ctx.state.catalogs.get(region, current)
            if latest.key_id == self.ctx.state.keyring.active:
                return latest
            await asyncio.sleep(KEYRING_POLL_S)
        return self.ctx.state.catalogs.get(region, current)

    # --- building -----------------------------------------------------------------------------

    def regions(self) -> set[str]:
        state = self.ctx.state
        regions = {gw.region for gw in state.gateways.values()}
        regions |= {pool.region for pool in state.pools.values()}
        return {r for r in regions if _valid_region(r)}

    def healthy(self, gw: GatewayState, now: float) -> bool:
        health = gateway_health(
            active=gw.active,
            registered=gw.registered,
            last_heartbeat=gw.last_heartbeat,
            now=datetime.fromtimestamp(now, UTC),
            ttl=timedelta(seconds=self.ctx.settings.heartbeat_ttl_s),
        )
        return health == "healthy"

    def gateways_for(self, region: str, now: float) -> tuple[CatalogGateway, ...]:
        state = self.ctx.state
        countries = sorted(
            {
                c.upper()
                for pool in state.pools.values()
                if pool.region == region and pool.active
                for c in pool.countries
                if _country.fullmatch(c.upper())
            }
        )
        out: list[CatalogGateway] = []
        for gw in state.gateways.values():
            if gw.region != region or not self.healthy(gw, now):
                continue
            doors: list[CatalogFrontDoor] = []
            for fd in gw.front_doors.values():
                if not fd.active or not 0 <= fd.priority <= 65535:
                    continue
                door = CatalogFrontDoor(
                    id=fd.front_door_id, endpoint=fd.endpoint, transport=fd.transport,
                    priority=fd.priority,
                )  # fmt: skip
                try:
                    check_front_door(door)
                except DammError as exc:
                    # One bad door must not stop the whole region's catalog from being signed.
                    _log.warning(
                        "front door left out of catalog",
                        gateway=gw.gateway_id,
                        front_door=fd.front_door_id,
                        reason=exc.detail,
                    )
                    continue
                doors.append(door)
            assert gw.public_key is not None  # registered
            entry = CatalogGateway(
                id=gw.gateway_id, region=region, public_key=gw.public_key,
                front_doors=tuple(doors), egress_countries=tuple(countries),
            )  # fmt: skip
            try:
                check_gateway(entry)
            except DammError as exc:
                _log.warning(
                    "gateway left out of catalog", gateway=gw.gateway_id, reason=exc.detail
                )
                continue
            out.append(entry)
        out.sort(key=lambda g: g.id)
        return tuple(out)

    # --- publishing ---------------------------------------------------------------------------

    async def tick(self, now: float | None = None) -> list[Published]:
        """Publish each region whose catalog changed or nears expiry; return what was published.

        Raises ``not_leader`` when a newer leader's term refused the append (and steps down).
        """
        if not self.leads():
            return []
        async with self._lock:
            published: list[Published] = []
            for region in sorted(self.regions()):
                result = await self._publish_region(region, self.clock() if now is None else now)
                if result is not None:
                    published.append(result)
            return published

    async def _publish_region(self, region: str, now: float) -> Published | None:
        gateways = self.gateways_for(region, now)
        keyring = self.ctx.keyring
        next_keys: tuple[KeyAnnouncement, ...] = keyring.announcements() if keyring else ()
        signer = self.ctx.signer
        content: tuple[object, ...] = (signer.key_id, gateways, next_keys)
        term = self.leadership.term if self.leadership is not None else 0
        ttl = int(self.ctx.settings.catalog_ttl_s)
        attempts = Attempts()
        while True:
            previous = self.latest.get(region)
            if previous is None:
                previous = await self._load(region)
            if (
                previous.signed is not None
                and previous.content == content
                and now < previous.expires_at - ttl / 3
            ):
                return None
            if self.family_seq is None:
                self.family_seq = await self.ctx.store.last_seq(CATALOG_FAMILY)
            version = previous.version + 1
            catalog = build_catalog(
                region, gateways, version=version, now=int(now), ttl_seconds=ttl,
                next_keys=next_keys,
            )  # fmt: skip
            signed = signer.sign(catalog)
            encoded = encode_signed(signed)
            digest = digest_of(signed.payload)
            subject = catalog_subject(region)
            event = m.CatalogPublished(
                region=region, version=version, key_id=signed.key_id, digest=digest,
                expires_at=_utc(catalog.expires_at), term=term, signed=encoded,
                next_key_ids=tuple(k.key_id for k in next_keys),
            )  # fmt: skip
            call = Call(uuid.uuid4().hex, ACTOR)
            item = dataclasses.replace(
                self.ctx.append(
                    subject,
                    event,
                    call,
                    expected=self.family_seq,
                    msg_id=f"catalog:{region}:{version}:{term}",
                ),
                expected_subject=CATALOG_FAMILY,
            )
            try:
                result = await self.ctx.store.append(item)
            except ConflictError:
                result = None
            if result is None or result.duplicate:
                # Someone appended to the family meanwhile: a newer leader (then we are deposed)
                # or another publisher of this term. Take the log's state as the base and retry.
                await self._check_term()
                if (err := attempts.lost()) is not None:
                    raise DammError(err.code, f"catalog for {region}: {err.detail}")
                await attempts.pause()
                self.family_seq = await self.ctx.store.last_seq(CATALOG_FAMILY)
                self.latest[region] = await self._load(region)
                continue
            self.family_seq = result.seqs[0]
            self.ctx.absorb([item], result)
            current = Published(
                region=region, version=version, seq=result.seqs[0], digest=digest,
                expires_at=catalog.expires_at, content=content, signed=signed, encoded=encoded,
            )  # fmt: skip
            self.latest[region] = current
            _log.info(
                "catalog published",
                region=region,
                version=version,
                gateways=len(gateways),
                key_id=signed.key_id,
            )
            return current

    async def _check_term(self) -> None:
        """Step down if the log's latest leader term is not ours."""
        if self.leadership is None:
            return
        marker = await self.ctx.store.last(LEADER_TERM_SUBJECT)
        event = marker.event if marker is not None else None
        if isinstance(event, m.LeaderTermStarted) and event.term != self.leadership.term:
            self.leadership.depose(f"term {event.term} of {event.holder} began")
            raise DammError(Code.NOT_LEADER, f"catalogs: term {event.term} of {event.holder} began")

    async def _load(self, region: str) -> Published:
        """The last published version of a region from the log (0 if none)."""
        js = self.ctx.store.js
        try:
            raw = await js.get_last_msg(EVENTS_STREAM, catalog_subject(region))
        except NotFoundError:
            return Published(region=region, version=0, seq=0, digest="", expires_at=0)
        seq = int(raw.seq or 0)
        try:
            event: object = codec.decode(raw.data or b"", seq=seq).event
        except codec.CodecError:
            event = None
        if not isinstance(event, m.CatalogPublished):
            # Something else sits last on the subject (undecodable, or not a publication): build
            # on it, with the highest version the fold has seen, so versions never go back.
            _log.error(
                "catalog subject ends in a message that is not a publication",
                code=Code.UNDECODABLE_EVENT.slug,
                region=region,
                seq=seq,
            )
            version = self.ctx.state.catalog_versions.get(region, 0)
            return Published(region=region, version=version, seq=seq, digest="", expires_at=0)
        expires = int(event.expires_at.timestamp()) if event.expires_at else 0
        return Published(
            region=region, version=event.version, seq=seq, digest=event.digest, expires_at=expires
        )

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except DammError as exc:
                _log.warning("catalog not published", error=exc.line())
            except Exception:  # keep publishing; the next tick retries
                _log.exception("catalog publishing failed")
            # A key rotation is published at once, not a tick later: devices enrolled meanwhile
            # pin the new key and would not verify the previous catalog.
            seen = self.ctx.state.keyring.seq
            for _ in range(max(1, round(self.interval_s / KEYRING_POLL_S))):
                if self.ctx.state.keyring.seq != seen:
                    break
                await asyncio.sleep(KEYRING_POLL_S)


def _valid_region(region: str) -> bool:
    try:
        check_id(region, "region")
    except DammError:
        return False
    return True


def _utc(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
