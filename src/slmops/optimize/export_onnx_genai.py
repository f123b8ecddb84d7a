"""Export a transformers model to ONNX Runtime GenAI: the second runtime's format (``export_onnx_genai``).

=====================  =============================  ==========================================================
pass                   formats                        what it does
=====================  =============================  ==========================================================
``export_onnx_genai``  safetensors → onnx (directory)  ONNX Runtime GenAI's model builder, ``int4`` (default),
                                                      ``int8`` or ``fp32`` weights for the CPU execution provider
=====================  =============================  ==========================================================

A recipe reaches it from a GGUF through ``hf_from_gguf`` (which dequantizes to float32 safetensors)::

    variants:
      - name: ortgenai-int4
        passes:
          - hf_from_gguf: {}
          - export_onnx_genai: {precision: int4}

The output ``workdir/model`` is the directory ONNX Runtime GenAI loads (see
:mod:`slmops.registry.formats.onnx_genai`): ``genai_config.json``, ``model.onnx`` with its weights in
``model.onnx.data``, and the tokenizer (``tokenizer.json``, ``tokenizer_config.json``). The builder
(``onnxruntime_genai.models.builder``) writes the ONNX graph; what this pass adds:

- a tokenizer when the input has none: a model dequantized from GGUF keeps only the GGUF's tokenizer metadata
  (``gguf_metadata.gguf``), which transformers converts to ``tokenizer.json``;
- Gemma 3 configs as transformers 5 writes them (``rope_parameters`` per attention type) are given to the builder in
  the older shape it reads (``rope_theta`` for global layers, ``rope_local_base_freq`` for sliding ones);
- the input is never modified: the builder reads a staging directory of links and rewritten files inside the work
  directory, which is removed with the builder's cache before the pass returns;
- the output is validated with :func:`~slmops.registry.formats.onnx_genai.read_onnx_genai` before it is kept.

Deterministic: the same input bytes and params give the same output bytes (the builder's quantizer has no random
state; the test suite checks two exports of a tiny model byte for byte). Int8 weight-only safetensors (the ``int8``
pass) are not accepted: the builder loads the model with transformers, which needs float weights.

``onnxruntime-genai`` (with its ``onnx-ir`` dependency) and transformers are imported inside :meth:`apply`; a
missing one raises :class:`~slmops.errors.MissingExtraError` naming the ``onnx`` extra.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from slmops.errors import InvalidModelError, MissingExtraError, RuntimeBackendError
from slmops.optimize._files import fsync_dir
from slmops.optimize.gguf_metadata import GGUF_METADATA_FILE
from slmops.optimize.hf_load import import_transformers
from slmops.optimize.passes import Pass, PassParams, PassProgress, register_pass

__all__ = ["OUTPUT_FILES_KEPT", "ExportOnnxGenAI", "ExportOnnxGenAIParams", "legacy_rope_config"]

OUTPUT_FILES_KEPT = ("genai_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model")
"""Besides the ONNX files and their external data: what the runtime reads (other builder outputs are dropped)."""
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")
_COPIED = ("generation_config.json", "chat_template.jinja")


class ExportOnnxGenAIParams(PassParams):
    precision: Literal["int4", "int8", "fp32"] = "int4"


def legacy_rope_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of a Gemma 3 text model with per-attention-type ``rope_parameters`` (transformers 5) in the
    shape the builder reads; other configs are returned unchanged. Pure."""
    rope = config.get("rope_parameters")
    if not (isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict)):
        return config
    full, local = rope["full_attention"], rope.get("sliding_attention") or rope["full_attention"]
    out = dict(config)
    out["rope_theta"] = full.get("rope_theta", 1_000_000.0)
    out["rope_local_base_freq"] = local.get("rope_theta", 10_000.0)
    out["rope_parameters"] = dict(full)
    return out


def _import_builder() -> Any:
    import_transformers("exporting to ONNX Runtime GenAI")
    try:
        from onnxruntime_genai.models import builder  # type: ignore[import-untyped]
    except ImportError as exc:
        raise MissingExtraError("onnx", "exporting to ONNX Runtime GenAI", exc.name or "onnxruntime-genai") from None
    return builder


