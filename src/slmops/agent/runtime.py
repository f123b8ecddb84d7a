"""The agent's view of the inference runtime: probe a staged model, serve the active one, check its health.

:class:`LlamaRuntime` is the real one, over :mod:`slmops.runtime` (llama.cpp, imported lazily). The probe of a
staged model runs in a child process (``probe_model_file``), so a model that crashes llama.cpp fails its probe
instead of killing the agent. Nothing here returns or logs generated text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from slmops.agent.state import ProbeRecord
from slmops.core.manifest import SignedManifest
from slmops.core.wire import RuntimeConfig

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from slmops.feedback.store import FeedbackStore
    from slmops.runtime._routes import OnRated
    from slmops.runtime.host import ModelHost, ModelInfo
    from slmops.runtime.policy import LocalPolicy
    from slmops.runtime.serving import LocalServer
    from slmops.runtime.stats import RequestStats

__all__ = ["LlamaRuntime", "ModelRuntime"]


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
        result = probe_model_file(
            model_file,
            info,
            config,
            ProbeConfig(max_tokens=self.probe_max_tokens, max_latency_s=self.probe_max_latency_s),
        )
        return ProbeRecord(ok=result.ok, reason=result.reason, decode_tokens_per_s=result.decode_tokens_per_s)

    def serve(
        self, model_file: Path, envelope: SignedManifest, runtime: RuntimeConfig, adapter_file: Path | None = None
    ) -> None:
        from slmops.runtime.backend import BackendConfig, LlamaCppBackend
        from slmops.runtime.host import ModelHost
        from slmops.runtime.metrics import ServerMetrics
        from slmops.runtime.server import create_app
        from slmops.runtime.serving import LocalServer
        from slmops.runtime.stats import RequestStats

        info = self._info(envelope, runtime)
        config = BackendConfig(
            context_tokens=info.context_tokens,
            threads=runtime.threads,
            prompt_nll_sample_rate=self.prompt_nll_sample_rate,
            prompt_nll_max_tokens=self.prompt_nll_max_tokens,
            lora_path=adapter_file,
        )
        backend = LlamaCppBackend.load(model_file, info.model_id, config)
        if self._host is None:
            self._host = ModelHost()
            self._stats = RequestStats()
        self._host.activate(backend, info)
        if self._server is not None and self._server.port != runtime.port:
            self._server.stop()
            self._server = None
        if self._server is None:
            metrics = ServerMetrics()
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
        if self._host is not None:
            self._host.deactivate()

    def check(self) -> ProbeRecord:
        from slmops.runtime.probe import ProbeConfig, probe_backend

        if self._host is None or self._host.active is None:
            return ProbeRecord(ok=False, reason="no model is loaded")
        try:
            with self._host.lease() as (backend, info):
                result = probe_backend(
                    backend, info, ProbeConfig(max_tokens=self.probe_max_tokens, max_latency_s=self.probe_max_latency_s)
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
