"""Quota policy: suspend devices over their tier's byte limit, resume them when that stops.

A reactor (a projector that appends events). Every ``interval_s`` it reads the usage read model
(``usage_totals`` for the current period joined with ``devices`` and ``tiers``) and decides from
the decision state, appending through ``Context.commit`` with the device subject's expected
sequence, so two control-plane processes cannot both act and a repeated sweep changes nothing.

The rules (the whole policy):

- **Over** means ``rx_bytes + tx_bytes > byte_limit`` for the current period (calendar month of
  ``now``, UTC). Usage exactly *at* the limit is not over: the limit is the amount a tier may
  use, so a device that used precisely its allowance keeps working. A tier without a byte limit
  has no quota.
- An **active** device that is over is suspended: ``DeviceSuspended(reason="over_quota")`` with
  actor ``policy:quota``. Already suspended or revoked devices are left alone (idempotent; an
  admin suspension is never rewritten as over_quota).
- A device suspended with reason ``over_quota`` whose current-period usage is no longer over is
  resumed by the policy: reason ``new_period`` when the suspension happened in an earlier period
  (month rollover), else ``under_quota`` (an operator reset its usage or raised the tier limit).
- An **admin resume** of a device still over its limit is refused by the handler with
  ``over_quota`` (it would not stick: the next sweep would suspend it again). To let a device
  back in for the rest of the period, an operator resets its usage (``damm admin usage reset``)
  — which alone is enough, the policy resumes it — or raises the tier's byte limit.
- The read model lags the log. The reactor only acts on a device once the read models have
  applied every event on that device's subject and on its usage-reset subject (the ``readmodels``
  checkpoint is at or past both), so a fresh reset or resume is never judged on stale totals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import asyncpg

from damm import log, settings
from damm.clock import sleep_or_stop
from damm.control.context import Context
from damm.domain.lifecycle import OVER_QUOTA
from damm.domain.periods import period_at
from damm.errors import DammError
from damm.events import model as m
from damm.events.store import Append
from damm.protocol.router import Call
from damm.settings import UsagePeriod
from damm.subjects import event_subject, usage_reset_subject

_log = log.get("damm.quota")

QUOTA_ACTOR = m.Actor("policy", "quota")
NEW_PERIOD = "new_period"
UNDER_QUOTA = "under_quota"
READMODELS = "readmodels"


class _Leader(Protocol):
    is_leader: bool


def is_over(used: int, limit: int | None) -> bool:
    """Strictly over: exactly at the limit is still within quota; no limit, no quota."""
    return limit is not None and used > limit


@dataclass(frozen=True, slots=True)
class Candidate:
    """One device the policy may act on, as the read model sees it."""

    device_id: str
    status: str
    reason: str
    byte_limit: int | None
    used: int
    suspended_at: datetime


@dataclass(frozen=True, slots=True)
class Action:
    device_id: str
    event: m.DeviceSuspended | m.DeviceResumed


_CANDIDATES = """
SELECT d.device_id, d.status, coalesce(d.status_reason, '') AS reason, t.byte_limit,
       coalesce(u.rx_bytes + u.tx_bytes, 0) AS used, d.updated_at
FROM devices d
JOIN tiers t ON t.tier = d.tier
LEFT JOIN usage_totals u ON u.device_id = d.device_id AND u.period = $1
WHERE (d.status = 'active' AND t.byte_limit IS NOT NULL
       AND coalesce(u.rx_bytes + u.tx_bytes, 0) > t.byte_limit)
   OR (d.status = 'suspended' AND d.status_reason = 'over_quota')
