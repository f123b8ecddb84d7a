"""Request counters of the local API, per model, for the agent's telemetry: numbers only, never text.

Besides the counts, each request leaves a :class:`~slmops.telemetry.drift.RequestSummary` (token counts, finish
reason, empty output, the prompt's mean negative log-likelihood when it was measured): numbers the window builder
folds into the window's drift summary. They are bounded like the latency samples (the most recent
``max_requests`` per model in a window).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from slmops.telemetry.drift import RequestSummary

__all__ = ["ModelStats", "RequestStats", "RequestSummary", "StatsSnapshot"]


@dataclass(frozen=True)
class ModelStats:
    """Counts and latency samples of one model since the last :meth:`RequestStats.take`."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: tuple[float, ...] = ()  # request received -> last byte generated, successful requests
    time_to_first_token_s: tuple[float, ...] = ()  # request received -> first text piece
    summaries: tuple[RequestSummary, ...] = ()  # requests that reached the model, oldest first


@dataclass(frozen=True)
class StatsSnapshot:
    models: dict[str, ModelStats] = field(default_factory=dict)  # model_id -> stats
    rejected: int = 0  # requests refused before reaching a model: bad request, no model active


@dataclass
class _Acc:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: deque[float] = field(default_factory=deque)
    ttft_s: deque[float] = field(default_factory=deque)
    summaries: deque[RequestSummary] = field(default_factory=deque)


class RequestStats:
    """Thread-safe counters the server updates and the agent reads.

    Latency samples are bounded (the most recent ``max_samples`` per model and kind), request summaries too (the
    most recent ``max_requests``). ``snapshot()`` reads, ``take()`` reads and resets (one telemetry window).
    """

    def __init__(self, max_samples: int = 1024, max_requests: int = 4096) -> None:
        self._lock = threading.Lock()
        self._max_samples = max_samples
        self._max_requests = max_requests
        self._models: dict[str, _Acc] = {}
        self._rejected = 0
        self._served: dict[str, tuple[int, int]] = {}  # model id -> (answered, failed), never reset by take()

    def _acc(self, model_id: str) -> _Acc:
        acc = self._models.get(model_id)
        if acc is None:
            acc = _Acc(
                latency_s=deque(maxlen=self._max_samples),
                ttft_s=deque(maxlen=self._max_samples),
                summaries=deque(maxlen=self._max_requests),
            )
            self._models[model_id] = acc
        return acc

    def record(
        self,
        model_id: str,
        *,
        ok: bool,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        latency_s: float | None = None,
        time_to_first_token_s: float | None = None,
        finish_reason: str | None = None,
        empty: bool | None = None,
        prompt_nll: float | None = None,
    ) -> None:
        """One request that reached model ``model_id``; ``ok=False`` counts it as an error too.

        ``finish_reason`` defaults to "stop" (or "error" when not ``ok``); ``empty`` to "no completion token";
        ``prompt_nll`` is the prompt's mean negative log-likelihood in nats per token, None when not measured.
        """
        answered = ok and (not empty if empty is not None else completion_tokens > 0)
        with self._lock:
            good, bad = self._served.get(model_id, (0, 0))
            self._served[model_id] = (good + 1, bad) if answered else (good, bad + 1)
            acc = self._acc(model_id)
            acc.requests += 1
            acc.errors += 0 if ok else 1
            acc.prompt_tokens += prompt_tokens
            acc.completion_tokens += completion_tokens
            if latency_s is not None and ok:
                acc.latency_s.append(latency_s)
            if time_to_first_token_s is not None:
                acc.ttft_s.append(time_to_first_token_s)
            acc.summaries.append(
                RequestSummary(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    finish_reason=finish_reason or ("stop" if ok else "error"),
                    prompt_nll=prompt_nll,
                    empty=empty,
                )
            )

    def served(self, model_id: str) -> tuple[int, int]:
        """Requests to ``model_id`` since this object was made: (answered with text, failed or empty). Not reset by
        :meth:`take`, so a reader can tell whether real traffic went well since it last looked."""
        with self._lock:
            return self._served.get(model_id, (0, 0))

    def record_rejected(self) -> None:
        with self._lock:
            self._rejected += 1

    def _snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(
            models={
                model_id: ModelStats(
                    requests=acc.requests,
                    errors=acc.errors,
                    prompt_tokens=acc.prompt_tokens,
                    completion_tokens=acc.completion_tokens,
                    latency_s=tuple(acc.latency_s),
                    time_to_first_token_s=tuple(acc.ttft_s),
                    summaries=tuple(acc.summaries),
                )
                for model_id, acc in self._models.items()
            },
            rejected=self._rejected,
        )

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return self._snapshot()

    def take(self) -> StatsSnapshot:
        """The counters so far, then start again from zero."""
        with self._lock:
            snap = self._snapshot()
            self._models = {}
            self._rejected = 0
            return snap
