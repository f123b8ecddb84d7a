"""A tiny, real ONNX Runtime GenAI model for tests: :func:`write_tiny_hf`'s random gemma3 exported by the pass.

About a second: the model builder quantizes a 2-layer, 64-wide model. Tests that use it skip when
``onnxruntime-genai`` (the ``onnx`` extra) or torch/transformers are not installed.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["export_tiny_onnx_genai"]


def export_tiny_onnx_genai(directory: Path, *, precision: str = "int4", arch: str = "gemma3") -> Path:
    """Write a tiny HF model under ``directory`` and export it; return the ONNX GenAI model directory."""
    from slmops.optimize.passes import get_pass
    from tests.tiny_hf import write_tiny_hf

    source = write_tiny_hf(directory / "hf", arch=arch)
    workdir = directory / "work"
    workdir.mkdir()
    the_pass = get_pass("export_onnx_genai")
    result = the_pass.run(source, the_pass.parse_params({"precision": precision}), workdir, lambda done, total: None)
    return result.output_path
