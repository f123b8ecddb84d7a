"""Helpers for tests that run real servers on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

SLMOPS_EXE = str(Path(sys.executable).with_name("slmops"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


HEALTH_PATH = "/api/v1/health"


def wait_healthy(url: str, timeout_s: float, alive: Callable[[], bool] | None = None, what: str = "server") -> None:
    """Wait until ``url`` answers 200 on the health endpoint; fail when ``alive()`` says the process exited or the
    time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}{HEALTH_PATH}", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert alive is None or alive(), f"{what} exited"
        assert time.monotonic() < deadline, f"{what} did not answer {HEALTH_PATH} within {timeout_s} s"
        time.sleep(0.1)


@contextmanager
def running_server(log_path: Path, start_timeout_s: float = 30, port: int | None = None) -> Iterator[str]:
    """A real `slmops server` process on a loopback port (free unless given; SLMOPS_HOME from the environment);
    yields its URL and SIGKILLs it on exit."""
    port = port or free_port()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [SLMOPS_EXE, "server", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, start_timeout_s, lambda: process.poll() is None, f"server ({log_path})")
            yield url
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
