"""Suspend active devices whose key is past its tier's lifetime (policy, only on the leader)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from damm import log
from damm.clock import sleep_or_stop
from damm.control.context import Context
from damm.control.leadership import Leadership
from damm.domain.lifecycle import KEY_EXPIRED
from damm.errors import DammError
from damm.events import model as m
from damm.events.model import Actor
from damm.events.store import Append
from damm.protocol.router import Call
from damm.subjects import event_subject

_log = log.get("damm.key_expiry")

POLICY_ACTOR = Actor("policy", "key_lifetime")


class KeyExpiryReactor:
    """Suspend active devices whose key is past its lifetime (policy, only on the leader).

    A key rotation lifts the suspension (the fold turns ``key_expired`` back into active).
    """

    def __init__(
        self,
        ctx: Context,
        leadership: Leadership,
        *,
        interval_s: float = 1.0,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.ctx = ctx
        self.leadership = leadership
        self.interval_s = interval_s
        self.now = now or ctx.now

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.leadership.is_leader:
                try:
                    await self.sweep()
                except Exception:
                    _log.exception("key expiry sweep failed")
            await sleep_or_stop(self.interval_s, stop)

    def due(self) -> list[str]:
        """Devices whose key is past its lifetime, popped from the fold's expiry heap."""
        return self.ctx.state.due_keys(self.now())

    async def sweep(self) -> int:
        suspended = 0
        due = self.due()
        for i, device_id in enumerate(due):
            subject = event_subject("device", device_id)
            call = Call(f"key-expiry-{device_id}", POLICY_ACTOR)

            def decide(
                device_id: str = device_id, subject: str = subject, call: Call = call
            ) -> list[Append]:
                dev = self.ctx.state.devices[device_id]
                expires = dev.key_expires_at
                if dev.status != "active" or expires is None or expires > self.now():
                    return []
                return [
                    self.ctx.append(
                        subject,
                        m.DeviceSuspended(device_id=device_id, reason=KEY_EXPIRED),
                        call,
                        expected=self.ctx.state.seq_of(subject),
                    )
                ]

            try:
                result = await self.ctx.commit(decide)
            except DammError as err:
                _log.warning("key expiry not recorded", device_id=device_id, error=err.line())
                self.ctx.state.expiry_pending(device_id)  # try again on the next sweep
                continue
            except BaseException:
                for rest in due[i:]:  # the bus failed or we are stopping: keep them due
                    self.ctx.state.expiry_pending(rest)
                raise
            if result.seqs:
                suspended += 1
                _log.info("device suspended", device_id=device_id, reason=KEY_EXPIRED)
        return suspended
