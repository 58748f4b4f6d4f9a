"""The gateway agent: register, follow the peer set, reconcile WireGuard, heartbeat, meter usage.

The packet path never waits for the control plane: the interface keeps forwarding with the last
peer set it was given while NATS is away, the meter keeps counting, and reports queue on disk.
On reconnect the agent resyncs from a snapshot and sends what accrued.

Peer-set protocol: snapshot (``gateway.peers``, in pages) plus changes on ``damm.peers.<id>``,
each with ``prev_revision``. A change is applied only when it follows the agent's revision;
anything else (a gap, a reconnect, a restart, a heartbeat reply showing another revision)
triggers a resync.

Reconcile is incremental: the agent keeps what it applied and sends only the change, without
reading the interface. A full read verifies the interface on a timer and after any error, off
the change path. A peer leaving the set is cleared at once (no allowed IPs, so no packet passes)
and removed after the next metering read, so its usage stays exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS

from damm import log
from damm.agent import egress as nat
from damm.agent.identity import load_or_create_key
from damm.agent.ledger import UsageLedger
from damm.agent.metrics import measure
from damm.clock import cancel_and_wait, sleep_or_stop
from damm.errors import Code, DammError
from damm.metrics import AgentMetrics
from damm.protocol import messages as p
from damm.protocol.bus import connect
from damm.protocol.client import call
from damm.subjects import gateway_user, peers_subject
from damm.wireguard.base import InterfaceState, WireGuardBackend
from damm.wireguard.peer_diff import (
    Peer,
    PeerDiff,
    apply,
    change_diff,
    diff,
    peers_from,
    settle,
)

_log = log.get("damm.agent")

AGENT_VERSION = "damm-agent/0.1"
HEARTBEAT_GRACE_S = 1.0  # a change may be in flight when a heartbeat reply shows a newer revision
FATAL = (Code.UNAUTHORIZED, Code.INVALID_ARGUMENT, Code.MALFORMED_KEY, Code.MALFORMED_REQUEST)
# Refusals about one usage report's content, never about the gateway: only these drop a report.
REPORT_REFUSALS = (Code.INVALID_ARGUMENT, Code.MALFORMED_REQUEST, Code.REQUEST_TOO_LARGE)

_change_decoder = msgspec.json.Decoder(p.PeerSetChange)


@dataclass(frozen=True)
class AgentConfig:
    gateway_id: str
    token: str
    nats_url: str
    state_dir: Path
    listen_port: int = 51820
    nats_user: str | None = None  # default: the gateway's own user, gw-<id>
    nats_password: str | None = None  # default: the gateway token
    heartbeat_s: float = 10.0
    usage_s: float = 30.0
    reconcile_s: float = 60.0
    capacity: int = 1000
    request_timeout: float = 5.0


AppliedHook = Callable[[PeerDiff, float], None]
RegisteredHook = Callable[[p.Registered], Awaitable[None]]


class GatewayAgent:
    def __init__(
        self,
        config: AgentConfig,
        backend: WireGuardBackend,
        egress: nat.EgressReconciler | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.egress = egress  # None: this gateway does no source NAT
        self.revision = 0
        self.desired: dict[str, Peer] = {}
        # What the interface holds as far as our own applies go: desired plus cleared peers
        # waiting for their last metering read.
        self.applied: dict[str, Peer] = {}
        self.egress_of: dict[str, str] = {}  # public key -> egress address, from the peer set
        self.nat_index = nat.NatIndex()  # source -> egress of the desired peers, kept per change
        self._warned_no_egress = False
        self.public_key: str | None = None
        self.nc: NATS | None = None
        self.ledger = UsageLedger(config.state_dir)
        self.registered = asyncio.Event()
        self.registration: p.Registered | None = None
        self.synced = asyncio.Event()  # set after each successful snapshot resync
        self.on_applied: list[AppliedHook] = []
        # Runs once registration answered, before peers: the host sets its tunnel address here.
        self.on_registered: RegisteredHook | None = None
        self.resyncs = 0
        self._changes: deque[p.PeerSetChange] = deque()
        self._wake = asyncio.Event()
        self._need_resync = True
        self._need_verify = False
        self._settle_due = asyncio.Event()  # cleared peers wait for a metering read
        self._flush = asyncio.Event()
        self._wg = asyncio.Lock()
        self.metrics = AgentMetrics()
        self.metrics.follow(
            peers=lambda: len(self.desired),
            usage_reports_pending=lambda: len(self.ledger.pending),
            nats_connected=lambda: self.nc is not None and self.nc.is_connected,
        )

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        private, self.public_key = load_or_create_key(cfg.state_dir)
        state = await self.backend.read()
        if state.public_key != self.public_key or state.listen_port != cfg.listen_port:
            await self.backend.set_identity(private, cfg.listen_port)
        del private
        async with self._wg:  # bytes that moved while no agent was watching
            self._observe(await self.backend.read())
        log_ctx = _log.bind(gateway_id=cfg.gateway_id)
        log_ctx.info(
            "agent starting",
            public_key=self.public_key,
            listen_port=cfg.listen_port,
            peers=len(state.peers),
        )
        self.nc = await self._connect(stop)
        if self.nc is None:
            return
        try:
            await self.nc.subscribe(peers_subject(cfg.gateway_id), cb=self._on_change)
            if not await self._register(stop):
                return
            tasks = [
                asyncio.create_task(t)
                for t in (
                    self._peer_loop(),
                    self._settle_loop(),
                    self._heartbeat_loop(),
                    self._usage_loop(),
                )
            ]
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            await asyncio.gather(*(cancel_and_wait(t) for t in [waiter, *tasks]))
            for task in tasks:
                if task in done and not task.cancelled() and (exc := task.exception()):
                    raise exc
            with contextlib.suppress(Exception):  # last chance to report, bounded
                await asyncio.wait_for(self._meter_and_flush(), 2.0)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 2.0)

    async def _connect(self, stop: asyncio.Event) -> NATS | None:
        cfg = self.config

        async def disconnected() -> None:
            if stop.is_set():  # our own close on shutdown, not an outage
                return
            _log.warning(
                "nats disconnected; forwarding with the last peer set", revision=self.revision
            )

        async def reconnected() -> None:
            _log.info("nats reconnected; resyncing")
            self.request_resync()
            self._flush.set()

        # Each gateway logs in as itself (gw-<id>, its token as password) and reads replies on
        # its own inbox: the server lets it see its own peer set and nothing else.
        user = cfg.nats_user or gateway_user(cfg.gateway_id)
        password = cfg.nats_password if cfg.nats_password is not None else cfg.token
        delay = 0.5
        while not stop.is_set():
            try:
                return await connect(
                    cfg.nats_url,
                    user=user,
                    password=password,
                    name=f"damm-gateway-{cfg.gateway_id}",
                    on_disconnected=disconnected,
                    on_reconnected=reconnected,
                )
            except Exception as exc:  # nats raises many types for an unreachable server
                _log.warning("nats unreachable; retrying", error=repr(exc), retry_s=delay)
                await sleep_or_stop(delay, stop)
                delay = min(delay * 2, 10.0)
        return None

    async def _register(self, stop: asyncio.Event) -> bool:
        cfg = self.config
        assert self.public_key is not None
        request = p.RegisterGateway(
            gateway_id=cfg.gateway_id,
            token=cfg.token,
            public_key=self.public_key,
            listen_port=cfg.listen_port,
            agent_version=AGENT_VERSION,
        )
        while not stop.is_set():
            try:
                reply = await self._call("gateway.register", request, p.Registered)
            except DammError as err:
                if err.code in FATAL:
                    raise
                _log.warning("registration failed; retrying", error=err.line())
                await sleep_or_stop(1.0, stop)
                continue
            _log.info(
                "registered",
                gateway_id=reply.gateway_id,
                region=reply.region,
                gateway_address=reply.gateway_address,
            )
            self.registration = reply
            if self.egress is not None and self.egress.overlay != reply.overlay:
                self.egress.overlay = reply.overlay
                self.egress.applied = None  # the rule changes: next reconcile is a full one
            if self.on_registered is not None:
                await self.on_registered(reply)
            self.registered.set()
            return True
        return False

    async def _call(self, command: str, request: msgspec.Struct, result: type[Any]) -> Any:
        assert self.nc is not None
        if not self.nc.is_connected:
            raise DammError(Code.UNAVAILABLE, "not connected to NATS")
        try:
            return await call(
                self.nc, command, request, result, timeout=self.config.request_timeout
            )
        except nats.errors.Error as exc:
            raise DammError(Code.UNAVAILABLE, repr(exc)) from None

    # --- peer set --------------------------------------------------------------------------

    def request_resync(self) -> None:
        self._need_resync = True
        self._wake.set()

    async def _on_change(self, msg: Any) -> None:
        try:
            change = _change_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            # Not a change the control plane sent: ignore it. Resyncing on garbage would let
            # whoever sent it keep the agent resyncing forever; a real lost change still shows
            # as a revision gap or in the heartbeat's peer-set revision.
            _log.warning(
                "undecodable peer change ignored",
                code=Code.MALFORMED_REQUEST.slug,
                error=str(exc)[:200],
            )
            return
        if change.gateway_id == self.config.gateway_id:
            self._changes.append(change)
            self._wake.set()

    async def _peer_loop(self) -> None:
        while True:
            if self._need_resync:
                try:
                    await self.resync()
                except DammError as err:
                    if err.code in FATAL:
                        raise
                    self._need_resync = True
                    _log.warning("resync failed; retrying", error=err.line())
                    self._need_resync = True  # resync() cleared it before the call failed
                    await asyncio.sleep(1.0)
                    continue
            elif self._need_verify:
                try:
                    await self.verify()
                except DammError as err:
                    if err.code in FATAL:
                        raise
                    _log.warning("interface check failed; retrying", error=err.line())
                    await asyncio.sleep(1.0)
                    continue
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.reconcile_s)
            except TimeoutError:
                self._need_verify = True  # repair drift (peers added or lost behind our back)
                continue
            self._wake.clear()
            if not self._need_resync and self._changes:
                await self._apply_changes()

    async def verify(self) -> PeerDiff:
        """Read the whole interface and repair whatever differs from the peer set."""
        self._need_verify = True  # until it succeeds
        async with self._wg:
            change = await self._reconcile(self.desired)
        self._need_verify = False
        return change

    async def _snapshot(self) -> tuple[int, list[p.PeerEntry]]:
        """The whole peer set, page by page, and the revision of its first page.

        Pages read at later revisions already hold some later changes; applying the queued
        changes from the first page's revision on is still exact, because a change sets each
        key it touches to its final value.
        """
        cfg = self.config
        peers: list[p.PeerEntry] = []
        revision: int | None = None
        after: str | None = None
        while True:
            page: p.PeerSnapshot = await self._call(
                "gateway.peers",
                p.PeerSnapshotRequest(gateway_id=cfg.gateway_id, token=cfg.token, after=after),
                p.PeerSnapshot,
            )
            revision = page.revision if revision is None else min(revision, page.revision)
            peers.extend(page.peers)
            if page.next_after is None:
                return revision, peers
            if after is not None and page.next_after <= after:
                raise DammError(Code.INTERNAL, "peer-set pages do not move forward")
            after = page.next_after

    async def resync(self) -> None:
        self._need_resync = False
        revision, entries = await self._snapshot()
        desired = peers_from([(e.public_key, e.allowed_ips) for e in entries])
        async with self._wg:
            self.egress_of = {e.public_key: e.egress for e in entries if e.egress}
            change = await self._reconcile(desired)
            self.revision = revision
        self._need_verify = False
        self.resyncs += 1
        while self._changes and self._changes[0].revision <= self.revision:
            self._changes.popleft()
        _log.info("peer set resynced", revision=revision, peers=len(desired), diff=change.summary())
        self.synced.set()
        if self._changes:
            self._wake.set()

    async def _reconcile(self, desired: dict[str, Peer]) -> PeerDiff:
        """Full reconcile (caller holds the lock); meters from the same read before removals."""
        started = time.monotonic()
        self.desired = dict(desired)  # changes edit it in place
        self.nat_index = nat.NatIndex.of(
            {k: (peer.allowed_ips, self.egress_of.get(k)) for k, peer in desired.items()}
        )
        state = await self.backend.read()
        change = diff(state.configured_peers(), desired)
        if change.remove:  # their counters go with them: meter first (others keep theirs)
            self._observe(state)
        if not change.is_empty:
            await self.backend.apply(change)
            self._applied(change)
        self.applied = dict(desired)
        await self._nat(None)
        self.metrics.reconcile_seconds.labels("full").observe(time.monotonic() - started)
        return change

    def nat_map(self, peers: dict[str, Peer] | None = None) -> dict[str, str]:
        """Tunnel source → egress address for the peers we carry."""
        if peers is None:
            return dict(self.nat_index)
        return nat.desired_map(
            {k: (peer.allowed_ips, self.egress_of.get(k)) for k, peer in peers.items()}
        )

    async def _nat(self, touched: set[str] | None) -> None:
        """Bring the NAT map to the peer set: fully, or only for ``touched`` sources.

        A NAT failure is logged, not raised: WireGuard peers must still move, and the next
        periodic reconcile retries.
        """
        if self.egress is None:
            if self.egress_of and not self._warned_no_egress:
                self._warned_no_egress = True
                _log.warning(
                    "the peer set names egress addresses but source NAT is off (--egress)",
                    peers_with_egress=len(self.egress_of),
                )
            return
        want = self.nat_index
        try:
            if touched is None:
                plan = await self.egress.full(want)
            else:
                plan = await self.egress.change(want, touched)
        except DammError as err:
            _log.warning("egress NAT not applied", error=err.line())
            return
        if not plan.is_empty:
            _log.info("egress NAT applied", plan=plan.summary(), rules=len(want))

    async def _apply_changes(self) -> None:
        """Apply queued changes that follow our revision, as one diff over the touched keys.

        Costs what the change touches, not what the gateway carries: no interface read, no
        copy of the whole set.
        """
        final: dict[str, Peer | None] = {}  # touched key -> where it ends up (None: gone)
        egress: dict[str, str | None] = {}
        revision = self.revision
        removes = False
        while self._changes:
            ch = self._changes.popleft()
            if ch.revision <= revision and ch.prev_revision < revision:
                continue  # old news
            if ch.prev_revision != revision:
                _log.info(
                    "peer set gap; resyncing",
                    have=revision,
                    prev=ch.prev_revision,
                    revision=ch.revision,
                )
                self._changes.clear()
                self.request_resync()
                break
            for key in ch.removes:
                final[key] = None
                egress[key] = None
                removes = True
            for entry in ch.upserts:
                final[entry.public_key] = Peer.build(entry.public_key, entry.allowed_ips)
                egress[entry.public_key] = entry.egress
            revision = ch.revision
        if revision == self.revision and not final:
            return
        async with self._wg:
            started = time.monotonic()
            wanted = {k: peer for k, peer in final.items() if peer is not None}
            change = change_diff(self.applied, wanted, final)
            try:
                if not change.is_empty:
                    await self.backend.apply(change)
            except DammError as err:  # the interface state is unknown now: read it, off this path
                _log.warning("peer change not applied; checking the interface", error=err.line())
                self._need_verify = True
                self._wake.set()
            else:
                for key in change.remove:
                    self.applied.pop(key, None)
                for peer in (*change.update, *change.add):
                    self.applied[peer.public_key] = peer
                if not change.is_empty:
                    self._applied(change)
            if removes:
                self._settle_due.set()
            sources = {
                src
                for peer in (*(self.desired.get(k) for k in final), *wanted.values())
                if peer is not None and (src := nat.source_of(peer.allowed_ips)) is not None
            }
            for key, ends in final.items():
                if ends is None:
                    self.desired.pop(key, None)
                    sources |= self.nat_index.drop(key)
                else:
                    self.desired[key] = ends
                    sources |= self.nat_index.put(key, ends.allowed_ips, egress[key])
                address = egress[key]
                if address is None:
                    self.egress_of.pop(key, None)
                else:
                    self.egress_of[key] = address
            self.revision = revision
            await self._nat(sources)
            self.metrics.reconcile_seconds.labels("changes").observe(time.monotonic() - started)

    def _applied(self, change: PeerDiff) -> None:
        now = time.monotonic()
        _log.info("peers applied", diff=change.summary(), revision=self.revision)
        for hook in self.on_applied:
            hook(change, now)

    # --- heartbeats ------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        cfg = self.config
        while True:
            try:
                await self.heartbeat()
            except DammError as err:
                if err.code is Code.GATEWAY_NOT_REGISTERED:
                    self.registered.clear()
                    await self._register(asyncio.Event())
                elif err.code in FATAL:
                    raise
                else:
                    _log.info("heartbeat not delivered", error=err.line())
            await asyncio.sleep(cfg.heartbeat_s)

    async def heartbeat(self) -> p.HeartbeatAck:
        cfg = self.config
        m = measure(await self.backend.read(), cfg.capacity)
        ack: p.HeartbeatAck = await self._call(
            "gateway.heartbeat",
            p.Heartbeat(
                gateway_id=cfg.gateway_id,
                token=cfg.token,
                peer_count=m.peer_count,
                active_peers=m.active_peers,
                rx_bytes=m.rx_bytes,
                tx_bytes=m.tx_bytes,
                load=m.load,
                peer_set_revision=self.revision,
            ),
            p.HeartbeatAck,
        )
        if ack.peer_set_revision != self.revision:
            await asyncio.sleep(HEARTBEAT_GRACE_S)
            if ack.peer_set_revision != self.revision:
                _log.info(
                    "heartbeat shows another peer-set revision; resyncing",
                    have=self.revision,
                    control=ack.peer_set_revision,
                )
                self.request_resync()
        return ack

    # --- usage -----------------------------------------------------------------------------

    def _observe(self, state: InterfaceState) -> None:
        readings = {k: (s.rx_bytes, s.tx_bytes) for k, s in state.peers.items()}
        queued = self.ledger.record(readings, datetime.now(UTC))
        if queued:
            _log.debug("usage measured", bytes=queued, pending=len(self.ledger.pending))

    async def _usage_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush.wait(), self.config.usage_s)
            self._flush.clear()
            await self._meter_and_flush()

    async def _meter_and_flush(self) -> None:
        await self.meter_and_settle()
        await self.flush_usage()

    async def meter_and_settle(self) -> None:
        """Meter the whole interface, then remove the peers cleared since the last reading."""
        async with self._wg:
            self._observe(await self.backend.read())
            await self._settle()

    async def _settle_loop(self) -> None:
        """Removals finish here, off the change path; removals close together share one read."""
        while True:
            await self._settle_due.wait()
            self._settle_due.clear()
            try:
                await self.meter_and_settle()
            except DammError as err:
                _log.warning("cleared peers not metered; checking the interface", error=err.line())
                self._need_verify = True
                self._wake.set()

    async def _settle(self) -> None:
        """Remove the cleared peers; the caller holds the lock and has just metered them."""
        change = settle(self.applied, self.desired)
        if change.is_empty:
            return
        try:
            await self.backend.apply(change)
        except DammError as err:
            _log.warning("cleared peers not removed; checking the interface", error=err.line())
            self._need_verify = True
            self._wake.set()
            return
        self.applied = apply(self.applied, change)
        self._applied(change)

    async def flush_usage(self) -> int:
        """Send pending reports oldest first; stop at the first one the bus cannot take."""
        cfg = self.config
        sent = 0
        for report in list(self.ledger.pending):
            try:
                await self._call(
                    "gateway.usage",
                    p.ReportUsage(
                        gateway_id=cfg.gateway_id,
                        token=cfg.token,
                        report_id=report.report_id,
                        entries=report.entries,
                        measured_at=report.measured_at,
                        ledger_id=self.ledger.ledger_id if report.report_seq else "",
                        report_seq=report.report_seq,
                    ),
                    p.Done,
                )
            except DammError as err:
                if err.code not in REPORT_REFUSALS:
                    # Retryable, or about the gateway itself (a bad token): the bytes are real,
                    # keep every report until the gateway can be heard again.
                    _log.warning(
                        "usage report kept for later",
                        error=err.line(),
                        pending=len(self.ledger.pending),
                    )
                    return sent
                _log.error(
                    "usage report refused; dropped", report_id=report.report_id, error=err.line()
                )
            self.ledger.sent(report.report_id)
            sent += 1
        return sent
