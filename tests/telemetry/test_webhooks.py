from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from slmops.errors import ConfigError, SignatureError
from slmops.telemetry.alert_rules import ErrorRateRule, ReleaseHaltedRule, WebhookSpec
from slmops.telemetry.alerts import Facts, ReleaseFact, Transition, evaluate
from slmops.telemetry.webhooks import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    Delivery,
    WebhookSender,
    WebhookTarget,
    payload,
    route,
    sign,
    signature_header,
    targets_from_env,
    verify_signature,
)

NOW = 1_780_000_000
SECRET = b"s3cret-for-tests"


def _transition() -> Transition:
    rule = ReleaseHaltedRule(name="halted", kind="release_halted", severity="critical")
    facts = Facts(now=datetime(2026, 5, 1, tzinfo=UTC), releases=[ReleaseFact("r1", "halted", "gate failed")])
    (transition,) = evaluate([rule], facts).transitions
    return transition


def _target(url: str = "https://hooks.test/in", **kwargs: float) -> WebhookTarget:
    spec = WebhookSpec(name="ops", url=url, secret_env="OPS_SECRET", **kwargs)  # type: ignore[arg-type]
    return WebhookTarget(spec, SECRET)


@given(st.binary(min_size=1, max_size=64), st.binary(max_size=512), st.integers(0, 2**33), st.integers(-300, 300))
def test_signatures_verify_round_trip(secret: bytes, body: bytes, timestamp: int, skew: int) -> None:
    header = signature_header(secret, timestamp, body)
    assert verify_signature(header, body, secret, now=timestamp + skew, tolerance_s=300) == timestamp
    assert verify_signature(header, body, [b"old-secret", secret], now=timestamp) == timestamp  # during rotation


@given(st.binary(min_size=1, max_size=64), st.binary(min_size=1, max_size=512), st.data())
def test_signatures_reject_tampering(secret: bytes, body: bytes, data: st.DataObject) -> None:
    header = signature_header(secret, NOW, body)
    index = data.draw(st.integers(0, len(body) - 1))
    tampered = body[:index] + bytes([body[index] ^ 0x01]) + body[index + 1 :]
    with pytest.raises(SignatureError, match="no v1 signature matches"):
        verify_signature(header, tampered, secret, now=NOW)
    with pytest.raises(SignatureError, match="no v1 signature matches"):
        verify_signature(header, body, secret + b"x", now=NOW)
    replayed = f"t={NOW + 1},v1={sign(secret, NOW, body)}"  # the timestamp is signed too
    with pytest.raises(SignatureError, match="no v1 signature matches"):
        verify_signature(replayed, body, secret, now=NOW)


@given(st.integers(301, 10**6))
def test_signatures_reject_old_and_future_timestamps(offset: int) -> None:
    header = signature_header(SECRET, NOW, b"{}")
    for now in (NOW + offset, NOW - offset):
        with pytest.raises(SignatureError, match="beyond the 300s tolerance"):
            verify_signature(header, b"{}", SECRET, now=now, tolerance_s=300)


@pytest.mark.parametrize("header", ["", "v1=abc", f"t={NOW}", "t=abc,v1=00", "garbage"])
def test_malformed_signature_headers_are_refused(header: str) -> None:
    with pytest.raises(SignatureError, match="expected a X-Slmops-Signature header"):
        verify_signature(header, b"{}", SECRET, now=NOW)


def test_payload_is_stable_json_of_the_transition() -> None:
    transition = _transition()
    body = json.loads(payload(transition))
    assert payload(transition) == payload(transition)
    assert body["id"] == transition.id and body["type"] == "alert.firing"
    assert body["alert"]["labels"] == {"release": "r1"} and body["alert"]["severity"] == "critical"
    assert body["alert"]["summary"] == "release r1 halted: gate failed" and body["alert"]["resolved_at"] is None


def _sender(handler: httpx.MockTransport, sleeps: list[float]) -> WebhookSender:
    return WebhookSender(httpx.Client(transport=handler), clock=lambda: float(NOW), sleep=sleeps.append)


