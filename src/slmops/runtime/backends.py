"""Open the backend that serves a model's format: llama.cpp for GGUF, ONNX Runtime GenAI for ONNX GenAI directories.

The manifest's ``format`` decides (:data:`FORMAT_RUNTIMES`, the inverse of
:data:`slmops.core.wire.RUNTIME_FORMATS`); callers (the agent's runtime, ``slmops serve``, the probe) stay
runtime-agnostic and hand over what a slot holds: the GGUF file, or the model directory. Both backends are imported
only when chosen, so a device without one of them still serves the other.
"""

from __future__ import annotations

from pathlib import Path

from slmops.errors import RuntimeBackendError
from slmops.runtime.backend import Backend, BackendConfig

__all__ = ["FORMAT_RUNTIMES", "installed_runtimes", "open_backend", "runtime_for_format"]

FORMAT_RUNTIMES: dict[str, str] = {"gguf": "llama.cpp", "onnx": "onnxruntime-genai"}
"""Manifest format -> the runtime that serves it. An ``onnx`` version is served by ONNX Runtime GenAI, which needs
the GenAI layout (``genai_config.json``); a bare ONNX graph is refused when it is opened."""


def runtime_for_format(fmt: str) -> str:
    """The runtime that serves manifest format ``fmt``; a :class:`RuntimeBackendError` for a format none serves."""
    runtime = FORMAT_RUNTIMES.get(fmt)
    if runtime is None:
        raise RuntimeBackendError(
            f"no runtime serves models of format {fmt!r}; servable formats: {', '.join(sorted(FORMAT_RUNTIMES))} "
            "(export the model with a GGUF pass or export_onnx_genai)"
        )
    return runtime


def installed_runtimes() -> list[str]:
    """The runtimes whose Python packages are installed here, in :data:`FORMAT_RUNTIMES` order (for
    ``Capabilities.runtimes``); found without importing them (``importlib.util.find_spec``), so it is cheap."""
    import importlib.util

    modules = {"llama.cpp": "llama_cpp", "onnxruntime-genai": "onnxruntime_genai"}
    return [runtime for runtime in FORMAT_RUNTIMES.values() if importlib.util.find_spec(modules[runtime]) is not None]


def open_backend(model_path: Path, fmt: str, config: BackendConfig, *, model_id: str | None = None) -> Backend:
    """Load ``model_path`` (a GGUF file, or an ONNX GenAI model directory) with the backend of format ``fmt``."""
    runtime = runtime_for_format(fmt)
    model_path = Path(model_path)
    name = model_id or model_path.name
    if runtime == "llama.cpp":
        from slmops.runtime.backend import LlamaCppBackend

        return LlamaCppBackend.load(model_path, name, config)
    from slmops.runtime.onnx_genai_backend import OnnxGenAIBackend

    directory = model_path if model_path.is_dir() else model_path.parent
    return OnnxGenAIBackend.load(directory, name, config)
