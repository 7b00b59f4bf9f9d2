"""/metrics, /healthz and /readyz for a daemon, served from a background thread."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.settings import SettingsError

if TYPE_CHECKING:
    from consumers.health import Health


def serve(port: int, *, health: Health | None = None, alive: Callable[[], bool] | None = None,
          ready: Callable[[], bool] | None = None, host: str = "0.0.0.0",
          setting: str = "detector.http_port") -> ThreadingHTTPServer:
    """Start the endpoints on ``port`` and return the server (``shutdown()`` stops it); a port
    that cannot be bound is a :class:`~pipeline.settings.SettingsError` naming ``setting``.

    Either ``health`` (a :class:`consumers.health.Health`: /healthz from ``alive()``, /readyz
    from ``ready()`` with the reason it is not ready in the body), or the two callables
    ``alive`` (the loop turns) and ``ready`` (serving).
    """
    if health is not None:
        if alive is not None or ready is not None:
            raise TypeError("serve() takes either health or alive/ready, not both")
        is_alive: Callable[[], bool] = health.alive
        why_not_ready: Callable[[], str | None] = health.not_ready_reason
        waiting: Callable[[], str | None] = lambda: health.waiting_for  # noqa: E731
    elif alive is not None and ready is not None:
        is_alive = alive
        why_not_ready = lambda: None if ready() else ""  # noqa: E731
        waiting = lambda: None  # noqa: E731
    else:
        raise TypeError("serve() needs health, or both alive and ready")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                if is_alive():
                    wait = waiting()
                    self._send(200, f"ok: waiting for {wait}\n".encode() if wait else b"ok\n")
                else:
                    self._send(503, b"stalled\n")
            elif path == "/readyz":
                reason = why_not_ready()
                if reason is None:
                    self._send(200, b"ready\n")
                else:
                    self._send(503, f"not ready: {reason}\n".encode() if reason else b"not ready\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep access logs out of the JSON log stream
            return

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:  # in use, not allowed, out of range
        raise SettingsError(setting, f"cannot serve the health endpoints on port {port}: {exc.strerror or exc}") \
            from None
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def probe_ready(port: int, host: str = "127.0.0.1", timeout_s: float = 3.0) -> bool:
    """The probe's client: whether the daemon on ``port`` answers /readyz with 200 (for tools
    and tests that wait on a daemon before they go on)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=timeout_s) as r:
            return bool(r.status == 200)
    except OSError:
        return False
