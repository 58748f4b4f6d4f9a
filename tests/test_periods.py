"""Usage periods: one definition for the projection, the quota reactor, reset and the report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from damm.domain.periods import period_at
from damm.errors import Code, DammError
from damm.settings import usage_period

MOMENT = datetime(2026, 12, 31, 23, 30, tzinfo=UTC)


def test_labels() -> None:
    assert period_at(MOMENT, "month") == "2026-12"
    assert period_at(MOMENT, "week") == "2026-W53"
    assert period_at(MOMENT, "day") == "2026-12-31"
    # a local time past midnight is still the UTC period it falls in
    assert period_at(MOMENT.astimezone(timezone(timedelta(hours=2))), "month") == "2026-12"


def test_configured_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAMM_USAGE_PERIOD", "day")
    assert period_at(MOMENT, usage_period()) == "2026-12-31"
    monkeypatch.setenv("DAMM_USAGE_PERIOD", "fortnight")
    with pytest.raises(DammError) as info:
        usage_period()
    assert info.value.code is Code.INVALID_ARGUMENT


@given(st.datetimes(timezones=st.just(UTC)), st.sampled_from(["month", "week", "day"]))
def test_periods_are_ordered_and_contiguous(when: datetime, kind: str) -> None:
    """Later moments never fall in an earlier period, and a period covers a contiguous span."""
    later = when + timedelta(hours=1) if when.year < 9999 else when
    assert period_at(later, kind) >= period_at(when, kind)
    assert period_at(when, kind) == period_at(when.replace(minute=0, second=0), kind)
