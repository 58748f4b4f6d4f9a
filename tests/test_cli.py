"""Every command the README promises exists and answers --help."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from damm.cli.main import cli

COMMANDS = [
    "up",
    "control run",
    "admin tier create",
    "admin token create",
    "admin token revoke",
    "admin gateway add",
    "admin gateway front-door",
    "admin gateway enable",
    "admin gateway disable",
    "admin egress add",
    "admin devices",
    "admin gateways",
    "admin tokens",
    "admin tiers",
    "admin pools",
    "admin device",
    "admin revoke",
    "admin suspend",
    "admin resume",
    "admin explain-placement",
    "admin audit",
    "admin report",
    "admin replay",
    "admin catalog-key announce",
    "admin catalog-key activate",
    "gateway run",
    "device keygen",
    "device enroll",
    "device failover",
    "device rotate-key",
    "device bundle",
    "device diagnose",
    "device show",
    "device companion",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_command_exists(command: str) -> None:
    result = CliRunner().invoke(cli, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.mark.parametrize(
    "command", ["admin devices", "admin tokens", "admin report", "admin audit", "admin replay"]
)
def test_listings_and_reports_take_json(command: str) -> None:
    result = CliRunner().invoke(cli, [*command.split(), "--help"])
    assert "--json" in result.output or "--format" in result.output
