"""Usage that has been measured but not yet acknowledged, kept on disk with the meter state.

The meter's last readings and the unsent reports live in ONE file written atomically, so a
crash at any point leaves either both before or both after an observation: a restart neither
recounts bytes (meter state advanced) nor loses them (their report is still pending). Each
report has a stable id, so a report resent after a lost reply is recorded once (server dedupe).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from damm import log
from damm.agent.usage import Counters, UsageMeter
from damm.private_files import write_atomic
from damm.protocol.messages import UsageEntry

_log = log.get("damm.agent.ledger")

LEDGER_FILE = "usage.json"
MAX_ENTRIES_PER_REPORT = 1000


class PendingReport(msgspec.Struct, frozen=True):
    report_id: str
    measured_at: datetime
    entries: tuple[UsageEntry, ...]
    report_seq: int = 0


class _LedgerFile(msgspec.Struct):
    meter: dict[str, Any]
    pending: list[PendingReport] = msgspec.field(default_factory=list)
    # Reports are numbered per ledger, so the control plane dedupes them forever with one
    # integer per ledger instead of remembering every report id.
    ledger_id: str = ""
    last_seq: int = 0


class UsageLedger:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LEDGER_FILE
        self.pending: list[PendingReport] = []
        self.ledger_id = uuid.uuid4().hex
        self.last_seq = 0
        if self.path.exists():
            data = msgspec.json.decode(self.path.read_bytes(), type=_LedgerFile)
            self.meter = UsageMeter.from_state(data.meter)
            self.pending = list(data.pending)
            if data.ledger_id:
                self.ledger_id, self.last_seq = data.ledger_id, data.last_seq
        else:
            self.meter = UsageMeter()

    def record(self, readings: Mapping[str, Counters], now: datetime | None = None) -> int:
        """Feed one full reading; queue what moved as reports; return the bytes queued."""
        before = set(self.meter.export_state()["peers"])
        deltas = self.meter.observe(readings)
        when = now or datetime.now(UTC)
        items = sorted(deltas.items())
        for start in range(0, len(items), MAX_ENTRIES_PER_REPORT):
            chunk = items[start : start + MAX_ENTRIES_PER_REPORT]
            self.last_seq += 1
            self.pending.append(
                PendingReport(
                    uuid.uuid4().hex,
                    when,
                    tuple(UsageEntry(key, rx, tx) for key, (rx, tx) in chunk),
                    self.last_seq,
                )
            )
        if deltas or before != set(readings):
            self.save()
        return sum(rx + tx for rx, tx in deltas.values())

    def sent(self, report_id: str) -> None:
        self.pending = [r for r in self.pending if r.report_id != report_id]
        self.save()

    def save(self) -> None:
        data = _LedgerFile(self.meter.export_state(), self.pending, self.ledger_id, self.last_seq)
        write_atomic(self.path, msgspec.json.encode(data).decode(), 0o600)
