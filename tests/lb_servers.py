"""Several `slmops server` replicas behind a real load balancer (Debian's haproxy), on loopback, for tests.

:class:`Replica` is one `slmops server` process (optionally with several uvicorn workers); :func:`running_haproxy`
starts haproxy with :func:`haproxy_config` in front of them: round robin, health-checked on ``/api/v1/health``
every 200 ms (a replica that stops answering is out after two failed checks), and a request whose connection is
refused is retried on another replica.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from tests.servers import HEALTH_PATH, SLMOPS_EXE, free_port, wait_healthy

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


class Replica:
    """One `slmops server` process on a free loopback port; settings from ``env`` (SLMOPS_ variables)."""

    def __init__(self, name: str, log_dir: Path, env: dict[str, str], workers: int = 1) -> None:
        self.name, self.port, self.workers = name, free_port(), workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        argv = [SLMOPS_EXE, "server", "--port", str(self.port)] + (["--workers", str(workers)] if workers > 1 else [])
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 60) -> None:
        wait_healthy(self.url, timeout_s, lambda: self.process.poll() is None, f"replica {self.name} ({self.log()})")

    def pids(self) -> set[int]:
        """The server process and its worker processes (uvicorn's children with --workers)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        found = {self.process.pid}
        if children.exists():
            found |= {int(p) for p in children.read_text().split()}
        return found

    def kill(self) -> None:
        """SIGKILL the server and its workers at once: no shutdown, no lease handed back."""
        for pid in self.pids():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def haproxy_config(port: int, replicas: Sequence[Replica]) -> str:
    """haproxy in front of ``replicas`` on 127.0.0.1:``port``."""
    servers = "\n".join(f"    server {r.name} 127.0.0.1:{r.port} check" for r in replicas)
    return f"""\
global
    maxconn 4096

defaults
    mode http
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1

frontend control
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET {HEALTH_PATH}
    http-check expect status 200
    default-server inter 200ms fall 2 rise 1
{servers}
"""


@contextmanager
def running_haproxy(replicas: Sequence[Replica], log_dir: Path, timeout_s: float = 20) -> Iterator[str]:
    """haproxy (foreground, from a generated config) in front of ``replicas``; yields its URL, stops it on exit."""
    assert HAPROXY is not None, "haproxy is not installed (apt-get install haproxy)"
    port = free_port()
    config = log_dir / "haproxy.cfg"
    config.write_text(haproxy_config(port, replicas))
    check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    with (log_dir / "haproxy.log").open("ab") as log:
        process = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout_s, lambda: process.poll() is None, "haproxy")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
