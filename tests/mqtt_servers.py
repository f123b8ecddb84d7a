"""A real Mosquitto broker on a loopback port for the nudge tests and the nudge benchmark.

The broker is set up the way :mod:`slmops.control.nudge` documents it: no anonymous access, a password file made
with ``mosquitto_passwd``, the ACL of :func:`slmops.control.nudge.mosquitto_acl` (plus a read-everything user for
the simulator). ``stop()`` SIGKILLs it and ``start()`` brings it back on the same port.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from slmops.control.nudge import mosquitto_acl

__all__ = ["MOSQUITTO", "Broker", "Subscriber", "refused", "require_mosquitto", "running_broker"]

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")

CONTROL_USER, DEVICE_USER, SIM_USER = "slmops-control", "slmops-device", "slmops-sim"


def require_mosquitto() -> None:
    if MOSQUITTO is None or MOSQUITTO_PASSWD is None:
        pytest.skip("needs Debian's mosquitto (apt-get install mosquitto): the broker for MQTT nudges")


def refused(reason: str | None) -> bool:
    """Whether a CONNACK reason is the broker refusing the user name or password (MQTT 3.1.1 codes 4 and 5)."""
    text = (reason or "").lower()
    return "not authori" in text or "bad user name or password" in text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Broker:
    directory: Path
    port: int = 0
    passwords: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def configure(self) -> None:
        assert MOSQUITTO_PASSWD is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = self.port or _free_port()
        self.passwords = {CONTROL_USER: "control-secret", DEVICE_USER: "device-secret", SIM_USER: "sim-secret"}
        passwd = self.directory / "passwd"
        for index, (user, password) in enumerate(self.passwords.items()):
            args = [MOSQUITTO_PASSWD, *(["-c"] if index == 0 else []), "-b", str(passwd), user, password]
            subprocess.run(args, check=True, capture_output=True)
        acl = mosquitto_acl(CONTROL_USER) + f"\nuser {SIM_USER}\ntopic read slmops/nudge/#\n"
        (self.directory / "acl").write_text(acl)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous false",
            f"password_file {passwd}",
            f"acl_file {self.directory / 'acl'}",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 100000",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to 'mosquitto', which cannot read the test's files
        (self.directory / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    def start(self, timeout_s: float = 10.0) -> None:
        assert MOSQUITTO is not None and self.process is None
        log = (self.directory / "mosquitto.log").open("ab")
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.directory / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, (self.directory / "mosquitto.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not start listening"
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGKILL: the broker vanishes without saying goodbye, as a crashed one would."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None


@contextmanager
def running_broker(directory: Path) -> Iterator[Broker]:
    require_mosquitto()
    broker = Broker(directory)
    broker.configure()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


class Subscriber:
    """A plain paho client that records what it receives: (topic, payload) in ``messages``."""

    def __init__(self, broker: Broker, user: str, password: str, client_id: str, topics: list[str]) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connect_reason: str | None = None
        self.granted: list[int] = []
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        client.username_pw_set(user, password)

        def on_connect(client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            self.connect_reason = str(reason)
            self._connected.set()
            if not reason.is_failure:
                client.subscribe([(t, 1) for t in topics])

        def on_subscribe(_c: Any, _u: Any, _mid: Any, reasons: Any, _p: Any) -> None:
            self.granted = [r.value for r in reasons]
            self._subscribed.set()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        client.connect("127.0.0.1", broker.port, keepalive=10)
        client.loop_start()
        self.client = client

    def wait_connected(self, timeout_s: float = 10.0) -> str | None:
        self._connected.wait(timeout_s)
        return self.connect_reason

    def wait_subscribed(self, timeout_s: float = 10.0) -> bool:
        return self._subscribed.wait(timeout_s)

    def publish(self, topic: str) -> None:
        self.client.publish(topic, b"", qos=1).wait_for_publish(5)

    def received(self, timeout_s: float) -> list[tuple[str, bytes]]:
        """What arrived within ``timeout_s`` (waits the whole time: used to show that nothing arrives)."""
        deadline = time.monotonic() + timeout_s
        got = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return got

    def next(self, timeout_s: float = 10.0) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout_s)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
