"""Usage periods: the window a tier's byte limit applies to.

One function names the period a moment falls in, and the projection, the quota reactor, the
reset command and the report all call it, so they can never disagree about "this period".
Calendar month by default; ``DAMM_USAGE_PERIOD=week`` (ISO week) or ``day`` per deployment. Pick
it once: a replay labels history with the setting in force when it runs.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from damm.errors import Code, DammError

KINDS = ("month", "week", "day")


def kind() -> str:
    value = os.environ.get("DAMM_USAGE_PERIOD", "month").strip().lower()
    if value not in KINDS:
        raise DammError(Code.INVALID_ARGUMENT, f"DAMM_USAGE_PERIOD={value!r}: one of {KINDS}")
    return value


def period_at(when: datetime, period: str | None = None) -> str:
    """``2026-11`` (month), ``2026-W48`` (ISO week) or ``2026-11-25`` (day), in UTC."""
    when = when.astimezone(UTC) if when.tzinfo else when.replace(tzinfo=UTC)
    match period or kind():
        case "week":
            year, week, _ = when.isocalendar()
            return f"{year:04d}-W{week:02d}"
        case "day":
            return when.strftime("%Y-%m-%d")
        case _:
            return f"{when.year:04d}-{when.month:02d}"
