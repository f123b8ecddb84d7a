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

Each safetensors → safetensors pass is a :class:`ModelEditPass`: it loads its input, edits the model in memory and
writes ``workdir/model`` (config, ``model.safetensors``, and the tokenizer and GGUF metadata files of its input); it
reports the achieved sparsity per tensor and overall, measured on its output.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, model_validator

from slmops.optimize.export_gguf import export_gguf_dir
from slmops.optimize.gguf_metadata import GGUF_METADATA_FILE, write_gguf_metadata
from slmops.optimize.hf_load import copy_sidecar_files, load_hf_model, load_hf_model_from_gguf, save_hf_model
from slmops.optimize.passes import ModelFileFormat, Pass, PassParams, PassProgress, register_pass
from slmops.optimize.torch_ops import (
    magnitude_prune,
    quantize_int8_weight_only,
    semi_structured_prune,
    structured_prune,
)

__all__ = [
    "EditedModel",
    "ExportGGUF",
    "ExportGGUFParams",
    "HFFromGGUF",
    "HFFromGGUFParams",
    "Int8Params",
    "Int8WeightOnly",
    "MagnitudePrune",
    "ModelEditPass",
    "PruneParams",
    "SemiStructured",
    "SemiStructuredParams",
    "StructuredParams",
    "StructuredPrune",
]

E = TypeVar("E", bound=PassParams)


@dataclass(frozen=True)
class EditedModel:
    """What an edit made: the model (the same object or a rebuilt one), its report, and the tensors to store when
    they are not the model's own state dict (int8 + scales)."""

    model: Any
    report: dict[str, Any]
    tensors: dict[str, Any] | None = None


class ModelEditPass(Pass[E]):
    """safetensors → safetensors: load the input model, :meth:`edit` it, save it with its input's sidecar files."""

    input_format: ClassVar[ModelFileFormat] = "safetensors"
    output_format: ClassVar[ModelFileFormat] = "safetensors"

    @abstractmethod
    def edit(self, model: Any, params: E, progress: PassProgress) -> EditedModel:
        """Change ``model`` (a float32 transformers causal LM) as the pass says; no I/O."""

    def apply(self, input_path: Path, params: E, output: Path, progress: PassProgress) -> dict[str, Any]:
        edited = self.edit(load_hf_model(input_path), params, progress)
        save_hf_model(edited.model, output, tensors=edited.tensors)
        copy_sidecar_files(input_path, output)
        return edited.report


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

    def apply(self, input_path: Path, params: HFFromGGUFParams, output: Path, progress: PassProgress) -> dict[str, Any]:
        progress(0, 2)
        model = load_hf_model_from_gguf(input_path)
        progress(1, 2)
        save_hf_model(model, output)
        write_gguf_metadata(input_path, output / GGUF_METADATA_FILE)
        progress(2, 2)
        return {
            "model_type": str(model.config.model_type),
            "params": sum(int(p.numel()) for p in model.parameters()),
            "dtype": "float32",
        }


class Int8Params(PassParams):
    pass


@register_pass
class Int8WeightOnly(ModelEditPass[Int8Params]):
    """Per-output-channel symmetric int8 of the decoder projections (embeddings, head and norms stay float32)."""

    name = "int8"
    params_model = Int8Params
    description = "int8 weight-only, per output channel, symmetric"

    def edit(self, model: Any, params: Int8Params, progress: PassProgress) -> EditedModel:
        report, tensors = quantize_int8_weight_only(model, progress=progress)
        return EditedModel(model, report.to_json(), tensors)


class PruneParams(PassParams):
    sparsity: float = Field(gt=0, lt=1, description="fraction of the targeted weights set to zero")
    scope: Literal["global", "per_layer"] = "global"


@register_pass
class MagnitudePrune(ModelEditPass[PruneParams]):
    """Unstructured magnitude pruning of the decoder projections."""

    name = "prune"
    params_model = PruneParams
    description = "unstructured magnitude pruning (global or per layer)"

    def variant_label(self, params: PruneParams) -> str:
        suffix = "" if params.scope == "global" else "l"
        return f"prune{round(params.sparsity * 100)}{suffix}"

    def edit(self, model: Any, params: PruneParams, progress: PassProgress) -> EditedModel:
        report = magnitude_prune(model, params.sparsity, scope=params.scope, progress=progress)
        return EditedModel(model, {"target_sparsity": params.sparsity, "scope": params.scope, **report.to_json()})


class StructuredParams(PassParams):
    sparsity: float = Field(gt=0, lt=1, description="fraction of heads (per KV group) or MLP channels per layer")
    target: Literal["heads", "mlp"] = "mlp"
    mode: Literal["remove", "mask"] = "remove"


@register_pass
class StructuredPrune(ModelEditPass[StructuredParams]):
    """Structured pruning of attention heads or MLP channels by L2 norm: removed (smaller model) or masked."""

    name = "prune_struct"
    params_model = StructuredParams
    description = "structured pruning of attention heads or MLP channels (L2 norm)"

    def variant_label(self, params: StructuredParams) -> str:
        return f"{params.target}{round(params.sparsity * 100)}{'' if params.mode == 'remove' else 'm'}"

    def edit(self, model: Any, params: StructuredParams, progress: PassProgress) -> EditedModel:
        pruned, report = structured_prune(
            model, params.sparsity, target=params.target, mode=params.mode, progress=progress
        )
        return EditedModel(pruned, {"target_sparsity": params.sparsity, **report.to_json()})


class SemiStructuredParams(PassParams):
    n: int = Field(default=2, gt=0, description="weights kept in each group")
    m: int = Field(default=4, gt=1, description="group size along the input dimension")

    @model_validator(mode="after")
    def _fewer_kept_than_grouped(self) -> SemiStructuredParams:
        if self.n >= self.m:
            raise ValueError(f"sparse_2_4 needs n < m, got n={self.n}, m={self.m}")
        return self


@register_pass
class SemiStructured(ModelEditPass[SemiStructuredParams]):
    """N:M semi-structured sparsity (2:4 by default) as masks; CPU kernels for it do not exist, so it is measured
    as a dense model with zeros."""

    name = "sparse_2_4"
    params_model = SemiStructuredParams
    description = "N:M (2:4) semi-structured sparsity, applied as masks"

    def variant_label(self, params: SemiStructuredParams) -> str:
        return f"sparse{params.n}of{params.m}"

    def edit(self, model: Any, params: SemiStructuredParams, progress: PassProgress) -> EditedModel:
        report = semi_structured_prune(model, n=params.n, m=params.m, progress=progress)
        return EditedModel(model, {"pattern": f"{params.n}:{params.m}", **report.to_json()})


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

    def apply(self, input_path: Path, params: ExportGGUFParams, output: Path, progress: PassProgress) -> dict[str, Any]:
        return export_gguf_dir(input_path, output, file_type=params.file_type, progress=progress).to_json()
