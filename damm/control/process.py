"""The control plane process: handlers, decision state, appends and projectors.

Each of them has its own NATS connection. Outside parties decide how much arrives on the request
subjects; if one connection carried everything, a flood there could get it cut as a slow
consumer and take the follower and every append with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import asyncpg
import nats.js.errors
from nats.aio.client import Client as NATS

from damm import log
from damm.clock import Clock, system_clock
from damm.control.callout import CalloutService
from damm.control.context import Context
from damm.control.follower import StateFollower
from damm.control.handlers.admin import AdminHandlers
from damm.control.handlers.devices import DeviceHandlers
from damm.control.handlers.enrollment import EnrollmentCommitter
from damm.control.handlers.gateway import GatewayHandlers
from damm.control.handlers.orchestrator import OrchestratorHandlers
from damm.control.handlers.peer_snapshot import PeerSetHandlers
from damm.control.handlers.signing_keys import SigningKeys, ensure_keys
from damm.control.keyring import Keyring
from damm.control.leadership import Leadership
from damm.control.publishers.catalogs import CatalogPublisher
from damm.control.publishers.peer_changes import PeerPublisher
from damm.control.reactors.key_expiry import KeyExpiryReactor
from damm.control.reactors.quota import QuotaReactor
from damm.control.snapshots import SnapshotStore, SnapshotWriter, start_state
from damm.control.state import DecisionState
from damm.errors import Code, DammError
from damm.events.store import EventStore
from damm.events.streams import ensure_streams
from damm.metrics import ControlMetrics
from damm.projections.migrate import migrate
from damm.projections.runner import Projector
from damm.protocol.bus import connect
from damm.protocol.router import Service
from damm.settings import ControlSettings
from damm.subjects import EVENTS_STREAM, TELEMETRY_STREAM

_log = log.get("damm.control.process")


@dataclass
class ControlPlane:
    nats_url: str
    database_url: str
    settings: ControlSettings
    user: str | None = "control"
    password: str | None = None
    schema: str = "damm"
    run_projectors: bool = True
    stream_replicas: int = 1
    clock: Clock = system_clock
    nc: NATS | None = None  # appends and publishing: the log's writer
    service_nc: NATS | None = None  # requests in, replies out
    follow_nc: NATS | None = None  # the decision state's ordered consumers
    project_nc: NATS | None = None  # the projectors' pulls
    ctx: Context | None = None
    projectors: list[Projector] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _service: Service | None = None
    _committer: EnrollmentCommitter | None = None
    _follower: StateFollower | None = None
    leadership: Leadership | None = None
    publisher: PeerPublisher | None = None
    quota: QuotaReactor | None = None
    catalogs: CatalogPublisher | None = None
    metrics: ControlMetrics = field(default_factory=ControlMetrics)
    snapshots: SnapshotWriter | None = None
    started_from: int = 0  # the snapshot's sequence this process started from (0: none)
    # The auth callout's issuer seed: when given, this process decides outside connections
    # (damm.control.callout) and trusts the server's Nats-Request-Info on requests.
    callout_seed: bytes | None = None
    callout: CalloutService | None = None
    callout_nc: NATS | None = None
    signing_keys: SigningKeys | None = None
    lease_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        kek = self.settings.kek
        if kek is None:
            raise DammError(Code.KEK_MISSING)
        self.nc = await connect(
            self.nats_url, user=self.user, password=self.password, name="damm-control-log"
        )
        self.service_nc = await connect(
            self.nats_url, user=self.user, password=self.password, name="damm-control-requests"
        )
        self.follow_nc = await connect(
            self.nats_url,
            user=self.user,
            password=self.password,
            name="damm-control-follower",
            on_reconnected=self._reconnected,
        )
        await ensure_streams(self.nc.jetstream(), self.stream_replicas)
        conn = await asyncpg.connect(self.database_url)
        try:
            applied = await migrate(conn, self.schema)
        finally:
            await conn.close()
        if applied:
            _log.info("migrated read models", applied=applied)
        state = DecisionState(
            self.settings.overlay, gateway_capacity=self.settings.gateway_capacity
        )
        js = self.nc.jetstream()
        snapshots = SnapshotStore(js)
        last_seq = int((await js.stream_info(EVENTS_STREAM)).state.last_seq)
        after = self.started_from = await start_state(snapshots, state, last_seq)
        self._follower = StateFollower(
            self.follow_nc, state, sync_timeout_s=self.settings.sync_timeout_s
        )
        # Nothing below serves a request or publishes before this returns: no partial fold.
        await self._follower.start(after_seq=after)
        store = EventStore(self.nc, metrics=self.metrics)
        self.ctx = Context(
            store,
            state,
            self._follower,
            self.settings,
            None,
            None,
            clock=self.clock,
            keyring=Keyring(state, kek),
        )
        await ensure_keys(self.ctx, kek, self.settings.keys_dir)
        self._committer = EnrollmentCommitter(self.ctx)
        self._committer.start()
        # Catalogs, peer-set changes and policy reactors come from one process: the lease holder.
        self.leadership = Leadership(
            self.nc,
            store,
            self.schema,
            ttl_s=self.settings.lease_ttl_s,
            renew_s=self.settings.lease_renew_s,
        )
        nc, leadership = self.nc, self.leadership
        self.metrics.follow(
            leader=lambda: leadership.is_leader,
            nats_connected=lambda: nc.is_connected,
            enrollments=lambda: len(state.devices),
        )
        self.lease_task = asyncio.create_task(self.leadership.run(self._stop))
        self._tasks.append(self.lease_task)
        self.publisher = PeerPublisher(self.nc, state, self.leadership)
        self.publisher.start()
        self._tasks.append(
            asyncio.create_task(KeyExpiryReactor(self.ctx, self.leadership).run(self._stop))
        )
        leadership = self.leadership
        self.snapshots = SnapshotWriter(
            state,
            self._follower,
            snapshots,
            is_leader=lambda: leadership.is_leader,
            interval_s=self.settings.snapshot_interval_s,
            min_events=self.settings.snapshot_min_events,
        )
        self.snapshots.last_seq = after
        self._tasks.append(asyncio.create_task(self.snapshots.run(self._stop)))
        self.quota = QuotaReactor(
            self.ctx, self.database_url, schema=self.schema, leadership=self.leadership
        )
        self._tasks.append(self.quota.start(self._stop))
        self.catalogs = CatalogPublisher(self.ctx, self.leadership)
        self.signing_keys = signing_keys = SigningKeys(self.ctx, kek)
        routes = [
            *AdminHandlers(self.ctx).routes(),
            *self._committer.routes(),
            *GatewayHandlers(self.ctx).routes(),
            *DeviceHandlers(self.ctx).routes(),
            *PeerSetHandlers(self.ctx, self.nc.max_payload).routes(),
            *self.catalogs.routes(),
            *signing_keys.routes(),
            *OrchestratorHandlers(self.ctx).routes(),
        ]
        self._service = Service(
            self.service_nc,
            routes,
            metrics=self.metrics,
            trust_request_info=self.callout_seed is not None,
            per_connection=self.settings.throttle_connection,
            per_source=self.settings.throttle_source,
        )
        await self._service.start()
        if self.callout_seed is not None:
            self.callout_nc = await connect(
                self.nats_url, user=self.user, password=self.password, name="damm-callout"
            )
            self.callout = CalloutService(self.callout_nc, state, self.callout_seed)
            await self.callout.start()
        self.catalogs.start()
        if self.run_projectors:
            m = self.metrics
            self.project_nc = await connect(
                self.nats_url,
                user=self.user,
                password=self.password,
                name="damm-control-projectors",
            )
            self.projectors = [
                Projector("readmodels", EVENTS_STREAM, self.database_url, self.schema, metrics=m),
                Projector("telemetry", TELEMETRY_STREAM, self.database_url, self.schema, metrics=m),
            ]
            for projector in self.projectors:
                self._tasks.append(asyncio.create_task(projector.run(self.project_nc, self._stop)))
        _log.info("control plane ready", routes=len(routes), applied_seq=state.applied_seq)

    async def _reconnected(self) -> None:
        if self._follower is not None:
            self._follower.reconnected()

    async def wait_projected(self, timeout: float = 10.0) -> None:
        """Wait until the read models hold everything in the event stream now (tests, CLI)."""
        assert self.nc is not None
        js = self.nc.jetstream()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                info = await js.stream_info(EVENTS_STREAM)
                break
            except nats.js.errors.ServiceUnavailableError:
                # nats-server reloads its configuration when a gateway user is added, and its
                # JetStream API does not answer for a moment: wait that out, as audit reads do.
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)
        target = int(info.state.last_seq)
        while any(p.applied_seq < target for p in self.projectors[:1]):
            if loop.time() > deadline:
                raise TimeoutError(f"projection stuck below {target}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self.callout:
            await self.callout.stop()
        if self.callout_nc:
            await self.callout_nc.drain()
        if self._service:
            await self._service.stop()
        if self._committer:
            await self._committer.stop()
        if self.publisher:
            await self.publisher.stop()
        if self.catalogs:
            await self.catalogs.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._follower:
            await self._follower.stop()
        for nc in (self.service_nc, self.project_nc, self.follow_nc, self.nc):
            if nc is not None and not nc.is_closed:
                try:
                    await asyncio.wait_for(nc.drain(), 5)
                except Exception:  # unreachable server: nothing left to flush
                    with contextlib.suppress(Exception):
                        await nc.close()
