"""The usage meter must make the sum of reported deltas equal the bytes that really moved."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from damm.agent.usage import UsageMeter
from damm.errors import Code, DammError

PEERS = ["peer-a", "peer-b", "peer-c"]

growth = st.tuples(st.integers(0, 10**9), st.integers(0, 10**9))
event = st.one_of(
    st.tuples(st.just("grow"), growth),
    st.tuples(st.just("reset"), growth),  # removed + re-added, or interface restart
    st.tuples(st.just("absent"), growth),  # peer not in this reading (removed)
)
steps = st.lists(st.fixed_dictionaries({p: event for p in PEERS}), max_size=25)


def simulate(
    script: list[dict[str, tuple[str, tuple[int, int]]]], meter: UsageMeter
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Drive the meter with readings from a model where counters reset to 0 then grow."""
    counters: dict[str, tuple[int, int]] = {}
    truth = {p: [0, 0] for p in PEERS}
    seen = {p: [0, 0] for p in PEERS}
    for step in script:
        reading: dict[str, tuple[int, int]] = {}
        for peer, (kind, (g_rx, g_tx)) in step.items():
            if kind == "absent":
                counters.pop(peer, None)  # WireGuard forgets it; it comes back from zero
                continue
            prev = counters.get(peer)
            if kind == "reset" or prev is None:
                if prev is not None and prev != (0, 0) and g_rx >= prev[0] and g_tx >= prev[1]:
                    # A reset that grew back past both old totals between two readings is
                    # invisible in the counters; the model only generates observable ones.
                    if prev[0] > 0:
                        g_rx = prev[0] - 1
                    else:
                        g_tx = prev[1] - 1
                now = (g_rx, g_tx)
            else:
                now = (prev[0] + g_rx, prev[1] + g_tx)
            truth[peer][0] += g_rx
            truth[peer][1] += g_tx
            counters[peer] = now
            reading[peer] = now
        for peer, (d_rx, d_tx) in meter.observe(reading).items():
            assert d_rx >= 0 and d_tx >= 0
            seen[peer][0] += d_rx
            seen[peer][1] += d_tx
    return truth, seen


@given(steps)
def test_sum_of_deltas_equals_bytes_transferred(
    script: list[dict[str, tuple[str, tuple[int, int]]]],
) -> None:
    truth, seen = simulate(script, UsageMeter())
    assert seen == truth


@given(steps, st.integers(0, 25))
def test_export_import_midway_changes_nothing(
    script: list[dict[str, tuple[str, tuple[int, int]]]], cut: int
) -> None:
    class Restarting(UsageMeter):
        """Round-trips its state through JSON before every reading, like an agent restart."""

        def observe(self, readings: Mapping[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
            restored = UsageMeter.from_state(json.loads(json.dumps(self.export_state())))
            self._last = restored._last
            return super().observe(readings)

    truth, seen = simulate(script, Restarting())
    assert seen == truth


def test_reset_counts_new_value_not_negative_or_double() -> None:
    meter = UsageMeter()
    assert meter.observe({"k": (100, 50)}) == {"k": (100, 50)}
    assert meter.observe({"k": (150, 70)}) == {"k": (50, 20)}
    assert meter.observe({"k": (30, 90)}) == {"k": (30, 90)}  # rx went down: both restarted
    assert meter.observe({"k": (30, 90)}) == {}


def test_disappeared_peer_is_forgotten_and_new_peer_counts_from_zero() -> None:
    meter = UsageMeter()
    meter.observe({"a": (10, 10), "b": (5, 5)})
    assert meter.observe({"a": (10, 10)}) == {}
    assert len(meter) == 1
    assert meter.observe({"a": (10, 10), "b": (7, 8)}) == {"b": (7, 8)}


def test_baseline_mode_ignores_history_of_new_peers() -> None:
    meter = UsageMeter(count_new_from_zero=False)
    assert meter.observe({"a": (1000, 2000)}) == {}
    assert meter.observe({"a": (1500, 2000)}) == {"a": (500, 0)}
    restored = UsageMeter.from_state(meter.export_state())
    assert restored.count_new_from_zero is False
    assert restored.observe({"a": (1600, 2100)}) == {"a": (100, 100)}


def test_rejects_negative_counters_and_unknown_state() -> None:
    with pytest.raises(DammError) as info:
        UsageMeter().observe({"a": (-1, 0)})
    assert info.value.code is Code.INVALID_ARGUMENT
    with pytest.raises(DammError):
        UsageMeter.from_state({"version": 99, "peers": {}})
    with pytest.raises(DammError):
        UsageMeter.from_state({"version": 1, "peers": {"a": [1]}})
