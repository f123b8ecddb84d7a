"""Torch passes: transformers models from GGUF or safetensors, int8, pruning, 2:4 sparsity, and export to GGUF.

=================  =====================  ==================================================================
pass               formats                what it does
=================  =====================  ==================================================================
``hf_from_gguf``   gguf → safetensors     dequantize a GGUF into a float32 transformers model; the source's
                                          ``tokenizer.*``/``general.*`` metadata is kept beside it
``int8``           safetensors → same     per-output-channel symmetric int8 weight-only (stored as int8 +
                                          scales; measured with the dequantized weights)
``prune``          safetensors → same     magnitude pruning, ``global`` or ``per_layer``, to ``sparsity``
``prune_struct``   safetensors → same     whole attention heads or MLP channels by L2 norm, removed or masked
``sparse_2_4``     safetensors → same     N:M (2:4) semi-structured sparsity, as masks
``export_gguf``    safetensors → gguf     our HF→GGUF exporter (gemma3, llama, qwen2), F16 or F32
=================  =====================  ==================================================================

Each safetensors pass writes ``workdir/model`` (config, ``model.safetensors``, and the tokenizer and GGUF metadata
files of its input) and reports the achieved sparsity per tensor and overall, measured on its output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slmops.optimize.passes import Pass, PassParams, PassProgress, PassResult, register_pass

__all__ = [
    "ExportGGUF",
    "ExportGGUFParams",
    "HFFromGGUF",
    "HFFromGGUFParams",
    "Int8Params",
    "Int8WeightOnly",
    "MagnitudePrune",
    "PruneParams",
    "SemiStructured",
    "SemiStructuredParams",
    "StructuredParams",
    "StructuredPrune",
]


def _output_dir(workdir: Path) -> Path:
    return workdir / "model"


def _finish(input_dir: Path, output_dir: Path) -> list[str]:
    from slmops.optimize.hf_load import copy_sidecar_files

    return copy_sidecar_files(input_dir, output_dir)


class HFFromGGUFParams(PassParams):
    pass


@register_pass
class HFFromGGUF(Pass[HFFromGGUFParams]):
    """GGUF → float32 safetensors through transformers' GGUF loader (quantized tensors dequantized)."""

    name = "hf_from_gguf"
    input_format = "gguf"
    output_format = "safetensors"
    params_model = HFFromGGUFParams
    description = "dequantize a GGUF into a float32 transformers model (for the torch passes)"

    def variant_label(self, params: HFFromGGUFParams) -> str:
        return "hf"

    def run(self, input_path: Path, params: HFFromGGUFParams, workdir: Path, progress: PassProgress) -> PassResult:
        from slmops.optimize.hf_load import GGUF_METADATA_FILE, load_hf_model_from_gguf, save_hf_model
        from slmops.optimize.hf_load import write_gguf_metadata as write_metadata

        progress(0, 2)
        model = load_hf_model_from_gguf(input_path)
        progress(1, 2)
        output = save_hf_model(model, _output_dir(workdir))
        write_metadata(input_path, output / GGUF_METADATA_FILE)
        progress(2, 2)
        return PassResult(
            output,
            {
                "model_type": str(model.config.model_type),
                "params": sum(int(p.numel()) for p in model.parameters()),
                "dtype": "float32",
            },
        )


class Int8Params(PassParams):
    pass


@register_pass
class Int8WeightOnly(Pass[Int8Params]):
    """Per-output-channel symmetric int8 of the decoder projections (embeddings, head and norms stay float32)."""

    name = "int8"
    input_format = "safetensors"
    output_format = "safetensors"
    params_model = Int8Params
    description = "int8 weight-only, per output channel, symmetric"

    def variant_label(self, params: Int8Params) -> str:
        return "int8"

    def run(self, input_path: Path, params: Int8Params, workdir: Path, progress: PassProgress) -> PassResult:
        from slmops.optimize.hf_load import load_hf_model, save_hf_model
        from slmops.optimize.torch_ops import quantize_int8_weight_only

        model = load_hf_model(input_path)
        report, tensors = quantize_int8_weight_only(model, progress=progress)
        output = save_hf_model(model, _output_dir(workdir), tensors=tensors)
        _finish(input_path, output)
        return PassResult(output, report.to_json())


class PruneParams(PassParams):
    sparsity: float = Field(gt=0, lt=1, description="fraction of the targeted weights set to zero")
    scope: Literal["global", "per_layer"] = "global"


