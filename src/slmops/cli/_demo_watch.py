"""The demo's way back: alert rules and a price table for its control plane, a webhook receiver that checks each
delivery's signature, a simulated class whose users start sending longer prompts (drift), and the reports."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from slmops.cli._common import console

__all__ = ["DRIFT_CLASS", "Receiver", "Watch", "prepare", "show_the_way_back"]

DRIFT_CLASS = "x86_64-4gb"  # the class of the drift fleet's profile (4 GiB, x86_64)
_DRIFT_DEVICES = 24
_SHIFT_AFTER_S = 110  # after the drift fleet starts: its first ~70 s are the version's reference on the class
_SECRET_ENV = "SLMOPS_WEBHOOK_DEMO_SECRET"

_RULES = """\
# The demo's alert rules (see examples/alerts/rules.yaml for every kind). The controller evaluates them each tick
# and delivers every transition to the webhook below, signed with the secret in {secret_env}.
rules:
  - {{name: drift, kind: drift, signal: any, severity: warning}}
  - {{name: release-halted, kind: release_halted, severity: critical}}
  - {{name: error-rate, kind: error_rate, threshold: 0.1, min_requests: 200, for_s: 30, severity: critical}}
  - {{name: device-offline, kind: device_offline, ttl_s: 120, for_s: 60, severity: warning}}
  - {{name: no-healthy-device, kind: class_unhealthy, ttl_s: 120, for_s: 60, severity: critical}}
webhooks:
  - {{name: demo, url: "{url}", secret_env: {secret_env}, min_severity: info, backoff_max_s: 10}}
"""

_PRICES_EXTRA = """\
  - device_class: x86_64-2gb
    device_usd: 150
    life_months: 60
    watts: 8
    source: "example: a small x86 gateway with 2 GB; round figures"
  - device_class: aarch64-2gb
    device_usd: 60
    life_months: 48
    watts: 5
    source: "example: a single-board computer with 2 GB, power supply and case; round figures"
  - device_class: x86_64-4gb
    device_usd: 250
    life_months: 60
    watts: 12
    source: "example: a fanless thin client with 4 GB; round figures"
"""

_DRIFT_FLEET = """\
# {count} more simulated counters (4 GiB each: their own device class). After {after} s their users send prompts
# {factor}x as long as before; nothing else changes.
seed: 11
poll_interval_s: 5
profiles:
  counter-4gb: {{memory_bytes: 4294967296, speed_factor: 1.5}}
devices:
  - {{profile: counter-4gb, count: {count}, labels: {{site: demo}}}}
runtime:
  requests_per_window: 40
  telemetry_window_s: 5
  traffic: {{prompt_tokens_median: 90, prompt_nll_sample_rate: 0.5}}
  drift:
    - {{profile: counter-4gb, after_s: {after}, signal: prompt_tokens, factor: {factor}}}
"""


class Step(Protocol):
    """What the demo's runner offers (``cli/demo.py``'s ``_Demo``)."""

    workdir: Path

    def run(
        self, title: str, home: Path, *args: str, env: dict[str, str] | None = None, expect: int | tuple[int, ...] = 0
    ) -> int: ...

    def capture(self, home: Path, *args: str, env: dict[str, str] | None = None) -> Any: ...

    def start(self, name: str, title: str, home: Path, *args: str, env: dict[str, str] | None = None) -> None: ...

    def wait(self, what: str, check: Any, timeout_s: float) -> None: ...


@dataclass
class Receiver:
    """A webhook receiver on loopback, as an operator's would be: checks the signature, drops repeats by key."""

    secret: str  # the HMAC secret, shared with the server through an environment variable
    received: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0
    repeats: int = 0
    _keys: set[str] = field(default_factory=set)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/alerts"

    def start(self) -> None:
        from slmops.errors import SignatureError
        from slmops.telemetry.webhooks import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, verify_signature

        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 1 << 20))
                try:
                    verify_signature(
                        self.headers.get(SIGNATURE_HEADER, ""), body, receiver.secret.encode(), now=time.time()
                    )
                except SignatureError:
                    receiver.refused += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                key = self.headers.get(IDEMPOTENCY_HEADER, "")
                if key in receiver._keys:
                    receiver.repeats += 1
                else:
                    receiver._keys.add(key)
                    receiver.received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="demo-webhook", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@dataclass
