"""The soak (bench/bench_soak.py): flapping gateways under steady enrollments and revokes lose
nothing, propagate fast and keep the control plane's memory flat. A CI-sized run always runs;
the 30-minute run at 1,000 gateways is opt-in (`-m slow`)."""

from __future__ import annotations

import math

import pytest

from bench.bench_soak import (
    PROPAGATION_TARGET_MS,
    RSS_GROWTH_TARGET,
    SoakConfig,
    SoakResult,
    pct,
    soak,
    summary,
)

# The fleet grows by (enroll - revoke) devices a second, so the control plane's RSS cannot stay
# flat: it is flat enough when it grew under 5% or no faster than the state it holds (1.74 KB a
# device measured at 100k devices, issue 12; twice that allowed).
KB_PER_DEVICE_BOUND = 3.5


def check(result: SoakResult, cfg: SoakConfig) -> None:
    print("\n".join(summary(result)))
    assert result.lost == []
    assert len(result.windows) == math.ceil(cfg.minutes * 60 / cfg.window_s)
    for w in result.windows:
        expected = cfg.enroll_rate * cfg.window_s
        assert len(w.enroll_s) >= 0.9 * expected, w.index  # measured, not skipped
        assert w.direct_ms, w.index
        assert w.rss_mb, w.index
        assert w.unobserved == 0, w.index
        assert {code for code in w.errors if code != "revoke:conflict(retried)"} == set()
    assert result.flaps > 0
    assert result.stuck_stops == ()
    assert sum(len(w.deferred_ms) for w in result.windows) > 0  # flapping gateways were hit
    direct = [v for w in result.windows for v in w.direct_ms]
    assert pct(direct, 0.99) <= PROPAGATION_TARGET_MS
    assert result.rss_growth <= RSS_GROWTH_TARGET or result.kb_per_device <= KB_PER_DEVICE_BOUND, (
        result.rss_growth,
        result.kb_per_device,
    )


async def test_soak_ci_sized() -> None:
    cfg = SoakConfig(
        minutes=1.0,
        window_s=20.0,
        gateways=100,
        enroll_rate=20.0,
        revoke_rate=2.0,
        flap_fraction=0.05,
        flap_every_s=15.0,
        down_s=10.0,
        flat_minutes=0.67,
        settle_s=60.0,
    )
    check(await soak(cfg), cfg)


@pytest.mark.slow
async def test_soak_30_minutes_1000_gateways() -> None:
    cfg = SoakConfig()  # 1,000 gateways, 5% flapping a minute, 200 enrollments/s, 20 revokes/s
    check(await soak(cfg), cfg)
