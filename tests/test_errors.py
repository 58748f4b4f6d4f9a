"""The error catalog is total: every failure a user can meet is one line with a code and the
catalog's exit status, including click's own usage errors and servers that are down."""

from __future__ import annotations

import socket
import subprocess
import sys

import asyncpg
import nats.errors
import nats.js.errors
import pytest
from click.testing import CliRunner

from damm.cli.common import infrastructure_error
from damm.cli.main import cli
from damm.errors import Code, DammError
from damm.events.codec import CodecError
from damm.events.store import AppendError, ConflictError
from damm.projections.replay import ReplayError


def test_every_code_has_an_exit_status_and_a_message() -> None:
    for code in Code:
        assert code.exit_status in (1, 2, 3, 4), code
        assert code.message and code.slug == code.name.lower()
    assert Code.UNAVAILABLE.exit_status == 3
    assert Code.USAGE.exit_status == 2
    assert Code.EVENT_QUARANTINED.exit_status == 4  # replay --verify with a quarantined event


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConflictError("damm.evt.device.x", "wrong last sequence"), Code.CONFLICT),
        (AppendError("insufficient resources"), Code.UNAVAILABLE),
        (CodecError("not json"), Code.UNDECODABLE_EVENT),
        (ReplayError("no such sequence"), Code.REPLAY_FAILED),
        (ConnectionRefusedError(111, "refused"), Code.UNAVAILABLE),
        (asyncpg.exceptions.CannotConnectNowError("starting up"), Code.UNAVAILABLE),
        (nats.errors.TimeoutError(), Code.UNAVAILABLE),
        (nats.js.errors.ServiceUnavailableError(), Code.UNAVAILABLE),
        (TimeoutError(), Code.UNAVAILABLE),
    ],
)
def test_infrastructure_errors_map_to_a_code(exc: BaseException, code: Code) -> None:
    err = infrastructure_error(exc)
    assert isinstance(err, DammError)
    assert err.code is code


def test_a_bug_is_not_disguised() -> None:
    assert infrastructure_error(ZeroDivisionError()) is None


@pytest.mark.parametrize(
    "args",
    [["admin", "frobnicate"], ["admin", "tier", "create"], ["device", "enroll", "--bogus"]],
)
def test_click_usage_errors_use_the_one_line_format(args: list[str]) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: usage: "), result.output


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_replay_with_postgres_down_is_one_line_not_a_traceback(tmp_path: object) -> None:
    port = _closed_port()
    proc = subprocess.run(
        [
            sys.executable, "-m", "damm.cli.main",
            "--nats", f"nats://127.0.0.1:{port}",
            "--database-url", f"postgresql://nobody@127.0.0.1:{port}/none",
            "admin", "replay", "--verify",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unavailable: "), proc.stderr
