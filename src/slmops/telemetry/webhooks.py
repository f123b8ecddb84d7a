"""Delivery of alert transitions to webhooks: signed JSON, an idempotency key, retries with full-jitter backoff.

Each request carries:

- the body: the transition as JSON (:func:`payload`), the same bytes on every attempt;
- ``X-Slmops-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`` (Stripe's scheme: the timestamp
  is signed with the body, so a captured request cannot be replayed after the tolerance window);
- ``Idempotency-Key``: the transition's id, the same for every retry and redelivery of one (alert, kind, episode).

Delivery is at least once: an attempt that fails with a network error, a timeout, 408, 425, 429 or a 5xx is
retried after a delay drawn uniformly from ``[0, min(backoff_max_s, backoff_base_s * 2**(attempt - 1))]`` (AWS
"full jitter", through tenacity), or after ``Retry-After`` when the server sends one (capped the same way). When
the attempts run out the result says ``retryable``: the caller keeps the delivery in its outbox and tries again on
its next tick. Any other status is a permanent refusal (not retried). Receivers drop repeats by the key and check
the signature with :func:`verify_signature`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx

from slmops.errors import ConfigError, MissingExtraError, SignatureError
from slmops.telemetry.alert_rules import SEVERITIES, AlertRule, WebhookSpec
from slmops.telemetry.alerts import AlertState, Transition

if TYPE_CHECKING:
    from tenacity import RetryCallState

__all__ = [
    "IDEMPOTENCY_HEADER",
    "SIGNATURE_HEADER",
    "Delivery",
    "DeliveryResult",
    "WebhookSender",
    "WebhookTarget",
    "payload",
    "route",
    "sign",
    "signature_header",
    "targets_from_env",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Slmops-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
_RETRY_STATUSES = frozenset({408, 425, 429})


def _time(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _alert(alert: AlertState) -> dict[str, Any]:
    return {
        "fingerprint": alert.fingerprint,
        "rule": alert.rule,
        "labels": dict(sorted(alert.labels.items())),
        "severity": alert.severity,
        "status": alert.status,
        "active_since": _time(alert.active_since),
        "fired_at": _time(alert.fired_at),
        "resolved_at": _time(alert.resolved_at),
        "value": alert.value,
        "summary": alert.summary,
    }


def payload(transition: Transition) -> bytes:
    """The JSON body of a transition: stable bytes (sorted keys), so every retry sends and signs the same."""
    body = {"id": transition.id, "type": f"alert.{transition.kind}", "at": _time(transition.at)}
    body["alert"] = _alert(transition.alert)  # type: ignore[assignment]
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``b"<timestamp>." + body``."""
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: bytes, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={sign(secret, timestamp, body)}"


def verify_signature(
    header: str, body: bytes, secrets: bytes | Sequence[bytes], *, now: float, tolerance_s: float = 300.0
) -> int:
    """Check a ``X-Slmops-Signature`` header against the body; return its timestamp or raise :class:`SignatureError`.

    Any ``v1`` matching any of ``secrets`` passes (several during a secret rotation); the timestamp must be within
    ``tolerance_s`` of ``now`` (unix seconds), so an old request replayed later is refused."""
    keys = [secrets] if isinstance(secrets, bytes) else list(secrets)
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureError(
            f"expected a {SIGNATURE_HEADER} header like 't=<unix seconds>,v1=<hex>'; got {header[:80]!r}"
        )
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError(
            f"signature timestamp {timestamp} is {abs(now - timestamp):.0f}s from now, beyond the {tolerance_s:g}s "
            "tolerance; refuse it (a replay, or check the clocks of sender and receiver)"
        )
    for key in keys:
        expected = sign(key, timestamp, body)
        if any(hmac.compare_digest(expected, candidate) for candidate in candidates):
            return timestamp
    raise SignatureError("no v1 signature matches the body; check the webhook secret (or the body was altered)")


@dataclass(frozen=True)
class WebhookTarget:
    spec: WebhookSpec
    secret: bytes = field(repr=False)


