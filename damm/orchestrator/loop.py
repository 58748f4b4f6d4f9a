"""Plan, apply, and ``run``: the reconcile loop, level-triggered like a Kubernetes controller.

Each round observes the whole fleet afresh and plans; it never remembers what it meant to do.
A round with nothing to do writes nothing. A round with work takes the orchestrator lease first
(an event appended with an expected subject sequence, through the control plane), so when
several loops run, one acts and the others see ``lease_held`` and wait for the next round.
Rounds start at most once per ``interval_s``; each apply is bounded by the change budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from nats.aio.client import Client as NATS

from damm import log
from damm.errors import Code, DammError
from damm.orchestrator import actions as a
from damm.orchestrator.apply import Applier, StepResult, load_secret
from damm.orchestrator.observe import observe
from damm.orchestrator.plan import plan, stale_reason
from damm.orchestrator.providers.base import Provider
from damm.orchestrator.providers.exec import ExecProvider
from damm.orchestrator.providers.netns import NetnsProvider
from damm.orchestrator.topology import Topology
from damm.protocol import messages as p
from damm.protocol.client import call

_log = log.get("damm.orchestrator.loop")

LEASE_NAME = "fleet"


def build_providers(topology: Topology, state_dir: Path) -> dict[str, Provider]:
    out: dict[str, Provider] = {}
    for name, spec in topology.providers.items():
        if spec.kind == "netns":
            out[name] = NetnsProvider(name, spec, state_dir / "providers" / name)
        else:
            out[name] = ExecProvider(name, spec)
    return out


def default_holder() -> str:
    return f"{socket.gethostname()[:40]}-{uuid.uuid4().hex[:8]}".replace(".", "-")


@dataclass
class Orchestrator:
    nc: NATS
    database_url: str
    topology: Topology
    providers: Mapping[str, Provider]
    state_dir: Path
    agent_nats_url: str
    heartbeat_ttl_s: float = 90.0
    holder: str = field(default_factory=default_holder)

    async def plan(self, now: datetime | None = None) -> a.Plan:
        now = now or datetime.now(UTC)
        fleet, rep, _ = await observe(
            self.nc, self.database_url, self.providers, heartbeat_ttl_s=self.heartbeat_ttl_s,
            now=now,
        )  # fmt: skip
        return plan(self.topology, fleet, rep.recommendations, now)

    async def check_fresh(self, saved: a.Plan) -> None:
        now = datetime.now(UTC)
        fleet, _, _ = await observe(
            self.nc, self.database_url, self.providers, heartbeat_ttl_s=self.heartbeat_ttl_s,
            now=now,
        )  # fmt: skip
        why = stale_reason(saved, self.topology, fleet)
        if why is not None:
            raise DammError(Code.PLAN_STALE, f"plan {saved.plan_id}: {why}")

    async def apply(self, saved: a.Plan) -> list[StepResult]:
        secret = await asyncio.to_thread(load_secret, self.state_dir)
        applier = Applier(self.nc, self.providers, secret, self.agent_nats_url)
        return await applier.apply(saved)

    async def take_lease(self, ttl_s: float) -> None:
        await call(
            self.nc,
            "orchestrator.lease",
            p.TakeLease(name=LEASE_NAME, holder=self.holder, ttl_s=ttl_s),
            p.LeaseTaken,
        )

    async def round(self, lease_ttl_s: float) -> tuple[a.Plan, list[StepResult]]:
        """One level-triggered pass: observe, plan, and act only when there is work."""
        current = await self.plan()
        if not current.actions:
            return current, []
        await self.take_lease(lease_ttl_s)
        return current, await self.apply(current)

    async def run(
        self,
        stop: asyncio.Event,
        *,
        interval_s: float = 10.0,
        lease_ttl_s: float = 60.0,
        max_rounds: int | None = None,
    ) -> int:
        """Reconcile until ``stop``; returns the number of rounds that acted."""
        acted = 0
        rounds = 0
        loop = asyncio.get_running_loop()
        while not stop.is_set() and (max_rounds is None or rounds < max_rounds):
            started = loop.time()
            rounds += 1
            try:
                current, results = await self.round(lease_ttl_s)
            except DammError as err:
                level = "info" if err.code is Code.LEASE_HELD else "warning"
                getattr(_log, level)("round skipped", error=err.line())
            else:
                if results:
                    acted += 1
                    _log.info(
                        "round applied",
                        plan_id=current.plan_id,
                        steps=[(r.step, a.kind_of(r.action), r.outcome) for r in results],
                        refused=[r.code for r in current.refusals],
                    )
            rest = interval_s - (loop.time() - started)
            if rest > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), rest)
        return acted