def _stage_input(source: Path, staging: Path) -> list[str]:
    """A directory the builder may read: links to the input's weights, its config, a tokenizer; returns notes."""
    notes: list[str] = []
    staging.mkdir()
    config_path = source / "config.json"
    if not config_path.is_file():
        raise InvalidModelError(
            f"pass 'export_onnx_genai' reads a Hugging Face model directory with config.json, found none in {source}; "
            "put hf_from_gguf before it"
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("quantization_config"), dict) or any(source.glob("*.int8_scale")):
        raise InvalidModelError(f"{source} holds quantized weights; export_onnx_genai needs a float model")
    (staging / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    weights = sorted(source.glob("*.safetensors")) + sorted(source.glob("model.safetensors.index.json"))
    if not weights:
        raise InvalidModelError(f"{source} has no safetensors weights; export_onnx_genai reads safetensors")
    for path in weights + [source / name for name in _COPIED if (source / name).is_file()]:
        os.symlink(path.resolve(), staging / path.name)
    if (source / "tokenizer.json").is_file() or (source / "tokenizer.model").is_file():
        for name in _TOKENIZER_FILES:
            if (source / name).is_file():
                os.symlink((source / name).resolve(), staging / name)
    elif (source / GGUF_METADATA_FILE).is_file():
        transformers = import_transformers("converting a GGUF tokenizer")
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(source), gguf_file=GGUF_METADATA_FILE, local_files_only=True
        )
        tokenizer.save_pretrained(str(staging))
        notes.append("tokenizer converted from the GGUF's tokenizer metadata")
    else:
        raise InvalidModelError(
            f"{source} has no tokenizer (tokenizer.json, tokenizer.model or {GGUF_METADATA_FILE}); save one beside "
            "the weights"
        )
    return notes


def _run_builder(builder: Any, staging: Path, output: Path, cache: Path, precision: str) -> str:
    """Run the model builder; returns what it printed (kept for errors)."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        options = builder.parse_extra_options(None, str(staging), str(output), precision, "cpu", str(cache), [])
        hf_config = options["hf_details"]["hf_config"]
        raw = hf_config.to_dict()
        legacy = legacy_rope_config(raw)
        if legacy is not raw:
            for key in ("rope_theta", "rope_local_base_freq", "rope_parameters"):
                if key in legacy:
                    setattr(hf_config, key, legacy[key])
        builder.create_model(None, str(staging), str(output), precision, "cpu", str(cache), **options)
    return log.getvalue()


@register_pass
class ExportOnnxGenAI(Pass[ExportOnnxGenAIParams]):
    """safetensors → ONNX Runtime GenAI model directory (the builder, CPU execution provider)."""

    name = "export_onnx_genai"
    input_format = "safetensors"
    output_format = "onnx"
    params_model = ExportOnnxGenAIParams
    description = "export a transformers model to ONNX Runtime GenAI (int4/int8/fp32, CPU)"

    def variant_label(self, params: ExportOnnxGenAIParams) -> str:
        return f"ortgenai-{params.precision}"

    def output_path(self, workdir: Path, params: ExportOnnxGenAIParams) -> Path:
        return workdir / "model"  # a directory, like safetensors

    def apply(
        self, input_path: Path, params: ExportOnnxGenAIParams, output: Path, progress: PassProgress
    ) -> dict[str, Any]:
        from slmops.registry.formats.onnx_genai import read_onnx_genai

        builder = _import_builder()
        work = output.parent
        staging, cache, building = work / ".export-input", work / ".export-cache", work / ".export-output"
        progress(0, 3)
        try:
            notes = _stage_input(Path(input_path), staging)
            progress(1, 3)
            try:
                log = _run_builder(builder, staging, building, cache, params.precision)
            except (NotImplementedError, KeyError, ValueError, RuntimeError, OSError) as exc:
                raise RuntimeBackendError(
                    f"ONNX Runtime GenAI's builder could not export {input_path} ({type(exc).__name__}: {exc}); it "
                    "supports the architectures it lists (gemma3, llama, qwen2, phi, ...): check config.json"
                ) from None
            progress(2, 3)
            for entry in list(building.iterdir()):
                keep = entry.name in OUTPUT_FILES_KEPT or entry.suffix == ".onnx" or entry.name.endswith(".onnx.data")
                if not keep:
                    entry.unlink()
            for name in ("tokenizer_config.json",):
                if not (building / name).is_file() and (staging / name).is_file():
                    shutil.copyfile(staging / name, building / name)
            info = read_onnx_genai(building)
            for path in building.iterdir():
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
            fsync_dir(building)
            os.replace(building, output)
            fsync_dir(work)
        finally:
            for leftover in (staging, cache, building):
                shutil.rmtree(leftover, ignore_errors=True)
        progress(3, 3)
        files = sorted(p.name for p in output.iterdir())
        return {
            "precision": params.precision,
            "execution_provider": "cpu",
            "model_type": info.model_type,
            "files": files,
            "bytes": sum((output / name).stat().st_size for name in files),
            "parameters": info.parameter_count,
            "notes": notes,
            "builder_lines": len(log.splitlines()),
        }
