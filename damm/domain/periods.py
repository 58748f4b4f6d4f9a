"""Usage periods: the window a tier's byte limit applies to.

One function names the period a moment falls in, and the projection, the quota reactor, the
reset command and the report all call it, so they can never disagree about "this period".
The kind (month, ISO week or day) is a setting: ``damm.settings.usage_period``.
"""

from __future__ import annotations

from datetime import UTC, datetime


def period_at(when: datetime, period: str) -> str:
    """``2026-11`` (month), ``2026-W48`` (ISO week) or ``2026-11-25`` (day), in UTC."""
    when = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    match period:
        case "week":
            year, week, _ = when.isocalendar()
            return f"{year:04d}-W{week:02d}"
        case "day":
            return when.strftime("%Y-%m-%d")
        case _:
            return f"{when.year:04d}-{when.month:02d}"
