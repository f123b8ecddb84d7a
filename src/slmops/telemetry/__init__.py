"""Telemetry: aggregates per time window and model version, never prompt or completion text; drift, alerts and
their webhooks, and the cost report built on them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from slmops.telemetry.aggregate import (
    Rollup,
    WindowCounters,
    bucket_index,
    build_window,
    histogram_from_ms,
    histogram_samples,
    merge_histograms,
    merge_windows,
    rollup,
    window_id,
    windows_from_stats,
)

if TYPE_CHECKING:
    from slmops.telemetry.alert_rules import AlertConfig, load_alert_config
    from slmops.telemetry.alerts import AlertState, Facts, Transition
    from slmops.telemetry.cost import CostReport, PriceTable, cost_report, example_price_table, load_price_table
    from slmops.telemetry.drift import (
        DriftConfig,
        DriftPoint,
        DriftReport,
        DriftSummary,
        DriftVerdict,
        ReferenceSpec,
        RequestSummary,
        ShiftEstimate,
        drift_report,
        drift_series,
    )
    from slmops.telemetry.webhooks import WebhookSender, verify_signature

# Drift, alerts, webhooks and cost are the server's: loaded on first use, so an agent importing the aggregates
# loads none of them.
_LAZY = {
    "slmops.telemetry.alert_rules": ("AlertConfig", "load_alert_config"),
    "slmops.telemetry.alerts": ("AlertState", "Facts", "Transition"),
    "slmops.telemetry.cost": ("CostReport", "PriceTable", "cost_report", "example_price_table", "load_price_table"),
    "slmops.telemetry.drift": (
        "DriftConfig",
        "DriftPoint",
        "DriftReport",
        "DriftSummary",
        "DriftVerdict",
        "ReferenceSpec",
        "RequestSummary",
        "ShiftEstimate",
        "drift_report",
        "drift_series",
    ),
    "slmops.telemetry.webhooks": ("WebhookSender", "verify_signature"),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'slmops.telemetry' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "AlertConfig",
    "AlertState",
    "CostReport",
    "DriftConfig",
    "DriftPoint",
    "DriftReport",
    "DriftSummary",
    "DriftVerdict",
    "Facts",
    "PriceTable",
    "ReferenceSpec",
    "RequestSummary",
    "Rollup",
    "ShiftEstimate",
    "Transition",
    "WebhookSender",
    "WindowCounters",
    "bucket_index",
    "build_window",
    "cost_report",
    "drift_report",
    "drift_series",
    "example_price_table",
    "histogram_from_ms",
    "histogram_samples",
    "load_alert_config",
    "load_price_table",
    "merge_histograms",
    "merge_windows",
    "rollup",
    "verify_signature",
    "window_id",
    "windows_from_stats",
]
