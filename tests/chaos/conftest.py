"""The long chaos runs are opt-in (`-m slow` or DAMM_SLOW=1): the whole suite must stay well
under ten minutes, and the CI-sized run covers the same invariants."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("DAMM_SLOW") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow chaos run: -m slow or DAMM_SLOW=1")
    for item in items:
        if "slow" in item.keywords and "chaos" in str(item.path):
            item.add_marker(skip)
