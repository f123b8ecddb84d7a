"""On-device inference: llama.cpp backends, chat templates, the active-model host, the health probe and the local
OpenAI-compatible API. Heavy dependencies (llama_cpp, fastapi, uvicorn) are imported only when used."""

from __future__ import annotations

from slmops.runtime.backend import Backend, BackendConfig, Completion, LlamaCppBackend, Sampling, TextStream
from slmops.runtime.chat import render_chat
from slmops.runtime.host import ModelHost, ModelInfo
from slmops.runtime.metrics import ServerMetrics
from slmops.runtime.probe import ProbeConfig, ProbeResult, degenerate_reason, probe_backend, probe_model_file
from slmops.runtime.server import create_app
from slmops.runtime.serving import LocalServer
from slmops.runtime.stats import ModelStats, RequestStats, StatsSnapshot

__all__ = [
    "Backend",
    "BackendConfig",
    "Completion",
    "LlamaCppBackend",
    "LocalServer",
    "ModelHost",
    "ModelInfo",
    "ModelStats",
    "ProbeConfig",
    "ProbeResult",
    "RequestStats",
    "Sampling",
    "ServerMetrics",
    "StatsSnapshot",
    "TextStream",
    "create_app",
    "degenerate_reason",
    "probe_backend",
    "probe_model_file",
    "render_chat",
]
