"""The agent's view of the inference runtime: probe a staged model, serve the active one, check its health.

:class:`LlamaRuntime` is the real one, over :mod:`slmops.runtime` (llama.cpp, imported lazily). The probe of a
staged model runs in a child process (``probe_model_file``), so a model that crashes llama.cpp fails its probe
instead of killing the agent. Nothing here returns or logs generated text.

Serving configuration by measurement (:mod:`slmops.runtime.tuning`): after a staged model passes its probe, the
runtime measures candidate configurations (threads, OpenMP wait policy, batch size) in child processes within
``tuning.budget_s`` and persists the choice by (model digest, device fingerprint) in the agent's ``tuning.json``.
``serve`` looks the choice up (measuring first when it is missing, e.g. after a device or llama.cpp change), puts
its wait policy in the environment before this process first imports llama.cpp, and loads the model with its
threads and batch size. A blueprint's explicit ``RuntimeConfig.threads`` overrides the measurement (no tuning is
reported then). When llama.cpp is already loaded with another wait policy, the model is served with the best
measured configuration this process can run (:func:`~slmops.runtime.tuning.realizable`) and ``restart_wanted``
names the better one, for the agent to restart itself at a safe point. ``tuning`` is what is served now; the
local API's ``/metrics`` shows it as ``slmops_runtime_tuning_*`` gauges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from slmops.agent.state import ProbeRecord
from slmops.core.manifest import SignedManifest
from slmops.core.wire import RuntimeConfig, RuntimeTuning
from slmops.errors import SLMOpsError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from slmops.feedback.store import FeedbackStore
    from slmops.runtime._routes import OnRated
    from slmops.runtime.host import ModelHost, ModelInfo
    from slmops.runtime.policy import LocalPolicy
    from slmops.runtime.serving import LocalServer
    from slmops.runtime.stats import RequestStats
    from slmops.runtime.tuning import TuningConfig, TuningOutcome, TuningStore

__all__ = ["LlamaRuntime", "ModelRuntime"]

log = logging.getLogger(__name__)


class ModelRuntime(Protocol):
    @property
    def url(self) -> str | None: ...

    def probe(
        self, model_file: Path, envelope: SignedManifest, runtime: RuntimeConfig, adapter_file: Path | None = None
    ) -> ProbeRecord: ...

    def serve(
        self, model_file: Path, envelope: SignedManifest, runtime: RuntimeConfig, adapter_file: Path | None = None
    ) -> None: ...

    def stop_serving(self) -> None: ...

    def check(self) -> ProbeRecord: ...

    def close(self) -> None: ...


def _context_tokens(envelope: SignedManifest, runtime: RuntimeConfig) -> int:
    trained = envelope.manifest.facts.context_length
    return min(runtime.context_tokens, trained) if trained else runtime.context_tokens


class LlamaRuntime:
    """llama.cpp behind a :class:`ModelHost` (atomic swaps) and the local OpenAI-compatible API on 127.0.0.1.

    The local API reads ``policy`` per request (site adaptation, feedback policy; the agent updates it without a
    reload), records completions in ``feedback_store`` and hands ratings to ``on_rated``
    (see :func:`slmops.runtime.server.create_app`)."""

    def __init__(
        self,
        *,
        probe_max_tokens: int = 16,
        probe_max_latency_s: float = 30.0,
        prompt_nll_sample_rate: float = 0.05,
        prompt_nll_max_tokens: int = 32,
        policy: LocalPolicy | None = None,
        feedback_store: FeedbackStore | None = None,
        on_rated: OnRated | None = None,
        tuning: TuningConfig | None = None,
        tuning_store: TuningStore | None = None,
    ) -> None:
        self.policy = policy
        self.feedback_store = feedback_store
        self.on_rated = on_rated
        self.probe_max_tokens = probe_max_tokens
        self.probe_max_latency_s = probe_max_latency_s
        self.prompt_nll_sample_rate = prompt_nll_sample_rate  # see BackendConfig
        self.prompt_nll_max_tokens = prompt_nll_max_tokens
        self._host: ModelHost | None = None
        self._server: LocalServer | None = None
        self._stats: RequestStats | None = None
        self._collectors: list[Callable[[], Iterable[Metric]]] = []
        self.tuning_config = tuning  # None (or a zero budget): serve with llama.cpp's default threads, no measuring
        self.tuning_store = tuning_store
        self.tuning: RuntimeTuning | None = None  # the measured configuration the served model runs with
        self.tuning_outcome: TuningOutcome | None = None  # the choice and its measurements, for the served model
        self.restart_wanted: RuntimeTuning | None = None  # a better choice that needs another OpenMP wait policy
        self._last_measured: TuningOutcome | None = None
        self._last_failed: str | None = None  # the digest whose measurement failed last
        self._health_mark: tuple[str | None, int, int] | None = None  # (digest, answered, failed) at the last check

    @property
    def url(self) -> str | None:
        return self._server.url if self._server is not None else None

    @property
    def stats(self) -> RequestStats | None:
        return self._stats

    def add_metrics_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Serve ``collect()``'s metric families on the local API's ``/metrics`` too (from the next server start)."""
        self._collectors.append(collect)

    def _info(self, envelope: SignedManifest, runtime: RuntimeConfig) -> ModelInfo:
        from slmops.runtime.host import ModelInfo

        return ModelInfo.from_manifest(
            envelope.manifest, digest=envelope.digest, context_tokens=_context_tokens(envelope, runtime)
        )

    def probe(
        self, model_file: Path, envelope: SignedManifest, runtime: RuntimeConfig, adapter_file: Path | None = None
    ) -> ProbeRecord:
        from slmops.runtime.backend import BackendConfig
        from slmops.runtime.probe import ProbeConfig, probe_model_file

        info = self._info(envelope, runtime)
        config = BackendConfig(context_tokens=info.context_tokens, threads=runtime.threads, lora_path=adapter_file)
        fmt = envelope.manifest.format
        result = probe_model_file(
            model_file,
            info,
            config,
            ProbeConfig(max_tokens=self.probe_max_tokens, max_latency_s=self.probe_max_latency_s),
            fmt=fmt,
        )
        if result.ok and runtime.threads is None and fmt == "gguf":  # the tuner measures llama.cpp only
            self._tuned(model_file, envelope.digest, adapter_file)  # measured now, in children; reused by serve
        return ProbeRecord(ok=result.ok, reason=result.reason, decode_tokens_per_s=result.decode_tokens_per_s)

    @property
    def tuning_enabled(self) -> bool:
        return self.tuning_config is not None and self.tuning_config.budget_s > 0

    def _tuned(self, model_file: Path, digest: str, adapter_file: Path | None) -> TuningOutcome | None:
        """The stored tuning of ``digest`` on this device, measured (within the budget) when there is none; None
        when tuning is off or nothing could be measured (then the model is served untuned)."""
        from slmops.runtime.tuning import tune

        if self.tuning_config is None or not self.tuning_enabled:
            return None
        last = self._last_measured
        if last is not None and last.tuning.model_digest == digest:
            return last  # measured by this process's probe of the model just now
        if self._last_failed == digest:
            return None  # measured nothing just now: do not spend the budget again for the same model
        try:
            self._last_measured = tune(
                model_file, digest, config=self.tuning_config, store=self.tuning_store, lora_path=adapter_file
            )
        except (SLMOpsError, OSError) as exc:
            log.warning("serving %s without a measured configuration: %s", digest[:19], exc)
            self._last_failed = digest
            return None
        return self._last_measured

    def _serving_tuning(self, model_file: Path, digest: str, adapter_file: Path | None) -> RuntimeTuning | None:
        from slmops.runtime.tuning import apply_wait_policy, process_wait_policy, realizable

        outcome = self._tuned(model_file, digest, adapter_file)
        self.tuning_outcome = outcome
        self.restart_wanted = None
        if outcome is None:
            return None
        chosen = outcome.tuning
        apply_wait_policy(chosen.omp_wait_policy)  # effective only before this process first imports llama.cpp
        process_policy = process_wait_policy()
        tolerance = self.tuning_config.tolerance if self.tuning_config is not None else 0.03
        served = realizable(chosen, outcome.measurements, process_policy, tolerance=tolerance)
        if served != chosen:
            self.restart_wanted = chosen
            log.warning(
                "serving %s with %d thread(s) (OpenMP wait policy %s is loaded); the measured best needs %s: "
                "a restart of the agent applies it",
                digest[:19],
                served.threads,
                process_policy,
                chosen.omp_wait_policy,
            )
        return served

    def _tuning_metrics(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import GaugeMetricFamily

        tuning = self.tuning
        if tuning is None:
            return
        for name, text, value in (
            ("threads", "CPU threads the served model runs with (measured choice).", tuning.threads),
            ("batch_tokens", "Batch size in tokens the served model runs with (measured choice).", tuning.batch_tokens),
            (
                "decode_tokens_per_s",
                "Decode tokens/s measured for the served configuration.",
                tuning.decode_tokens_per_s,
            ),
            (
                "prefill_tokens_per_s",
                "Prefill tokens/s measured for the served configuration.",
                tuning.prefill_tokens_per_s,
            ),
            ("candidates_measured", "Configurations measured to choose it.", tuning.candidates_measured),
            ("measured_at_seconds", "When it was measured (unix seconds).", tuning.measured_at),
            (
                "restart_wanted",
                "1 when a better measured configuration needs a restart.",
                self.restart_wanted is not None,
            ),
        ):
            yield GaugeMetricFamily(f"slmops_runtime_tuning_{name}", text, value=float(value))
        policy = GaugeMetricFamily(
            "slmops_runtime_tuning_omp_wait_policy", "1 for the OpenMP wait policy served with.", labels=["policy"]
        )
        for name in ("active", "passive", "bounded", "none"):
            policy.add_metric([name], 1.0 if (tuning.omp_wait_policy or "none") == name else 0.0)
        yield policy

    def serve(
        self, model_file: Path, envelope: SignedManifest, runtime: RuntimeConfig, adapter_file: Path | None = None
    ) -> None:
        from slmops.runtime.backend import BackendConfig
        from slmops.runtime.backends import open_backend
        from slmops.runtime.host import ModelHost
        from slmops.runtime.metrics import ServerMetrics
        from slmops.runtime.server import create_app
        from slmops.runtime.serving import LocalServer
        from slmops.runtime.stats import RequestStats

        info = self._info(envelope, runtime)
        llama = envelope.manifest.format == "gguf"  # the tuner measures llama.cpp only
        tuning = (
            None
            if runtime.threads is not None or not llama
            else self._serving_tuning(model_file, envelope.digest, adapter_file)
        )
        config = BackendConfig(
            context_tokens=info.context_tokens,
            threads=runtime.threads if tuning is None else tuning.threads,
            batch_tokens=BackendConfig.batch_tokens if tuning is None else tuning.batch_tokens,
            prompt_nll_sample_rate=self.prompt_nll_sample_rate,
            prompt_nll_max_tokens=self.prompt_nll_max_tokens,
            lora_path=adapter_file,
        )
        backend = open_backend(model_file, envelope.manifest.format, config, model_id=info.model_id)
        self.tuning = tuning
        if runtime.threads is not None or not llama:
            self.tuning_outcome = self.restart_wanted = None
        if self._host is None:
            self._host = ModelHost()
            self._stats = RequestStats()
        self._host.activate(backend, info)
        if self._server is not None and self._server.port != runtime.port:
            self._server.stop()
            self._server = None
        if self._server is None:
            metrics = ServerMetrics()
            metrics.add_collector(self._tuning_metrics)
            for collect in self._collectors:
                metrics.add_collector(collect)
            app = create_app(
                self._host,
                stats=self._stats,
                metrics=metrics,
                policy=self.policy,
                feedback=self.feedback_store,
                on_rated=self.on_rated,
            )
            self._server = LocalServer(app, port=runtime.port).start()

    def stop_serving(self) -> None:
        self.tuning = self.tuning_outcome = self.restart_wanted = None
        if self._host is not None:
            self._host.deactivate()

    def check(self) -> ProbeRecord:
        """Is the served model healthy? Real traffic is the evidence first: when the local API answered requests
        with text since the last check and none failed or came back empty, the model is healthy without a probe
        (a probe would take the model from the users for its generation, on a device that is busy anyway).
        Otherwise (no traffic, or any failure) the fixed probe prompt judges, as it does at activation."""
        from slmops.runtime.probe import ProbeConfig, probe_backend

        info = self._host.active if self._host is not None else None
        if self._host is None or info is None:
            return ProbeRecord(ok=False, reason="no model is loaded")
        if self._stats is not None:
            answered, failed = self._stats.served(info.model_id)
            mark, self._health_mark = self._health_mark, (info.digest, answered, failed)
            if mark is not None and mark[0] == info.digest and answered > mark[1] and failed == mark[2]:
                return ProbeRecord(
                    ok=True, reason=f"{answered - mark[1]} requests answered since the last check, none failed"
                )
        try:
            with self._host.lease() as (backend, leased):
                result = probe_backend(
                    backend,
                    leased,
                    ProbeConfig(max_tokens=self.probe_max_tokens, max_latency_s=self.probe_max_latency_s),
                )
        except Exception as exc:  # a failing model must not take the agent down
            return ProbeRecord(ok=False, reason=f"health check failed: {type(exc).__name__}")
        return ProbeRecord(ok=result.ok, reason=result.reason, decode_tokens_per_s=result.decode_tokens_per_s)

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._host is not None:
            self._host.deactivate()
            self._host = None
