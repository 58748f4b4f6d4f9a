"""Every command the README promises exists and answers --help."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from damm.cli.common import table
from damm.cli.main import cli
from damm.domain.ids import resolve_prefix
from damm.errors import Code, DammError

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


def _sub(group: click.Group, name: str) -> click.Command:
    command = group.get_command(click.Context(group), name)
    assert command is not None, name
    return command


def _walk(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name in sorted(group.list_commands(click.Context(group))):
        sub = _sub(group, name)
        out.append((*path, name))
        if isinstance(sub, click.Group):
            out += _walk(sub, (*path, name))
    return out


def test_a_command_loads_only_its_own_group() -> None:
    """`damm admin report` is timed end to end (issue 12): the CLI imports the group it runs,
    not the control plane, the orchestrator and every other group as well."""
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from damm.cli.main import cli\n"
        "assert not [m for m in sys.modules if m.startswith('damm.cli.') and m != 'damm.cli.main'"
        " and m != 'damm.cli.common'], sorted(m for m in sys.modules if m.startswith('damm.cli'))\n"
        "result = CliRunner().invoke(cli, ['admin', 'report', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "loaded = {m for m in sys.modules if m.startswith('damm.')}\n"
        "assert 'damm.cli.admin' in loaded\n"
        "assert not loaded & {'damm.cli.orchestrate', 'damm.cli.control', 'damm.cli.up',"
        " 'damm.control.process', 'damm.orchestrator.loop'}, sorted(loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


EVERY_COMMAND = [(), *_walk(cli)]


def test_the_walk_finds_the_promised_commands() -> None:
    assert {tuple(c.split()) for c in COMMANDS} <= set(EVERY_COMMAND)


@pytest.mark.parametrize("path", EVERY_COMMAND, ids=lambda p: " ".join(p) or "damm")
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    """Every command and group explains itself, and so does each of its options."""
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = _sub(command, name)
    assert (command.help or "").strip(), f"{' '.join(path)} has no help text"
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert (param.help or "").strip(), f"{' '.join(path)} {param.opts[0]} has no help"


def test_readme_documents_shell_completion() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "_DAMM_COMPLETE=bash_source damm" in readme
    assert "_DAMM_COMPLETE=zsh_source damm" in readme
    env = {**os.environ, "COMP_WORDS": "damm adm", "COMP_CWORD": "1",
           "_DAMM_COMPLETE": "bash_complete"}  # fmt: skip
    damm = str(Path(sys.executable).parent / "damm")
    done = subprocess.run([damm], env=env, capture_output=True, text=True, timeout=30, check=True)
    assert "plain,admin" in done.stdout.splitlines()


def test_secrets_never_reach_an_error_line() -> None:
    secret = "dmt_" + "A1b2" * 8
    gateway_secret = "dmg_" + "Zz9_" * 8
    err = DammError(Code.NOT_FOUND, f"token {secret!r} or gateway {gateway_secret}")
    assert secret not in err.line() and gateway_secret not in err.line()
    assert secret not in err.detail and "dmt_…" in err.line()


IDS = [f"{n:02d}" + "f0de8c41b7a2c9e3d5" for n in range(4)]


@pytest.mark.parametrize("width", [80, 60])
def test_tables_never_cut_ids(width: int) -> None:
    """At 80 columns (and narrower) ids stay whole; other columns wrap or are left out."""
    columns = ("device_id", "status", "tier", "gateway_id", "address", "public_key", "enrolled_at")
    rows = [
        [i, "active", "gold", "gw-frankfurt-1", "10.44.0.10", "k" * 44, "2026-12-02 13:00:00"]
        for i in IDS
    ]
    buf = io.StringIO()
    table(
        "devices",
        columns,
        rows,
        console=Console(file=buf, width=width, force_terminal=True, color_system=None),
    )
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= width
    for ident in [*IDS, "gw-frankfurt-1"]:
        assert ident in text, text
    assert "left out" in text


def test_tables_in_a_pipe_keep_every_column() -> None:
    """Not a terminal: nothing is wrapped, cut or dropped, whatever COLUMNS says."""
    columns = ("device_id", "status", "public_key")
    rows = [[i, "active", "k" * 44] for i in IDS]
    buf = io.StringIO()
    table("devices", columns, rows, console=Console(file=buf, width=40))
    text = buf.getvalue()
    for ident in IDS:
        assert ident in text
    assert "k" * 44 in text and "left out" not in text


@given(
    ids=st.sets(st.text("0123456789abcdef", min_size=6, max_size=20), min_size=1, max_size=30),
    data=st.data(),
)
def test_prefix_resolution(ids: set[str], data: st.DataObject) -> None:
    prefix = data.draw(st.text("0123456789abcdef", min_size=4, max_size=20))
    matches = [i for i in ids if i.startswith(prefix)]
    try:
        got = resolve_prefix(ids, prefix, "device")
    except DammError as err:
        if prefix in ids:
            raise
        if not matches:
            assert err.code is Code.NOT_FOUND
        else:
            assert err.code is Code.AMBIGUOUS_ID and len(matches) > 1
            assert all(m in err.detail for m in sorted(matches)[:5])
    else:
        assert got == prefix if prefix in ids else matches == [got]


def test_short_prefixes_are_not_guessed() -> None:
    with pytest.raises(DammError) as info:
        resolve_prefix({"abcdef"}, "abc", "device")
    assert info.value.code is Code.NOT_FOUND
    assert resolve_prefix({"abc", "abcdef"}, "abc", "device") == "abc"
