"""Prometheus metrics of the local API, named after the OpenTelemetry GenAI semantic conventions (v1.41).

``gen_ai.server.request.duration`` becomes ``gen_ai_server_request_duration_seconds`` and so on; attributes become
labels (``gen_ai_operation_name``, ``gen_ai_request_model``, ``error_type``, ``gen_ai_token_type``), all bounded:
the served model id, never a prompt or a device. Bucket boundaries are the ones the conventions recommend.
``prometheus_client`` is imported when a :class:`ServerMetrics` is made, not when this module is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Literal

from slmops.errors import MissingExtraError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

__all__ = ["Operation", "ServerMetrics"]

Operation = Literal["chat", "text_completion"]

_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16 ... 67108864
_LABELS = ("gen_ai_operation_name", "gen_ai_request_model")


class _Callback:
    """A collector that asks ``collect`` for its metric families at each scrape."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class ServerMetrics:
    """The GenAI server histograms on a registry of their own (one per app, so apps and tests never share)."""

    def __init__(self) -> None:
        try:
            from prometheus_client import CollectorRegistry, Histogram
        except ImportError as exc:
            raise MissingExtraError("server", "the local API's /metrics", "prometheus_client") from exc

        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=True)
        self._duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Generative AI server request duration, request received to last output token.",
            (*_LABELS, "error_type"),
            registry=self.registry,
            buckets=_DURATION_BUCKETS,
        )
        self._ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to generate the first token, for successful responses.",
            _LABELS,
            registry=self.registry,
            buckets=_TTFT_BUCKETS,
        )
        self._tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token generated after the first, for successful responses.",
            _LABELS,
            registry=self.registry,
            buckets=_TPOT_BUCKETS,
        )
        self._tokens = Histogram(
            "gen_ai_client_token_usage",
            "Number of input and output tokens per request.",
            (*_LABELS, "gen_ai_token_type"),
            registry=self.registry,
            buckets=_TOKEN_BUCKETS,
        )

    def observe(
        self,
        operation: Operation,
        model: str,
        *,
        duration_s: float,
        error_type: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        time_to_first_token_s: float | None = None,
    ) -> None:
        """One request that reached ``model``; ``error_type`` set for a failed one (then only its duration counts)."""
        self._duration.labels(operation, model, error_type or "").observe(duration_s)
        if error_type is not None:
            return
        self._tokens.labels(operation, model, "input").observe(input_tokens)
        self._tokens.labels(operation, model, "output").observe(output_tokens)
        if time_to_first_token_s is None:
            return
        self._ttft.labels(operation, model).observe(time_to_first_token_s)
        if output_tokens > 1:
            self._tpot.labels(operation, model).observe((duration_s - time_to_first_token_s) / (output_tokens - 1))

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Serve the metric families ``collect()`` returns at each scrape, too (the agent's gauges)."""
        self.registry.register(_Callback(collect))

    def exposition(self) -> tuple[bytes, str]:
        """The registry in Prometheus text format, with its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
