"""Where a running local stack says it is, so other commands need no flags.

`damm up` writes it (mode 0600: it holds the local NATS passwords); everything else reads it when
no URL is given on the command line or in the environment.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from damm import settings
from damm.private_files import private_dir, write_atomic

home = settings.home


@dataclass
class StackFile:
    nats_url: str
    database_url: str
    passwords: dict[str, str] = field(default_factory=dict)
    pid: int = 0  # 0 once the stack stopped: the file stays, so a restart keeps its port
    nats_port: int = 0  # the embedded nats-server's port (0: an external server)

    def write(self, directory: Path | None = None) -> Path:
        path = (directory or home()) / "stack.json"
        if not path.parent.exists():
            # Only when missing: `damm up` narrowed an existing home at start, and as root the
            # embedded Postgres then needs its execute bit to reach its data (postgres.py).
            private_dir(path.parent)
        write_atomic(path, json.dumps(asdict(self), indent=2), mode=0o600)
        return path

    @classmethod
    def read(cls, directory: Path | None = None) -> StackFile | None:
        path = (directory or home()) / "stack.json"
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def stopped(self) -> bool:
        return self.pid == 0

    def alive(self) -> bool:
        if not self.pid:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
