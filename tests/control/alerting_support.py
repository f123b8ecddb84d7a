"""What the alerting and cost tests share: enrolled devices with a site, heartbeats, telemetry windows, a halted
release row, and a real webhook receiver on loopback that checks signatures and drops repeated keys."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.orm import Session

from slmops.control.db import ReleaseRow
from slmops.control.devices import get_device, report_status
from slmops.control.enrollment import create_enrollment_token, enroll_device
from slmops.control.plane import ControlPlane
from slmops.control.telemetry import store_telemetry
from slmops.core.wire import Health, TelemetryBatch, TelemetryWindow
from slmops.errors import SignatureError
from slmops.telemetry import histogram_from_ms
from slmops.telemetry.webhooks import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, verify_signature
from tests.control.conftest import Device, GiB

SECRET = "s3cret-for-tests"


def enroll(plane: ControlPlane, memory_gib: float, site: str | None = None) -> tuple[str, str]:
    """An approved device (its site label, if any); returns its id and device class."""
    token = create_enrollment_token(
        plane,
        max_uses=1,
        expires_in_s=None,
        auto_approve=True,
        labels={"site": site} if site else {},
        created_by="test",
    ).token
    answer = enroll_device(plane, Device(Ed25519PrivateKey.generate(), int(memory_gib * GiB)).enroll_request(token))
    return answer.device_id, get_device(plane, answer.device_id).device_class


def heartbeat(plane: ControlPlane, device_id: str, health: Health = "ok") -> None:
    from slmops.core.wire import StatusReport

    report_status(plane, device_id, StatusReport(phase="serving", health=health))


def send_window(
    plane: ControlPlane,
    device_id: str,
    digest: str | None,
    start: str,
    *,
    requests: int = 0,
    errors: int = 0,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    latencies_ms: list[float] | None = None,
    window_s: float = 60.0,
) -> None:
    window = TelemetryWindow(
        id=uuid.uuid4().hex,
        version_digest=digest,
        window_start=start,
        window_s=window_s,
        requests=requests,
        errors=errors,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_ms=histogram_from_ms(latencies_ms or []),
    )
    store_telemetry(plane, device_id, TelemetryBatch(windows=[window]))


def halted_release(plane: ControlPlane, release_id: str, blueprint: str, started_at: float, state: str) -> None:
    """A release row as the controller leaves it (the fields the alerts look at are blueprint, state, reason)."""
    with Session(plane.engine) as session:
        session.add(
            ReleaseRow(
                id=release_id,
                blueprint=blueprint,
                state=state,
                from_digest=None,
                from_label=None,
                from_digests=[],
                to_name="tiny",
                to_digest="sha256:" + "a" * 64,
                to_label="tiny@v2",
                to_digests=[],
                policy={},
                stage_index=0,
                stage_started_at=started_at,
                started_at=started_at,
                updated_at=started_at,
                finished_at=started_at if state == "halted" else None,
                created_by="test",
                reason="canary error rate 9% above 2%" if state == "halted" else "",
                revision=1,
                evaluation=None,
                evaluated_at=None,
            )
        )
        session.commit()


@dataclass
class Receiver:
    """A webhook receiver: answers 500 to the first ``fail_first`` requests, then 200; keeps what it accepted,
    once per idempotency key."""

    url: str = ""
    fail_first: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)  # every request that came, in order
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)  # by idempotency key, after dedup
    bad_signatures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def serve_receiver(receiver: Receiver) -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            key = self.headers.get(IDEMPOTENCY_HEADER, "")
            with receiver.lock:
                receiver.requests.append({"key": key, "body": body})
                try:
                    verify_signature(self.headers.get(SIGNATURE_HEADER, ""), body, SECRET.encode(), now=time.time())
                except SignatureError:
                    receiver.bad_signatures += 1
                    status = 401
                else:
                    if len(receiver.requests) <= receiver.fail_first:
                        status = 500
                    else:
                        status = 200
                        receiver.accepted.setdefault(key, json.loads(body))  # a repeated key changes nothing
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
