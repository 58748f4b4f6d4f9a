"""One lifecycle rule: the fold, the audit and the read-model SQL agree on every transition."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from damm.control.state import DecisionState
from damm.domain.ipam import Overlay
from damm.domain.lifecycle import KEY_EXPIRED, Lifecycle, transition
from damm.events import model as m
from damm.events.model import Actor
from damm.projections.runner import apply_batch
from damm.reports.audit import fold_device

DEVICE = "dev1"
T0 = datetime(2026, 3, 1, tzinfo=UTC)
KEY_A = "A" * 42 + "E="
KEY_B = "B" * 42 + "E="

ENROLLED = m.DeviceEnrolled(
    device_id=DEVICE, public_key=KEY_A, token_id="tok", tier="gold", gateway_id="gw1",
    front_door_id="fd1", egress_pool_id=None, address="10.44.0.10", region="eu",
)  # fmt: skip

after_enrollment = st.one_of(
    st.builds(m.DeviceSuspended, device_id=st.just(DEVICE), reason=st.sampled_from(
        ["abuse", "over_quota", KEY_EXPIRED])),
    st.builds(m.DeviceResumed, device_id=st.just(DEVICE), reason=st.sampled_from(
        ["", "under_quota"])),
    st.builds(m.DeviceRevoked, device_id=st.just(DEVICE), reason=st.sampled_from(
        ["lost", "stolen"])),
    st.just(m.DeviceKeyRotated(device_id=DEVICE, old_public_key=KEY_A, new_public_key=KEY_B)),
    st.just(ENROLLED),
)  # fmt: skip
histories = st.lists(after_enrollment, max_size=8).map(lambda rest: [ENROLLED, *rest])


def envelopes(events: list[m.Event]) -> list[m.Envelope]:
    return [
        m.Envelope(
            id=uuid.uuid4().hex,
            type=type(e).__struct_config__.tag,
            aggregate=f"device/{DEVICE}",
            occurred_at=T0 + timedelta(seconds=n),
            actor=Actor("admin", "ops"),
            correlation_id=f"c{n}",
            event=e,
            seq=n,
        )
        for n, e in enumerate(events, 1)
    ]


def by_rule(events: list[m.Event]) -> Lifecycle | None:
    state: Lifecycle | None = None
    for e in events:
        state = transition(state, e)
    return state


def test_transitions_spelled_out() -> None:
    active = transition(None, ENROLLED)
    assert active == Lifecycle("active")
    suspended = transition(active, m.DeviceSuspended(device_id=DEVICE, reason=KEY_EXPIRED))
    rotated = transition(suspended, m.DeviceKeyRotated(
        device_id=DEVICE, old_public_key=KEY_A, new_public_key=KEY_B))  # fmt: skip
    assert rotated == Lifecycle("active", "key_rotated")
    revoked = transition(active, m.DeviceRevoked(device_id=DEVICE, reason="lost"))
    assert revoked == Lifecycle("revoked", "lost")
    for later in (
        m.DeviceResumed(device_id=DEVICE),
        m.DeviceSuspended(device_id=DEVICE, reason="x"),
        m.DeviceRevoked(device_id=DEVICE, reason="again"),
        ENROLLED,
    ):
        assert transition(revoked, later) == revoked
    assert transition(None, m.DeviceSuspended(device_id=DEVICE)) is None


@given(histories)
def test_the_decision_fold_and_the_audit_follow_the_rule(events: list[m.Event]) -> None:
    expected = by_rule(events)
    assert expected is not None
    state = DecisionState(Overlay.parse("10.44.0.0/24"))
    for env in envelopes(events):
        state.apply(env, f"damm.evt.device.{DEVICE}")
    dev = state.devices[DEVICE]
    assert Lifecycle(dev.status, dev.reason) == expected
    audited = fold_device(DEVICE, envelopes(events), T0 + timedelta(days=1))
    assert Lifecycle(audited.status, audited.reason) == expected  # type: ignore[arg-type]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(histories)
async def test_the_read_model_sql_follows_the_rule(dsn: str, events: list[m.Event]) -> None:
    expected = by_rule(events)
    assert expected is not None
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "damm"})
    try:
        async with conn.transaction():
            await conn.execute("DELETE FROM devices")
            await conn.execute("DELETE FROM checkpoint")
        await apply_batch(conn, "lifecycle", envelopes(events))
        row = await conn.fetchrow(
            "SELECT status, coalesce(status_reason, '') AS reason FROM devices"
            " WHERE device_id = $1",
            DEVICE,
        )
    finally:
        await conn.close()
    assert row is not None
    assert Lifecycle(row["status"], row["reason"]) == expected