"""


def decide(candidates: list[Candidate], period: str, kind: UsagePeriod = "month") -> list[Action]:
    """Pure policy: what to append for these read-model rows in ``period``."""
    out: list[Action] = []
    for c in candidates:
        over = is_over(c.used, c.byte_limit)
        if c.status == "active" and over:
            out.append(
                Action(c.device_id, m.DeviceSuspended(device_id=c.device_id, reason=OVER_QUOTA))
            )
        elif c.status == "suspended" and c.reason == OVER_QUOTA and not over:
            reason = NEW_PERIOD if period_at(c.suspended_at, kind) != period else UNDER_QUOTA
            out.append(Action(c.device_id, m.DeviceResumed(device_id=c.device_id, reason=reason)))
    return out


class QuotaReactor:
    def __init__(
        self,
        ctx: Context,
        dsn: str,
        *,
        schema: str = "damm",
        interval_s: float = 0.5,
        now: Callable[[], datetime] | None = None,
        leadership: _Leader | None = None,
    ) -> None:
        self.ctx = ctx
        self.dsn = dsn
        self.schema = schema
        self.interval_s = interval_s
        self._swept: tuple[int, str] | None = None  # (checkpoint, period) of the last full pass
        self.now = now or ctx.now
        self.leadership = leadership
        self.sweeps = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, stop: asyncio.Event | None = None) -> asyncio.Task[None]:
        """Run in the background until ``stop`` (or ``self.stop()``)."""
        self._task = asyncio.create_task(self.run(stop or self._stop))
        return self._task

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def run(self, stop: asyncio.Event) -> None:
        conn: Any = None
        try:
            while not stop.is_set() and not self._stop.is_set():
                if self.leadership is None or self.leadership.is_leader:
                    try:
                        if conn is None or conn.is_closed():
                            conn = await asyncpg.connect(
                                self.dsn, server_settings={"search_path": self.schema}
                            )
                        await self.sweep(conn)
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                        _log.warning("quota sweep failed", error=repr(exc))
                        conn = None
                    except Exception:
                        _log.exception("quota sweep failed")
                await sleep_or_stop(self.interval_s, stop, self._stop)
        finally:
            if conn is not None and not conn.is_closed():
                await conn.close()

    # --- one pass -----------------------------------------------------------------------------

    async def sweep(self, conn: Any) -> list[Action]:
        """Read the model, decide, append; return what was appended."""
        kind = settings.usage_period()
        period = period_at(self.now(), kind)
        applied = int(
            await conn.fetchval(
                "SELECT coalesce(max(last_seq), 0) FROM checkpoint WHERE projector = $1", READMODELS
            )
            or 0
        )
        if (applied, period) == self._swept:
            # Nothing projected and no new period since the last full pass: every input of the
            # decision is unchanged, so skip the scan over all devices.
            self.sweeps += 1
            return []
        rows = await conn.fetch(_CANDIDATES, period)
        candidates = [
            Candidate(
                r["device_id"],
                r["status"],
                r["reason"],
                r["byte_limit"],
                int(r["used"]),
                r["updated_at"],
            )
            for r in rows
            if self._settled(r["device_id"], applied)
        ]
        done: list[Action] = []
        for action in decide(candidates, period, kind):
            if await self._append(action):
                done.append(action)
        self._swept = (applied, period)
        self.sweeps += 1
        return done

    def _settled(self, device_id: str, applied: int) -> bool:
        state = self.ctx.state
        return (
            state.seq_of(event_subject("device", device_id)) <= applied
            and state.seq_of(usage_reset_subject(device_id)) <= applied
        )

    async def _append(self, action: Action) -> bool:
        subject = event_subject("device", action.device_id)
        event = action.event
        want_status = "active" if isinstance(event, m.DeviceSuspended) else "suspended"
        call = Call(f"quota-{action.device_id}-{self.ctx.state.seq_of(subject)}", QUOTA_ACTOR)

        def decide_now() -> list[Append]:
            dev = self.ctx.state.devices.get(action.device_id)
            if dev is None or dev.status != want_status:
                return []
            if isinstance(event, m.DeviceResumed) and dev.reason != OVER_QUOTA:
                return []
            return [self.ctx.append(subject, event, call, expected=self.ctx.state.seq_of(subject))]

        try:
            result = await self.ctx.commit(decide_now)
        except DammError as err:
            _log.warning(
                "quota decision not recorded", device_id=action.device_id, error=err.line()
            )
            return False
        if result.seqs and not result.duplicate:
            _log.info(
                "quota",
                device_id=action.device_id,
                decision=type(event).__name__,
                reason=event.reason,
            )
            return True
        return False