def targets_from_env(specs: Sequence[WebhookSpec], environ: Mapping[str, str]) -> dict[str, WebhookTarget]:
    """The receivers with their secrets read from ``environ`` (pass ``os.environ``), by name."""
    targets = {}
    for spec in specs:
        secret = environ.get(spec.secret_env, "")
        if not secret:
            raise ConfigError(
                f"webhook '{spec.name}' takes its secret from ${spec.secret_env}, which is not set or empty; "
                f"export it (e.g. `export {spec.secret_env}=$(openssl rand -hex 32)`) and share it with the receiver"
            )
        targets[spec.name] = WebhookTarget(spec, secret.encode())
    return targets


@dataclass(frozen=True)
class Delivery:
    webhook: str
    transition: Transition


def route(
    transitions: Sequence[Transition], rules: Sequence[AlertRule], specs: Sequence[WebhookSpec]
) -> list[Delivery]:
    """Each transition to the rule's webhooks (all of them when the rule names none) that take its severity."""
    by_rule = {rule.name: rule for rule in rules}
    deliveries = []
    for transition in transitions:
        rule = by_rule.get(transition.alert.rule)
        wanted = None if rule is None else rule.webhooks
        level = SEVERITIES.index(transition.alert.severity)
        for spec in specs:
            if (wanted is None or spec.name in wanted) and level >= SEVERITIES.index(spec.min_severity):
                deliveries.append(Delivery(spec.name, transition))
    return deliveries


@dataclass(frozen=True)
class DeliveryResult:
    delivery: Delivery
    delivered: bool
    attempts: int
    status: int | None = None  # of the last response; None when none came
    error: str = ""
    retryable: bool = False  # not delivered, but worth another try later: keep it in the outbox


class _Retry(Exception):
    def __init__(self, message: str, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


def _retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


class WebhookSender:
    """Sends deliveries through ``client``; ``clock`` (unix seconds) stamps signatures, ``sleep`` waits between
    attempts (tests pass their own)."""

    def __init__(
        self,
        client: httpx.Client,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self._clock = clock
        self._sleep = sleep

    def _attempt(self, target: WebhookTarget, transition: Transition, body: bytes) -> int:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "slmops-webhook",
            IDEMPOTENCY_HEADER: transition.id,
            SIGNATURE_HEADER: signature_header(target.secret, int(self._clock()), body),
        }
        try:
            response = self._client.post(target.spec.url, content=body, headers=headers, timeout=target.spec.timeout_s)
        except httpx.TransportError as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status in _RETRY_STATUSES or status >= 500:
            retry_after = _retry_after(response.headers.get("Retry-After"), self._clock())
            raise _Retry(f"HTTP {status}", status, retry_after)
        return status

    def deliver(self, target: WebhookTarget, transition: Transition) -> DeliveryResult:
        """One delivery with retries; never raises for a receiver's failure, the result says what happened."""
        try:
            import tenacity
        except ImportError as exc:
            raise MissingExtraError("server", "webhook delivery", "tenacity") from exc
        spec, body = target.spec, payload(transition)
        delivery = Delivery(spec.name, transition)
        jitter = tenacity.wait_random_exponential(multiplier=spec.backoff_base_s, max=spec.backoff_max_s)

        def wait(state: RetryCallState) -> float:
            delay = float(jitter(state))
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, _Retry) and error.retry_after_s is not None:
                delay = max(delay, min(error.retry_after_s, spec.backoff_max_s))
            return delay

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(spec.max_attempts),
            wait=wait,
            retry=tenacity.retry_if_exception_type(_Retry),
            sleep=self._sleep,
            reraise=True,
        )
        attempts = 0

        def attempt() -> int:
            nonlocal attempts
            attempts += 1
            return self._attempt(target, transition, body)

        try:
            status = retrying(attempt)
        except _Retry as exc:
            return DeliveryResult(delivery, False, attempts, exc.status, str(exc), retryable=True)
        if 200 <= status < 300:
            return DeliveryResult(delivery, True, attempts, status)
        return DeliveryResult(delivery, False, attempts, status, f"refused with HTTP {status}; not retried")

    def deliver_all(self, targets: Mapping[str, WebhookTarget], deliveries: Sequence[Delivery]) -> list[DeliveryResult]:
        """Every delivery in order; one for a webhook not in ``targets`` fails as not retryable."""
        results = []
        for delivery in deliveries:
            target = targets.get(delivery.webhook)
            if target is None:
                results.append(DeliveryResult(delivery, False, 0, error=f"no webhook named '{delivery.webhook}'"))
                continue
            results.append(self.deliver(target, delivery.transition))
        return results
