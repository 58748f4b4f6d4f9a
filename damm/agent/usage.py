"""Turn WireGuard's cumulative transfer counters into per-peer usage deltas.

WireGuard only reports totals since a peer was (re)configured, and those totals go back to zero
whenever the peer is removed and re-added or the interface restarts. Quotas are enforced on the
sum of the deltas the agent reports, so the meter's one job is to make that sum honest: never
negative, never counting the same bytes twice, and surviving an agent restart (state export).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from damm.errors import Code, DammError

Counters = tuple[int, int]  # (rx_bytes, tx_bytes)

STATE_VERSION = 1


class UsageMeter:
    """Remembers the last reading per peer and reports what moved since.

    A reading where either counter went down means the peer's counters restarted from zero
    (both counters restart together), so the whole new value is the delta for both directions.
    Treating rx and tx separately would undercount the direction that had already grown back
    past its old total.

    ``count_new_from_zero``: a peer first seen with non-zero counters is usually a peer just
    added (it started at 0, so everything on it is new usage). Turn it off when adopting an
    interface whose history was already reported elsewhere, to start from a baseline instead.
    """

    def __init__(self, *, count_new_from_zero: bool = True) -> None:
        self.count_new_from_zero = count_new_from_zero
        self._last: dict[str, Counters] = {}

    def observe(self, readings: Mapping[str, Counters]) -> dict[str, Counters]:
        """Feed one full reading of the interface; returns the non-zero deltas per peer.

        Peers missing from the reading are forgotten: if they come back, WireGuard will have
        restarted their counters, and so does the meter.
        """
        deltas: dict[str, Counters] = {}
        last = self._last
        for key, (rx, tx) in readings.items():
            if rx < 0 or tx < 0:
                raise DammError(Code.INVALID_ARGUMENT, f"negative counter for peer {key[:8]}")
            prev = last.get(key)
            if prev is None:
                delta = (rx, tx) if self.count_new_from_zero else (0, 0)
            elif rx < prev[0] or tx < prev[1]:
                delta = (rx, tx)
            else:
                delta = (rx - prev[0], tx - prev[1])
            if delta != (0, 0):
                deltas[key] = delta
        self._last = {key: (rx, tx) for key, (rx, tx) in readings.items()}
        return deltas

    def export_state(self) -> dict[str, Any]:
        """A JSON-safe snapshot so a restarted agent does not recount what it already sent."""
        return {
            "version": STATE_VERSION,
            "count_new_from_zero": self.count_new_from_zero,
            "peers": {key: [rx, tx] for key, (rx, tx) in self._last.items()},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> UsageMeter:
        """Restore an exported snapshot; refuses one it does not understand rather than guess."""
        if state.get("version") != STATE_VERSION:
            raise DammError(
                Code.INVALID_ARGUMENT, f"usage state version {state.get('version')!r} unknown"
            )
        meter = cls(count_new_from_zero=bool(state.get("count_new_from_zero", True)))
        try:
            meter._last = {
                str(key): (int(pair[0]), int(pair[1]))
                for key, pair in dict(state.get("peers", {})).items()
            }
        except (TypeError, ValueError, IndexError) as exc:
            raise DammError(Code.INVALID_ARGUMENT, f"usage state is malformed: {exc}") from exc
        return meter

    def __len__(self) -> int:
        return len(self._last)
