"""What the orchestrator did, read back from its own step events in the log.

The fold is pure: which gateways it made (and through which provider), when a region last
scaled (for the cool-down), when each host was made (a host that never spoke is dead only past
the grace period), and which steps of each plan already succeeded (so a second apply of the
same plan skips them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from nats.aio.client import Client as NATS

from damm.events import model as m
from damm.reports.audit import AuditFilter, AuditReader
from damm.subjects import EVENT_PREFIX

STEP_EVENTS = (
    m.OrchestratorStepPlanned,
    m.OrchestratorStepStarted,
    m.OrchestratorStepSucceeded,
    m.OrchestratorStepFailed,
)


@dataclass
class History:
    managed: dict[str, str] = field(default_factory=dict)  # gateway id -> provider
    regions: dict[str, str] = field(default_factory=dict)  # gateway id -> region
    created_at: dict[str, datetime] = field(default_factory=dict)
    last_scaled: dict[str, datetime] = field(default_factory=dict)
    succeeded: dict[str, set[int]] = field(default_factory=dict)  # plan id -> steps
    planned: dict[str, set[int]] = field(default_factory=dict)

    def done(self, plan_id: str) -> set[int]:
        return self.succeeded.get(plan_id, set())


def _new_gateway(e: m.OrchestratorStepStarted | m.OrchestratorStepSucceeded) -> str | None:
    if e.action == "add_gateway":
        return e.target
    if e.action == "replace_gateway":
        return e.target.split("->", 1)[1]
    return None


def fold(envelopes: Iterable[m.Envelope]) -> History:
    h = History()
    for env in envelopes:
        e = env.event
        if isinstance(e, m.OrchestratorStepPlanned):
            h.planned.setdefault(e.plan_id, set()).add(e.step)
        elif isinstance(e, m.OrchestratorStepStarted) and (gid := _new_gateway(e)):
            h.managed[gid] = e.provider
            h.regions[gid] = e.region
            h.created_at.setdefault(gid, env.occurred_at)
        elif isinstance(e, m.OrchestratorStepSucceeded):
            h.succeeded.setdefault(e.plan_id, set()).add(e.step)
            if gid := _new_gateway(e):
                h.managed[gid] = e.provider
            if e.action in ("add_gateway", "retire_gateway") and e.region:
                h.last_scaled[e.region] = max(
                    env.occurred_at, h.last_scaled.get(e.region, env.occurred_at)
                )
    return h


@dataclass(frozen=True)
class _Orchestrator(AuditFilter):
    """Only the orchestrator's own subjects: the consumer never reads the rest of the log."""

    def subjects(self) -> list[str]:
        return [f"{EVENT_PREFIX}.orchestrator.>"]


async def read(nc: NATS) -> History:
    return fold([env async for env in AuditReader(nc).read(_Orchestrator())])