class Watch:
    receiver: Receiver
    server_env: dict[str, str]  # what the demo's `slmops server` runs with


def prepare(workdir: Path, *, drift_step_s: float = 10.0, drift_reference_s: float = 60.0) -> Watch:
    """Write the alert rules and the price table, start the webhook receiver; the server's environment for them."""
    from importlib import resources

    receiver = Receiver(secrets.token_hex(32))
    receiver.start()
    rules = workdir / "alert-rules.yaml"
    rules.write_text(_RULES.format(url=receiver.url, secret_env=_SECRET_ENV))
    prices = workdir / "prices.yaml"
    example = (resources.files("slmops.telemetry") / "data" / "prices.example.yaml").read_text()
    prices.write_text(example.rstrip("\n") + "\n" + _PRICES_EXTRA)
    env = {
        "SLMOPS_ALERT_RULES_FILE": str(rules),
        "SLMOPS_PRICE_TABLE_FILE": str(prices),
        _SECRET_ENV: receiver.secret,
        # drift in short steps against each version's first minute on a class, so the demo sees it in minutes
        "SLMOPS_DRIFT_STEP_S": str(drift_step_s),
        "SLMOPS_DRIFT_REFERENCE_S": str(drift_reference_s),
        "SLMOPS_DRIFT_CURRENT_STEPS": "3",
        "SLMOPS_DRIFT_HORIZON_S": "3600",
    }
    return Watch(receiver, env)


def _firing_drift(step: Step, central: Path, operator: dict[str, str]) -> Callable[[], bool]:
    def check() -> bool:
        alerts = step.capture(central, "alerts", "list", "--status", "firing", "--json", env=operator)
        return any(a["rule"] == "drift" and a["labels"].get("device_class") == DRIFT_CLASS for a in alerts)

    return check


def show_the_way_back(
    step: Step,
    central: Path,
    operator: dict[str, str],
    url: str,
    watch: Watch,
    *,
    shift_after_s: float = _SHIFT_AFTER_S,
) -> None:
    """Drift on one class, the alert it raises (and the halted release's), their webhooks, and the cost report."""
    fleet_file = step.workdir / "drift-fleet.yaml"
    fleet_file.write_text(_DRIFT_FLEET.format(count=_DRIFT_DEVICES, after=shift_after_s, factor=2.5))
    console.rule("[bold]a class whose inputs shift")
    console.print(fleet_file.read_text(), highlight=False)
    enroll = step.capture(
        central, "enroll-token", "create", "--uses", str(_DRIFT_DEVICES), "--auto-approve", "--json", env=operator
    )["token"]
    step.start(
        "drift-sim",
        f"start {_DRIFT_DEVICES} simulated counters",
        central,
        "sim", str(fleet_file), "--server", url, "--enroll-token", enroll, "--max-connections", "4",
    )  # fmt: skip
    started = time.monotonic()
    step.wait(f"a firing drift alert on {DRIFT_CLASS}", _firing_drift(step, central, operator), shift_after_s + 240)
    console.print(f"[dim](the alert fired {time.monotonic() - started - shift_after_s:.0f} s after the shift)[/]")
    step.run(
        "drift per version and class: PSI and a two-sample test per signal", central, "drift", "show", env=operator
    )
    step.run("the alerts: firing and resolved, with their deliveries", central, "alerts", "list", env=operator)
    step.wait(
        "the webhook deliveries", lambda: any(r.get("type") == "alert.firing" for r in watch.receiver.received), 60
    )
    console.rule("[bold]what the webhook receiver got (signatures checked, repeats dropped by Idempotency-Key)")
    for body in watch.receiver.received:
        alert = body.get("alert", {})
        labels = " ".join(f"{k}={v}" for k, v in sorted(alert.get("labels", {}).items()))
        console.print(f"{body.get('type')}  {alert.get('rule')}  {labels}  {alert.get('summary', '')}", highlight=False)
    console.print(
        f"[dim]refused (bad signature): {watch.receiver.refused}, repeats dropped: {watch.receiver.repeats}[/]"
    )
    plot = step.workdir / "cost.svg"
    step.run(
        "the cost report: tokens served on the edge, priced against hosted models, beside the edge's own cost",
        central,
        "cost", "--plot", str(plot),
        env=operator,
    )  # fmt: skip
