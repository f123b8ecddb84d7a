"""Telemetry: aggregates per time window and model version, never prompt or completion text."""

from __future__ import annotations

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

__all__ = [
    "Rollup",
    "WindowCounters",
    "bucket_index",
    "build_window",
    "histogram_from_ms",
    "histogram_samples",
    "merge_histograms",
    "merge_windows",
    "rollup",
    "window_id",
    "windows_from_stats",
]
