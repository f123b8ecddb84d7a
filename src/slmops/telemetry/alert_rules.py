"""Alert rules and webhook receivers as written in YAML; parsed with ``yaml.safe_load`` into pydantic models.

::

    rules:
      - name: device-offline
        kind: device_offline        # a device not seen for ttl_s; one alert per class (or per device)
        ttl_s: 900
        for_s: 0
        severity: warning
        labels: {team: edge}
      - {name: drift, kind: drift, signal: any, threshold: 0.25, for_s: 1800}   # PSI; no threshold: the verdict
      - {name: errors, kind: error_rate, threshold: 0.05, min_requests: 100, for_s: 300}
      - {name: halted, kind: release_halted, severity: critical}
      - {name: no-healthy, kind: class_unhealthy, ttl_s: 300}
    webhooks:
      - {name: ops, url: "https://hooks.example.org/slmops", secret_env: SLMOPS_WEBHOOK_OPS_SECRET}

A rule delivers to every webhook unless it names some in ``webhooks``; a webhook takes transitions at or above its
``min_severity``. Secrets are never written in the file: ``secret_env`` names the environment variable.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slmops.telemetry._yaml import load_yaml_model, require_unique
from slmops.telemetry.drift import Signal

__all__ = [
    "SEVERITIES",
    "AlertConfig",
    "AlertRule",
    "ClassUnhealthyRule",
    "DeviceOfflineRule",
    "DriftRule",
    "ErrorRateRule",
    "ReleaseHaltedRule",
    "Severity",
    "WebhookSpec",
    "load_alert_config",
]

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")  # in increasing order
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"


class _Rule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=_NAME)
    for_s: float = Field(default=0.0, ge=0)  # how long the condition must hold before the alert fires
    severity: Severity = "warning"
    labels: dict[str, str] = Field(default_factory=dict, max_length=16)  # static, added to every alert of the rule
    webhooks: list[str] | None = None  # names of receivers; None: all of them

    @field_validator("labels")
    @classmethod
    def _label_names(cls, labels: dict[str, str]) -> dict[str, str]:
        reserved = {"alertname", "severity", "device_class", "device", "version", "signal", "release"}
        for key in labels:
            if key in reserved:
                raise ValueError(f"label '{key}' is set by the rule itself; reserved: {', '.join(sorted(reserved))}")
        return labels


class DeviceOfflineRule(_Rule):
    kind: Literal["device_offline"]
    ttl_s: float = Field(gt=0)  # not seen for longer than this is offline (never seen counts too)
    group_by: Literal["device_class", "device"] = "device_class"


class DriftRule(_Rule):
    kind: Literal["drift"]
    signal: Literal[Signal, "any"] = "any"
    threshold: float | None = Field(default=None, gt=0)  # PSI; None: the verdict's own "alert" level


class ErrorRateRule(_Rule):
    kind: Literal["error_rate"]
    threshold: float = Field(gt=0, lt=1)  # errors / requests above this fires
    min_requests: int = Field(default=100, ge=1)


class ReleaseHaltedRule(_Rule):
    kind: Literal["release_halted"]


class ClassUnhealthyRule(_Rule):
    kind: Literal["class_unhealthy"]
    ttl_s: float = Field(default=300.0, gt=0)  # a healthy device reports health "ok" and was seen this recently


AlertRule = Annotated[
    DeviceOfflineRule | DriftRule | ErrorRateRule | ReleaseHaltedRule | ClassUnhealthyRule,
    Field(discriminator="kind"),
]


class WebhookSpec(BaseModel):
    """A receiver of alert transitions; delivered by :mod:`slmops.telemetry.webhooks`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=_NAME)
    url: str = Field(pattern=r"^https?://[^\s]+$", max_length=2048)
    secret_env: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$")  # environment variable holding the HMAC secret
    min_severity: Severity = "info"
    timeout_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=6, ge=1, le=20)
    backoff_base_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)


class AlertConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rules: list[AlertRule] = Field(default_factory=list)
    webhooks: list[WebhookSpec] = Field(default_factory=list)
    resolved_retention_s: float = Field(default=3600.0, gt=0)  # resolved alerts stay listed this long

    @model_validator(mode="after")
    def _references(self) -> AlertConfig:
        require_unique("rule name", [r.name for r in self.rules])
        require_unique("webhook name", [w.name for w in self.webhooks])
        known = {w.name for w in self.webhooks}
        for rule in self.rules:
            unknown = sorted(set(rule.webhooks or ()) - known)
            if unknown:
                raise ValueError(
                    f"rule '{rule.name}' names unknown webhooks {', '.join(unknown)}; known: "
                    f"{', '.join(sorted(known)) or 'none'}"
                )
        return self


def load_alert_config(text: str, *, origin: str = "alert rules") -> AlertConfig:
    """Parse the rules file's text; errors name the field and line and say how to fix the file."""
    hint = (
        "each rule needs a name and a kind: device_offline (ttl_s), drift (signal, threshold), error_rate "
        "(threshold, min_requests), release_halted, class_unhealthy (ttl_s); any rule may set for_s, severity, labels"
    )
    return load_yaml_model(text, AlertConfig, origin=origin, hint=hint)
