"""Run the local API with uvicorn on 127.0.0.1 in a background thread (for the agent and `slmops serve`)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from slmops.errors import MissingExtraError, UnavailableError

if TYPE_CHECKING:
    import uvicorn

__all__ = ["LocalServer"]

LOOPBACK = "127.0.0.1"


class LocalServer:
    """Serves an ASGI ``app`` on ``127.0.0.1:port`` from a background thread.

    ``port=0`` picks a free port; ``port`` and ``url`` give the real one after :meth:`start`. The socket is bound
    in ``start()``, so a port in use fails there, in the caller's thread. It is made with ``IPPROTO_TCP`` so that
    asyncio sets ``TCP_NODELAY`` on every accepted connection (it checks the socket's protocol, and an accepted
    socket inherits the listener's): without it, Nagle's algorithm held each answer's body (and a stream's first
    chunk) until the client's delayed ACK of the headers, about 40 ms per request, 48 ms per ``GET /health``
    instead of 1 ms. ``stop()`` lets requests in flight
    finish for up to ``shutdown_timeout_s``. Access logs are off: the API is local and paths carry no text, but
    there is nothing to gain from logging them.
    """

    def __init__(
        self, app: Any, *, port: int = 0, shutdown_timeout_s: float = 5.0, start_timeout_s: float = 30.0
    ) -> None:
        self.app = app
        self.port = port
        self.shutdown_timeout_s = shutdown_timeout_s
        self.start_timeout_s = start_timeout_s
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> LocalServer:
        try:
            import uvicorn
        except ImportError as exc:
            raise MissingExtraError("server", "the local model API", "uvicorn") from exc
        if self._thread is not None:
            raise RuntimeError("this LocalServer is already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((LOOPBACK, self.port))
        except OSError as exc:
            sock.close()
            raise UnavailableError(
                f"cannot listen on {LOOPBACK}:{self.port} ({exc.strerror}); choose another port or stop what uses it"
            ) from exc
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=int(max(1, self.shutdown_timeout_s)),
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"slmops-api-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise UnavailableError(f"the local API on {self.url} did not start within {self.start_timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        server, thread, sock = self._server, self._thread, self._socket
        self._server = self._thread = self._socket = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(self.shutdown_timeout_s + 5.0)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(5.0)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
