from __future__ import annotations

import pytest

from slmops.errors import ConfigError
from slmops.telemetry.alert_rules import (
    ClassUnhealthyRule,
    DeviceOfflineRule,
    DriftRule,
    ErrorRateRule,
    ReleaseHaltedRule,
    load_alert_config,
)

GOOD = """\
rules:
  - name: device-offline
    kind: device_offline
    ttl_s: 900
    severity: warning
    labels: {team: edge}
  - {name: drift, kind: drift, signal: prompt_nll, threshold: 0.25, for_s: 1800}
  - {name: errors, kind: error_rate, threshold: 0.05, min_requests: 100, for_s: 300, webhooks: [ops]}
  - {name: halted, kind: release_halted, severity: critical}
  - {name: no-healthy, kind: class_unhealthy}
webhooks:
  - {name: ops, url: "https://hooks.example.org/slmops", secret_env: SLMOPS_WEBHOOK_OPS_SECRET}
  - {name: chat, url: "http://127.0.0.1:9000/in", secret_env: CHAT_SECRET, min_severity: critical}
"""


def test_a_rules_file_parses_into_typed_rules() -> None:
    config = load_alert_config(GOOD)
    kinds = [type(r) for r in config.rules]
    assert kinds == [DeviceOfflineRule, DriftRule, ErrorRateRule, ReleaseHaltedRule, ClassUnhealthyRule]
    offline, drift, errors, halted, unhealthy = config.rules
    assert isinstance(offline, DeviceOfflineRule) and offline.ttl_s == 900 and offline.labels == {"team": "edge"}
    assert offline.group_by == "device_class" and offline.for_s == 0
    assert isinstance(drift, DriftRule) and drift.signal == "prompt_nll" and drift.threshold == 0.25
    assert isinstance(errors, ErrorRateRule) and errors.webhooks == ["ops"] and errors.for_s == 300
    assert halted.severity == "critical" and isinstance(unhealthy, ClassUnhealthyRule) and unhealthy.ttl_s == 300
    assert [w.name for w in config.webhooks] == ["ops", "chat"] and config.webhooks[1].min_severity == "critical"
    assert load_alert_config("").rules == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the bad field, by path and line
        ("rules:\n  - name: a\n    kind: error_rate\n    threshold: 2\n", r"rules\[0\]\.threshold \(line 4\)"),
        ("rules:\n  - {name: a, kind: device_offline}\n", r"rules\[0\]\.ttl_s \(line 2\): Field required"),
        ("rules:\n  - name: a\n    kind: nope\n", r"rules\[0\]\.kind \(line 3\)"),
        ("rules:\n  - {name: a}\n", r"rules\[0\]\.kind \(line 2\)"),
        ("rules:\n  - {name: a, kind: drift, signal: vibes}\n", r"rules\[0\]\.signal \(line 2\)"),
        ("rules:\n  - {name: a, kind: release_halted, ttl_s: 5}\n", r"rules\[0\]\.ttl_s \(line 2\): Extra inputs"),
        ("rules:\n  - {name: a, kind: release_halted}\n  - {name: b, kind: drift, for_s: -1}\n", r"rules\[1\]\.for_s"),
        # whole-file problems
        ("rules: [\n", r"not valid YAML at line 2"),
        ("rules: []\nrules: []\n", r"key 'rules' given twice \(line 2\)"),
        (
            "rules:\n  - {name: a, kind: release_halted}\n  - {name: a, kind: release_halted}\n",
            "each rule name may appear once.*: a",
        ),
        ("rules:\n  - {name: a, kind: release_halted, webhooks: [pager]}\n", "unknown webhooks pager; known: none"),
        ("rules:\n  - {name: a, kind: release_halted, labels: {severity: x}}\n", "label 'severity' is set by the rule"),
        ("webhooks:\n  - {name: w, url: 'ftp://x', secret_env: S}\n", r"webhooks\[0\]\.url \(line 2\)"),
        ("webhooks:\n  - {name: w, url: 'https://x', secret: hunter2, secret_env: S}\n", r"webhooks\[0\]\.secret"),
    ],
)
def test_errors_name_the_field_and_line(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        load_alert_config(text, origin="alerts.yaml")
    message = str(info.value)
    assert message.startswith("alerts.yaml: ")
    assert "each rule needs a name and a kind" in message  # and says how to fix it