def test_retries_with_capped_full_jitter_until_delivered() -> None:
    # Prepare: the receiver fails five times, then takes it
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503 if len(seen) <= 5 else 204)

    sleeps: list[float] = []
    sender = _sender(httpx.MockTransport(handle), sleeps)

    # Execute
    result = sender.deliver(_target(backoff_base_s=1.0, backoff_max_s=4.0), _transition())

    # Assert: delays drawn within [0, min(cap, base * 2**(attempt-1))]; the same body and key every time
    assert result.delivered and result.attempts == 6 and result.status == 204
    assert len(sleeps) == 5
    assert all(0.0 <= d <= bound for d, bound in zip(sleeps, [1, 2, 4, 4, 4], strict=True)), sleeps
    assert len({r.content for r in seen}) == 1 and len({r.headers[IDEMPOTENCY_HEADER] for r in seen}) == 1
    assert all(verify_signature(r.headers[SIGNATURE_HEADER], r.content, SECRET, now=NOW) for r in seen)


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    calls = []

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        after = ["3", formatdate(NOW + 5, usegmt=True), "999"][min(len(calls), 3) - 1]  # seconds or an HTTP date
        return httpx.Response(429 if len(calls) < 3 else 503, headers={"Retry-After": after})

    sleeps: list[float] = []
    result = _sender(httpx.MockTransport(handle), sleeps).deliver(
        _target(backoff_base_s=0.01, backoff_max_s=10.0, max_attempts=4), _transition()
    )
    assert not result.delivered and result.retryable and result.attempts == 4 and result.status == 503
    assert 3.0 <= sleeps[0] <= 3.02 and 5.0 <= sleeps[1] <= 5.04 and sleeps[2] == 10.0


def test_network_errors_exhaust_into_a_retryable_result_and_refusals_are_final() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    sleeps: list[float] = []
    result = _sender(httpx.MockTransport(down), sleeps).deliver(_target(max_attempts=4), _transition())
    assert not result.delivered and result.retryable and result.attempts == 4 and result.status is None
    assert "ConnectError" in result.error and len(sleeps) == 3

    sleeps.clear()
    refused = _sender(httpx.MockTransport(lambda r: httpx.Response(400)), sleeps).deliver(_target(), _transition())
    assert not refused.delivered and not refused.retryable and refused.attempts == 1 and sleeps == []
    assert "not retried" in refused.error


class _Receiver(BaseHTTPRequestHandler):
    """A receiver as a user would write one: check the signature, drop repeats by key, sometimes lose the reply."""

    received: list[tuple[str, bytes]]
    processed: dict[str, bytes]
    fail_first: int

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            verify_signature(self.headers[SIGNATURE_HEADER], body, SECRET, now=NOW)
        except SignatureError:
            self.send_response(401)
            self.end_headers()
            return
        key = self.headers[IDEMPOTENCY_HEADER]
        self.received.append((key, body))
        self.processed.setdefault(key, body)  # processed once, whatever the sender repeats
        self.send_response(500 if len(self.received) <= self.fail_first else 200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[_Receiver]]]:
    handler = type("Handler", (_Receiver,), {"received": [], "processed": {}, "fail_first": 2})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_at_least_once_to_a_real_server_with_idempotent_receipt(receiver: tuple[str, type[_Receiver]]) -> None:
    url, handler = receiver
    transition = _transition()
    sleeps: list[float] = []
    with httpx.Client() as client:
        sender = WebhookSender(client, clock=lambda: float(NOW), sleep=sleeps.append)
        first = sender.deliver(_target(url, max_attempts=2), transition)  # 500, 500: kept for the next tick
        second = sender.deliver(_target(url, max_attempts=2), transition)  # the outbox tries again
    assert not first.delivered and first.retryable and second.delivered and second.attempts == 1
    assert [key for key, _ in handler.received] == [transition.id] * 3
    assert handler.processed == {transition.id: payload(transition)}


def test_routing_by_rule_and_severity() -> None:
    specs = [
        WebhookSpec(name="all", url="https://a.test", secret_env="A"),
        WebhookSpec(name="pager", url="https://p.test", secret_env="P", min_severity="critical"),
    ]
    critical = _transition()
    rules = [ReleaseHaltedRule(name="halted", kind="release_halted", severity="critical")]
    assert [d.webhook for d in route([critical], rules, specs)] == ["all", "pager"]
    only = [ReleaseHaltedRule(name="halted", kind="release_halted", severity="critical", webhooks=["pager"])]
    assert [d.webhook for d in route([critical], only, specs)] == ["pager"]
    warning_rule = ErrorRateRule(name="errors", kind="error_rate", threshold=0.1)
    warning = replace(critical, alert=replace(critical.alert, rule="errors", severity="warning"))
    assert [d.webhook for d in route([warning], [warning_rule], specs)] == ["all"]


def test_targets_read_secrets_from_the_environment_and_say_which_is_missing() -> None:
    spec = WebhookSpec(name="ops", url="https://a.test", secret_env="OPS_SECRET")
    targets = targets_from_env([spec], {"OPS_SECRET": "abc"})
    assert targets["ops"].secret == b"abc" and "abc" not in repr(targets["ops"])
    with pytest.raises(ConfigError, match=r"\$OPS_SECRET, which is not set"):
        targets_from_env([spec], {})
    sleeps: list[float] = []
    (unknown,) = _sender(httpx.MockTransport(lambda r: httpx.Response(200)), sleeps).deliver_all(
        targets, [Delivery("nope", _transition())]
    )
    assert not unknown.delivered and not unknown.retryable and "no webhook named 'nope'" in unknown.error
