"""One gateway-health rule for placement, catalogs and the report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from damm.domain.health import gateway_health
from damm.reports.report import gateway_status

NOW = datetime(2026, 5, 1, tzinfo=UTC)
TTL = timedelta(seconds=90)


def test_the_rule() -> None:
    fresh = NOW - timedelta(seconds=10)

    def h(**kw: object) -> str:
        args: dict[str, object] = {"active": True, "registered": True, "last_heartbeat": fresh}
        args.update(kw)
        return gateway_health(now=NOW, ttl=TTL, **args)  # type: ignore[arg-type]

    assert h() == "healthy"
    assert h(last_heartbeat=None) == "stale"
    assert h(last_heartbeat=NOW - timedelta(seconds=91)) == "stale"
    assert h(last_heartbeat=NOW - timedelta(seconds=90)) == "healthy"
    assert h(registered=False) == "unregistered"
    assert h(active=False, registered=False) == "disabled"


@given(
    active=st.booleans(),
    registered=st.booleans(),
    age=st.none() | st.integers(min_value=0, max_value=300),
)
def test_the_report_uses_the_rule(active: bool, registered: bool, age: int | None) -> None:
    beat = None if age is None else NOW - timedelta(seconds=age)
    row = {"active": active, "registered": registered, "last_heartbeat": beat}
    status, _ = gateway_status(row, NOW, TTL.total_seconds())
    assert status == gateway_health(
        active=active, registered=registered, last_heartbeat=beat, now=NOW, ttl=TTL
    )
