"""A control plane in a process of its own (`damm control run`), for a local cluster and for
fault injection: a process can be SIGKILLed or SIGSTOPped at any instruction."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from damm.stack import processes


def spawn_control(
    nats_url: str,
    database_url: str,
    password: str,
    keys_dir: Path,
    log: Path,
    *,
    projectors: bool = False,
    stream_replicas: int = 1,
    log_level: str = "info",
    extra_env: dict[str, str] | None = None,
    kek_file: Path | None = None,
) -> subprocess.Popen[bytes]:
    """``kek_file``: the KEK every replica of one log shares; ``None`` leaves it to the
    environment (``DAMM_KEK``, ``DAMM_KEK_FILE``), and ``control run`` refuses to start without one.
    """
    env = {
        **os.environ,
        **(extra_env or {}),
        **({"DAMM_KEK_FILE": str(kek_file)} if kek_file is not None else {}),
        "DAMM_NATS_URL": nats_url,
        "DAMM_DATABASE_URL": database_url,
        "DAMM_CONTROL_PASSWORD": password,
        "DAMM_LOG_LEVEL": log_level,
    }
    argv = [sys.executable, "-m", "damm.cli.main", "control", "run", "--keys-dir", str(keys_dir)]
    argv += ["--stream-replicas", str(stream_replicas)]
    if not projectors:
        argv.append("--no-projectors")
    return processes.spawn(argv, log=log, env=env)
