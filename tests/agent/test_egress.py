"""The egress test: every byte between real agents and a real control plane, recorded, holds no prompt text unless
both consents were given, and then only redacted text.

A real ``slmops server`` process and three real ``slmops agent`` processes (a tiny GGUF model), each agent talking to
the control plane through its own recording TCP proxy on loopback. Canary strings (an e-mail address, a card number
with a valid Luhn digit, an IBAN, a phone number and a unique nonsense token) are planted in prompts and corrections
sent to each agent's local API, and every completion is rated:

- agent ``off``: its blueprint's feedback is off, the site opted in;
- agent ``no-consent``: its blueprint allows feedback, the site did not opt in;
- agent ``both``: the blueprint allows feedback and the site opted in.

Then each agent reports status, telemetry and feedback for a few polls. Asserted on the captured bytes (both
directions): for ``off`` and ``no-consent`` no canary, no nonsense token and no prompt text at all; for ``both`` the
nonsense token (not personal data) arrives, none of the personal canaries do, and their placeholders do.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from slmops.cli import run
from slmops.config import Settings
from slmops.registry import Registry
from tests.agent.test_e2e_control_plane import Fleet, _wait
from tests.servers import free_port
from tests.tiny_gguf import write_tiny_gguf

EMAIL = "canary.mailbox@example.org"
CARD = "4539 1488 0343 6467"  # Luhn-valid
IBAN = "DE89 3704 0044 0532 0130 00"  # mod-97-valid
PHONE = "+49 30 1234567"
PII = {"EMAIL": EMAIL, "CARD": CARD, "IBAN": IBAN, "PHONE": PHONE}
PROMPT_WORDS = "the quartermaster asked about the lighthouse invoice"


def _forms(value: str) -> list[str]:
    """The canary as written and without its spaces (how a leak might be normalised)."""
    return list(dict.fromkeys([value, value.replace(" ", "")]))


def _luhn_ok(number: str) -> bool:
    digits = [int(d) for d in number if d.isdigit()][::-1]
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(digits))
    return total % 10 == 0


class RecordingProxy:
    """A TCP forwarder on loopback that keeps every byte in both directions."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sent = bytearray()  # agent → control plane
        self.received = bytearray()  # control plane → agent
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []

    def start(self) -> RecordingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, self.sent), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.received), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, record: bytearray) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    record.extend(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def captured(self) -> bytes:
        with self._lock:
            return bytes(self.sent) + b"\n" + bytes(self.received)

    def requests_to(self, fragment: str) -> int:
        with self._lock:
            return bytes(self.sent).count(fragment.encode())

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()


@dataclass
class Device:
    name: str
    site: str
    opt_in: bool
    api_port: int = field(default_factory=free_port)
    proxy: RecordingProxy | None = None


BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata: {{name: {name}}}
spec:
  selector: {{labels: {{site: {site}}}}}
  model: {{name: tiny, ref: stable}}
  runtime: {{threads: 1, context_tokens: 1024}}
{feedback}"""


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    import signal

    fleet = Fleet(tmp_path)
    yield fleet
    for name in list(fleet.procs):
        fleet.stop(name, signal.SIGKILL)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _chat_and_rate(device: Device, token: str) -> dict[str, object]:
    base = f"http://127.0.0.1:{device.api_port}"
    prompt = f"{PROMPT_WORDS}: mail {EMAIL}, card {CARD}, IBAN {IBAN}, call {PHONE}, code {token}"
    answer = httpx.post(
        f"{base}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    rated = httpx.post(
        f"{base}/v1/feedback",
        json={"completion_id": answer.json()["id"], "rating": "down", "correction": f"reply to {EMAIL} re {token}"},
        timeout=30,
    )
    assert rated.status_code == 201, rated.text
    body: dict[str, object] = rated.json()
    return body


def test_canaries_never_leave_without_both_consents_and_leave_only_redacted_with_them(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a model, a running control plane, two blueprints (feedback off / opt_in), three agents behind proxies.
    assert _luhn_ok(CARD)
    token = f"zorblax-{secrets.token_hex(6)}"
    registry = Registry.open(Settings())
    registry.import_model(write_tiny_gguf(tmp_path / "models" / "tiny.gguf", seed=1, context_length=1024), "tiny")
    registry.tag("tiny@v1", "stable")
    registry.close()
    fleet.start_server(capsys, monkeypatch)
    upstream = int(fleet.url.rsplit(":", 1)[1])
    for name, site, feedback in (
        ("fb-off", "egress-off", ""),
        ("fb-on", "egress-on", "  feedback: {mode: opt_in, sample_rate: 1.0, max_samples_per_day: 10}\n"),
    ):
        path = tmp_path / f"{name}.yaml"
        path.write_text(BLUEPRINT.format(name=name, site=site, feedback=feedback))
        assert run(["apply", "-f", str(path)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert run(["enroll-token", "create", "--uses", "3", "--auto-approve", "--json"]) == 0
    enroll_token = json.loads(capsys.readouterr().out)["token"]
    devices = [
        Device("off", "egress-off", opt_in=True),
        Device("no-consent", "egress-on", opt_in=False),
        Device("both", "egress-on", opt_in=True),
    ]
    for device in devices:
        device.proxy = RecordingProxy(upstream).start()
        fleet.start(
            f"agent-{device.name}",
            [
                "agent",
                "--server",
                f"http://127.0.0.1:{device.proxy.port}",
                "--enroll-token",
                enroll_token,
                "--data-dir",
                str(tmp_path / f"agent-{device.name}"),
                "--label",
                f"site={device.site}",
                "--poll-interval-s",
                "0.3",
                "--probation-s",
                "0",
                "--telemetry-window-s",
                "0.3",
                "--api-port",
                str(device.api_port),
                *(["--feedback-opt-in"] if device.opt_in else []),
            ],
        )
    try:
        _wait("three agents serving", lambda: all(_healthy(d.api_port) for d in devices), 90, fleet.logs)

        # Execute: canaries in prompts and corrections, every completion rated; then let the agents report.
        answers = {d.name: _chat_and_rate(d, token) for d in devices}
        assert [answers[d.name]["queued_for_upload"] for d in devices] == [False, False, True], answers
        before = {d.name: d.proxy.requests_to("/telemetry") for d in devices if d.proxy}
        _wait(
            "the feedback upload of the consenting agent",
            lambda: devices[2].proxy is not None and devices[2].proxy.requests_to("/feedback ") >= 1,
            60,
            fleet.logs,
        )
        _wait(
            "two more telemetry batches from every agent",
            lambda: all(
                d.proxy is not None and d.proxy.requests_to("/telemetry") >= before[d.name] + 2 for d in devices
            ),
            60,
            fleet.logs,
        )
        stored = httpx.get(
            f"{fleet.url}/api/v1/feedback", headers={"Authorization": f"Bearer {fleet.token}"}, timeout=10
        )
        assert stored.status_code == 200, stored.text
    finally:
        for device in devices:
            if device.proxy is not None:
                device.proxy.close()

    # Assert: without both consents nothing of the prompts left; with both, only the redacted text did.
    for device in devices[:2]:
        assert device.proxy is not None
        wire = device.proxy.captured()
        assert len(wire) > 10_000 and b"/status" in wire  # the agent did talk to the control plane
        for secret in [*(f for value in PII.values() for f in _forms(value)), token, PROMPT_WORDS]:
            assert secret.encode() not in wire, f"{secret!r} left agent {device.name}"
        assert b"/feedback " not in wire
    both = devices[2].proxy
    assert both is not None
    wire = both.captured()
    assert token.encode() in wire and PROMPT_WORDS.encode() in wire
    for kind, value in PII.items():
        for form in _forms(value):
            assert form.encode() not in wire, f"{kind} canary {form!r} left agent 'both'"
        assert f"<{kind}>".encode() in wire
    assert token in stored.text and EMAIL not in stored.text
