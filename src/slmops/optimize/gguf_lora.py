"""Export a peft LoRA adapter to llama.cpp's GGUF LoRA adapter format (what ``llama_adapter_lora_init`` loads).

The layout follows llama.cpp's ``convert_lora_to_gguf.py`` and the checks of ``src/llama-adapter.cpp``:

- metadata: ``general.architecture`` = the base's GGUF architecture (llama.cpp refuses a mismatch),
  ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` (float32). llama.cpp scales each
  product by ``alpha / rank`` with the rank read from the tensors, which is what peft does (rsLoRA's
  ``alpha / sqrt(rank)`` is written as ``alpha' = alpha · sqrt(rank)``);
- tensors: for every adapted base weight ``<gguf name>.weight`` (named with the same ``gguf`` tensor-name map as our
  exporter), ``<gguf name>.weight.lora_a`` with numpy shape (rank, in) = ggml ``ne = [in, rank]`` and
  ``<gguf name>.weight.lora_b`` with numpy shape (out, rank) = ggml ``ne = [rank, out]``: llama.cpp checks
  ``a.ne[0] == W.ne[0]``, ``b.ne[1] == W.ne[1]`` and ``a.ne[1] == b.ne[0]``. These are peft's own shapes;
- llama: the rows of Q and K are permuted to llama.cpp's interleaved rotary layout in the base, so the rows of
  their ``lora_b`` are permuted the same way (``W + B·A`` permuted is ``W_p + B_p·A``).

Only linear layers of the decoder blocks are supported (peft's embedding LoRA uses other names and llama.cpp
transposes it); the adapter directory must hold the base's ``config.json`` as ``base_config.json`` (the ``lora`` pass
writes it), so the export needs nothing but the adapter.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from slmops.errors import InvalidModelError
from slmops.optimize._files import replace_durably
from slmops.optimize.export_gguf import SUPPORTED_MODEL_TYPES, _permute_rotary
from slmops.optimize.gguf_metadata import import_gguf
from slmops.optimize.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, BASE_CONFIG_FILE
from slmops.optimize.passes import Pass, PassParams, PassProgress, register_pass

__all__ = ["ExportGGUFLora", "ExportGGUFLoraParams", "LoraExportReport", "export_lora_gguf"]

LoraFileType = Literal["F32", "F16"]
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraExportReport:
    output_path: Path
    arch: str
    rank: int
    alpha: float
    n_pairs: int
    n_params: int
    file_type: LoraFileType

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "rank": self.rank,
            "alpha": self.alpha,
            "tensor_pairs": self.n_pairs,
            "params": self.n_params,
            "file_type": self.file_type,
            "bytes": self.output_path.stat().st_size,
        }


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidModelError(
            f"expected {path.name} in the adapter directory {path.parent}, found none; the lora pass writes it"
        )
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise InvalidModelError(f"{path}: expected a JSON object")
    return value


def export_lora_gguf(adapter_dir: Path, output_path: Path, *, file_type: LoraFileType = "F32") -> LoraExportReport:
    """Write the peft adapter in ``adapter_dir`` as a GGUF LoRA adapter at ``output_path`` (atomically)."""
    import numpy as np
    from safetensors.numpy import load_file

    gguf = import_gguf("exporting a LoRA adapter to GGUF")
    adapter_dir = Path(adapter_dir)
    peft_config = _json(adapter_dir / ADAPTER_CONFIG_FILE)
    base_config = _json(adapter_dir / BASE_CONFIG_FILE)
    model_type = str(base_config.get("model_type", ""))
    arch = SUPPORTED_MODEL_TYPES.get(model_type)
    if arch is None:
        raise InvalidModelError(
            f"the GGUF LoRA exporter supports bases of types {', '.join(sorted(SUPPORTED_MODEL_TYPES))}; the "
            f"adapter's base is {model_type!r}"
        )
    if peft_config.get("peft_type", "LORA") != "LORA":
        raise InvalidModelError(f"expected a LoRA adapter, found peft_type {peft_config.get('peft_type')!r}")
    if peft_config.get("use_dora"):
        raise InvalidModelError("DoRA adapters have no llama.cpp form; train a plain LoRA (use_dora: false)")
    rank = int(peft_config["r"])
    alpha = float(peft_config["lora_alpha"])
    if peft_config.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # llama.cpp scales by alpha / rank; rsLoRA by lora_alpha / sqrt(rank)
    if peft_config.get("rank_pattern") or peft_config.get("alpha_pattern"):
        raise InvalidModelError("adapters with per-module rank_pattern/alpha_pattern are not supported")
    weights_path = adapter_dir / ADAPTER_WEIGHTS_FILE
    if not weights_path.is_file():
        raise InvalidModelError(f"expected {ADAPTER_WEIGHTS_FILE} in {adapter_dir}, found none")
    tensors = load_file(str(weights_path))
    n_blocks = int(base_config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_blocks)
    n_head = int(base_config["num_attention_heads"])
    n_kv = int(base_config.get("num_key_value_heads") or n_head)
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        hf = key.removeprefix(_PEFT_PREFIX)
        for marker, part in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
            if hf.endswith(marker):
                pairs.setdefault(hf.removesuffix(marker), {})[part] = value
                break
        else:
            raise InvalidModelError(
                f"adapter tensor {key!r} is not a LoRA A/B matrix of a linear layer; llama.cpp adapters hold only "
                "those (train without modules_to_save or embedding targets)"
            )
    output_path = Path(output_path)
    temp = output_path.with_name(f".{output_path.name}.tmp")
    writer = gguf.GGUFWriter(str(temp), arch)
    n_params = 0
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"{arch} LoRA r{rank}")
        dtype, ggml_type = (
            (np.float32, gguf.GGMLQuantizationType.F32)
            if file_type == "F32"
            else (np.float16, gguf.GGMLQuantizationType.F16)
        )
        for module in sorted(pairs):
            pair = pairs[module]
            if set(pair) != {"a", "b"}:
                raise InvalidModelError(f"adapter module {module!r} has only lora_{''.join(pair)}; expected A and B")
            base_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
            if base_name is None:
                raise InvalidModelError(f"no GGUF name for the adapted weight {module!r} of a {arch} model")
            a = pair["a"].astype(np.float32)  # (rank, in)
            b = pair["b"].astype(np.float32)  # (out, rank)
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise InvalidModelError(f"adapter module {module!r}: A {a.shape} and B {b.shape} do not pair up")
            if arch == "llama" and module.endswith("self_attn.q_proj"):
                b = _permute_rotary(b, n_head)
            elif arch == "llama" and module.endswith("self_attn.k_proj"):
                b = _permute_rotary(b, n_kv)
            writer.add_tensor(f"{base_name}.lora_a", np.ascontiguousarray(a).astype(dtype), raw_dtype=ggml_type)
            writer.add_tensor(f"{base_name}.lora_b", np.ascontiguousarray(b).astype(dtype), raw_dtype=ggml_type)
            n_params += int(a.size + b.size)
        if not pairs:
            raise InvalidModelError(f"{weights_path} holds no LoRA tensors")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        temp.unlink(missing_ok=True)
        raise
    writer.close()
    replace_durably(temp, output_path)
    return LoraExportReport(output_path, arch, rank, alpha, len(pairs), n_params, file_type)


class ExportGGUFLoraParams(PassParams):
    file_type: LoraFileType = Field(default="F32", description="type of the A and B matrices")


@register_pass
class ExportGGUFLora(Pass[ExportGGUFLoraParams]):
    """A peft LoRA adapter directory → llama.cpp GGUF LoRA adapter (loaded beside its base GGUF)."""

    name = "export_gguf_lora"
    input_format = "safetensors"
    output_format = "gguf"
    params_model = ExportGGUFLoraParams
    description = "export a LoRA adapter to llama.cpp's GGUF adapter format"

    def variant_label(self, params: ExportGGUFLoraParams) -> str:
        return f"lora-{params.file_type.lower()}"

    def apply(
        self, input_path: Path, params: ExportGGUFLoraParams, output: Path, progress: PassProgress
    ) -> dict[str, Any]:
        progress(0, 1)
        report = export_lora_gguf(input_path, output, file_type=params.file_type).to_json()
        progress(1, 1)
        return report
