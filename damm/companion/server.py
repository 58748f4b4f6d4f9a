"""`damm device companion`: the page and one device's files, served on loopback only.

preload.js carries the device's config, private key included, so the server is built for a
machine other people may share: it binds 127.0.0.1 only, every path sits under a random
per-run token (another local user cannot guess the URL), and it refuses a Host header that is
not its own address (a web page elsewhere cannot reach it by DNS rebinding). The preload is read
again on every request, so a reload after `damm device failover` shows the new endpoint.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from damm import log
from damm.companion.page import PRELOAD_NAME, Preload, page_files, preload_js
from damm.errors import DammError

_log = log.get(__name__)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
# The same policy as the page's meta tag, sent as a header too so it also covers non-HTML files.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'none'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class CompanionServer:
    def __init__(self, load: Callable[[], Preload], *, port: int = 0) -> None:
        self.token = secrets.token_urlsafe(18)
        self._load = load
        self._static = page_files(None)
        self._static["index.html"] = page_files(load())["index.html"]
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._httpd.daemon_threads = True
        self.port: int = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.token}/"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "damm-companion"
            sys_version = ""

            def do_GET(self) -> None:
                status, body, ctype = server.respond(self.path, self.headers.get("Host", ""))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Referrer-Policy", "no-referrer")
                self.send_header("Content-Security-Policy", CSP)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                _log.debug("companion request", line=format % args)

        return Handler

    def respond(self, path: str, host: str) -> tuple[int, bytes, str]:
        """(status, body, content type) for a GET of `path` sent with this Host header."""
        text = "text/plain; charset=utf-8"
        if host not in (f"127.0.0.1:{self.port}", f"localhost:{self.port}"):
            return HTTPStatus.FORBIDDEN, b"wrong Host header\n", text
        prefix = f"/{self.token}/"
        path = path.split("?", 1)[0].split("#", 1)[0]
        if not path.startswith(prefix):
            return HTTPStatus.NOT_FOUND, b"not found\n", text
        name = path[len(prefix) :] or "index.html"
        if name == PRELOAD_NAME:
            try:
                return HTTPStatus.OK, preload_js(self._load()), CONTENT_TYPES[".js"]
            except DammError as exc:
                return HTTPStatus.INTERNAL_SERVER_ERROR, f"{exc.line()}\n".encode(), text
        body = self._static.get(name)
        if body is None:
            return HTTPStatus.NOT_FOUND, b"not found\n", text
        suffix = name[name.rfind(".") :] if "." in name else ""
        return HTTPStatus.OK, body, CONTENT_TYPES.get(suffix, "application/octet-stream")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="companion")
        self._thread.daemon = True
        self._thread.start()

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