@register_pass
class MagnitudePrune(Pass[PruneParams]):
    """Unstructured magnitude pruning of the decoder projections."""

    name = "prune"
    input_format = "safetensors"
    output_format = "safetensors"
    params_model = PruneParams
    description = "unstructured magnitude pruning (global or per layer)"

    def variant_label(self, params: PruneParams) -> str:
        suffix = "" if params.scope == "global" else "l"
        return f"prune{round(params.sparsity * 100)}{suffix}"

    def run(self, input_path: Path, params: PruneParams, workdir: Path, progress: PassProgress) -> PassResult:
        from slmops.optimize.hf_load import load_hf_model, save_hf_model
        from slmops.optimize.torch_ops import magnitude_prune

        model = load_hf_model(input_path)
        report = magnitude_prune(model, params.sparsity, scope=params.scope, progress=progress)
        output = save_hf_model(model, _output_dir(workdir))
        _finish(input_path, output)
        return PassResult(output, {"target_sparsity": params.sparsity, "scope": params.scope, **report.to_json()})


class StructuredParams(PassParams):
    sparsity: float = Field(gt=0, lt=1, description="fraction of heads (per KV group) or MLP channels per layer")
    target: Literal["heads", "mlp"] = "mlp"
    mode: Literal["remove", "mask"] = "remove"


@register_pass
class StructuredPrune(Pass[StructuredParams]):
    """Structured pruning of attention heads or MLP channels by L2 norm: removed (smaller model) or masked."""

    name = "prune_struct"
    input_format = "safetensors"
    output_format = "safetensors"
    params_model = StructuredParams
    description = "structured pruning of attention heads or MLP channels (L2 norm)"

    def variant_label(self, params: StructuredParams) -> str:
        return f"{params.target}{round(params.sparsity * 100)}{'' if params.mode == 'remove' else 'm'}"

    def run(self, input_path: Path, params: StructuredParams, workdir: Path, progress: PassProgress) -> PassResult:
        from slmops.optimize.hf_load import load_hf_model, save_hf_model
        from slmops.optimize.torch_ops import structured_prune

        model = load_hf_model(input_path)
        model, report = structured_prune(
            model, params.sparsity, target=params.target, mode=params.mode, progress=progress
        )
        output = save_hf_model(model, _output_dir(workdir))
        _finish(input_path, output)
        return PassResult(output, {"target_sparsity": params.sparsity, **report.to_json()})


class SemiStructuredParams(PassParams):
    n: int = Field(default=2, gt=0, description="weights kept in each group")
    m: int = Field(default=4, gt=1, description="group size along the input dimension")


@register_pass
class SemiStructured(Pass[SemiStructuredParams]):
    """N:M semi-structured sparsity (2:4 by default) as masks; CPU kernels for it do not exist, so it is measured
    as a dense model with zeros."""

    name = "sparse_2_4"
    input_format = "safetensors"
    output_format = "safetensors"
    params_model = SemiStructuredParams
    description = "N:M (2:4) semi-structured sparsity, applied as masks"

    def variant_label(self, params: SemiStructuredParams) -> str:
        return f"sparse{params.n}of{params.m}"

    def run(self, input_path: Path, params: SemiStructuredParams, workdir: Path, progress: PassProgress) -> PassResult:
        from slmops.optimize.hf_load import load_hf_model, save_hf_model
        from slmops.optimize.torch_ops import semi_structured_prune

        if params.n >= params.m:
            from slmops.errors import BlueprintError

            raise BlueprintError(f"sparse_2_4 needs n < m, got n={params.n}, m={params.m}")
        model = load_hf_model(input_path)
        report = semi_structured_prune(model, n=params.n, m=params.m, progress=progress)
        output = save_hf_model(model, _output_dir(workdir))
        _finish(input_path, output)
        return PassResult(output, {"pattern": f"{params.n}:{params.m}", **report.to_json()})


class ExportGGUFParams(PassParams):
    file_type: Literal["F16", "F32"] = "F16"


@register_pass
class ExportGGUF(Pass[ExportGGUFParams]):
    """A safetensors model → GGUF with our exporter (gemma3, llama, qwen2), for the edge runtime."""

    name = "export_gguf"
    input_format = "safetensors"
    output_format = "gguf"
    params_model = ExportGGUFParams
    description = "export a transformers model to GGUF (gemma3, llama, qwen2)"

    def variant_label(self, params: ExportGGUFParams) -> str:
        return params.file_type.lower()

    def run(self, input_path: Path, params: ExportGGUFParams, workdir: Path, progress: PassProgress) -> PassResult:
        from slmops.optimize.export_gguf import export_gguf_dir

        output = workdir / f"model-{params.file_type.lower()}.gguf"
        report = export_gguf_dir(input_path, output, file_type=params.file_type, progress=progress)
        result: dict[str, Any] = report.to_json()
        return PassResult(output, result)
