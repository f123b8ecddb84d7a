"""A real S3 endpoint on loopback for tests: moto's standalone server in a subprocess, and a TCP proxy in front of
it that a test can cut (an object store that drops connections mid-download)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.servers import free_port

ACCESS_KEY = "slmops-test"
SECRET_KEY = "slmops-test-secret"


@dataclass
class MotoServer:
    url: str
    process: subprocess.Popen[bytes]
    _clients: dict[str, Any] = field(default_factory=dict)

    def client(self, endpoint_url: str | None = None) -> Any:
        """A boto3 client with the test credentials (made once per endpoint: making one takes ~0.3 s)."""
        import boto3

        endpoint = endpoint_url or self.url
        if endpoint in self._clients:
            return self._clients[endpoint]
        self._clients[endpoint] = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        return self._clients[endpoint]

    def new_bucket(self) -> str:
        name = f"slmops-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    @property
    def version(self) -> str:
        import moto

        return str(moto.__version__)


@contextlib.contextmanager
def moto_server(log_path: Path, env: dict[str, str] | None = None, start_timeout_s: float = 30) -> Iterator[MotoServer]:
    """``python -m moto.server`` on a free loopback port; SIGKILLed on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                httpx.get(f"{url}/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.05)
        yield MotoServer(url, process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


@dataclass
class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; :meth:`cut` drops every open connection at once."""

    upstream: tuple[str, int]
    port: int = 0
    requests: list[bytes] = field(default_factory=list)  # the first bytes of every request (its header block)
    _listener: socket.socket | None = None
    _open: list[socket.socket] = field(default_factory=list)
    _all: list[socket.socket] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                downstream, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            with self._lock:
                self._open += [downstream, upstream]
                self._all += [downstream, upstream]
            threading.Thread(target=self._pump, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if record:
                    with self._lock:
                        self.requests.append(data[:4096])
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            dropped, self._open = self._open, []
        for sock in dropped:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.cut()
        with self._lock:
            every, self._all = self._all, []
        for sock in every:
            sock.close()
