"""The shipped example files parse with the loaders the server uses, so a copied example never fails at startup."""

from __future__ import annotations

from pathlib import Path

from slmops.telemetry.alert_rules import load_alert_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_example_alert_rules_cover_every_rule_kind() -> None:
    path = EXAMPLES / "alerts" / "rules.yaml"

    config = load_alert_config(path.read_text(), origin=str(path))

    kinds = {rule.kind for rule in config.rules}
    assert kinds == {"device_offline", "drift", "error_rate", "release_halted", "class_unhealthy"}
    assert [w.secret_env for w in config.webhooks] == ["SLMOPS_WEBHOOK_OPS_SECRET"]  # secrets never in the file
