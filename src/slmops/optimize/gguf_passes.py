"""GGUF passes through llama.cpp and the ``gguf`` package: ``dequantize`` and ``quantize``.

``quantize`` covers llama.cpp's presets and its quality-aware options, as far as ``llama_model_quantize`` exposes
them to Python (llama-cpp-python 0.3.36): an importance matrix computed here from a calibration text
(``imatrix``), per-tensor type overrides by regular expression (``tensor_types``), and the output and token-embedding
types.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import Field, field_validator

from slmops.errors import InvalidModelError, RuntimeBackendError
from slmops.optimize.gguf_metadata import import_gguf
from slmops.optimize.passes import Pass, PassParams, PassProgress, register_pass

__all__ = ["QUANT_PRESETS", "Dequantize", "DequantizeParams", "ImatrixParams", "Quantize", "QuantizeParams"]

# Preset name → (llama_ftype, the ggml type most tensors get).
QUANT_PRESETS: dict[str, tuple[int, str]] = {
    "F16": (1, "F16"),
    "BF16": (32, "BF16"),
    "Q8_0": (7, "Q8_0"),
    "Q6_K": (18, "Q6_K"),
    "Q5_K_M": (17, "Q5_K"),
    "Q5_K_S": (16, "Q5_K"),
    "Q5_0": (8, "Q5_0"),
    "Q5_1": (9, "Q5_1"),
    "Q4_K_M": (15, "Q4_K"),
    "Q4_K_S": (14, "Q4_K"),
    "Q4_0": (2, "Q4_0"),
    "Q4_1": (3, "Q4_1"),
    "IQ4_NL": (25, "IQ4_NL"),
    "IQ4_XS": (30, "IQ4_XS"),
    "Q3_K_L": (13, "Q3_K"),
    "Q3_K_M": (12, "Q3_K"),
    "Q3_K_S": (11, "Q3_K"),
    "Q2_K": (10, "Q2_K"),
}
QuantPreset = Literal[
    "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1",
    "IQ4_NL", "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
]  # fmt: skip
_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "IQ4_NL",
                 "IQ4_XS", "Q3_K", "Q2_K")  # fmt: skip


def _ggml_type_id(name: str) -> int:
    from slmops.registry.formats.gguf import GGML_TYPES

    for type_id, info in GGML_TYPES.items():
        if info.name == name:
            return type_id
    raise ValueError(f"unknown tensor type {name!r}")


def _ggml_block_size(name: str) -> int:
    from slmops.registry.formats.gguf import GGML_TYPES

    return next(info.block_size for info in GGML_TYPES.values() if info.name == name)


def _check_tensor_type(value: str) -> str:
    if value not in _TENSOR_TYPES:
        raise ValueError(f"tensor type {value!r} is not one of {', '.join(_TENSOR_TYPES)}")
    return value


# ---------------------------------------------------------------------------------------------------- dequantize


class DequantizeParams(PassParams):
    chunk_rows: int = Field(default=16_384, gt=0, description="rows dequantized at a time (bounds memory)")


@register_pass
class Dequantize(Pass[DequantizeParams]):
    """Any GGUF → an F16 GGUF: quantized tensors become F16, F32 tensors stay F32, every metadata key is kept
    (``general.file_type`` becomes F16). Memory is bounded by ``chunk_rows`` rows of one tensor."""

    name = "dequantize"
    input_format = "gguf"
    output_format = "gguf"
    params_model = DequantizeParams
    description = "any GGUF to F16, keeping every metadata key"

    def variant_label(self, params: DequantizeParams) -> str:
        return "f16"

    def apply(self, input_path: Path, params: DequantizeParams, output: Path, progress: PassProgress) -> dict[str, Any]:
        gguf = import_gguf("dequantizing a GGUF model")

        reader = gguf.GGUFReader(str(input_path), "r")
        arch_field = reader.fields.get("general.architecture")
        if arch_field is None:
            raise InvalidModelError(f"{input_path}: no general.architecture key; not a llama.cpp model GGUF")
        writer = gguf.GGUFWriter(str(output), str(arch_field.contents()))
        copied = _copy_metadata_as_f16(gguf, reader, writer)
        plan, converted = _plan_f16_tensors(gguf, reader, writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        fout = writer.fout[0]
        total = sum(int(item.tensor.n_elements) for item in plan)
        done = 0
        for item in plan:
            writer.write_padding(fout, fout.tell())
            nbytes = _write_f16_tensor(gguf, fout, item, params.chunk_rows, input_path)
            writer.write_padding(fout, nbytes)
            done += int(item.tensor.n_elements)
            progress(done, total)
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        del reader
        return {"converted_tensors": dict(sorted(converted.items())), "metadata_keys": copied, "tensors": len(plan)}


class _TensorPlan(NamedTuple):
    tensor: Any  # a gguf.ReaderTensor
    dtype: Any  # numpy float32 or float16
    np_shape: tuple[int, ...]
    convert: bool  # quantized: dequantize to F16

    @property
    def nbytes(self) -> int:
        import numpy as np

        return int(np.prod(self.np_shape, dtype=np.int64)) * int(np.dtype(self.dtype).itemsize)


def _copy_metadata_as_f16(gguf: Any, reader: Any, writer: Any) -> int:
    """Copy every metadata key (``general.file_type`` set to F16, the alignment kept); return how many."""
    copied = 0
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value: Any = field.contents()
        if field.name == "general.file_type":
            value = 1  # LLAMA_FTYPE_MOSTLY_F16
        if field.name == "general.alignment":
            writer.data_alignment = int(value)
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
        copied += 1
    if "general.file_type" not in reader.fields:
        writer.add_file_type(1)
    return copied


def _plan_f16_tensors(gguf: Any, reader: Any, writer: Any) -> tuple[list[_TensorPlan], dict[str, int]]:
    """Declare every tensor to ``writer`` as F32 (kept) or F16; return the plan and the count of converted tensors
    per quantization type."""
    import numpy as np

    plan: list[_TensorPlan] = []
    converted: dict[str, int] = {}
    for tensor in reader.tensors:
        np_shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        qtype = tensor.tensor_type
        if qtype == gguf.GGMLQuantizationType.F32:
            item = _TensorPlan(tensor, np.float32, np_shape, convert=False)
        elif qtype == gguf.GGMLQuantizationType.F16:
            item = _TensorPlan(tensor, np.float16, np_shape, convert=False)
        else:
            item = _TensorPlan(tensor, np.float16, np_shape, convert=True)
            converted[qtype.name] = converted.get(qtype.name, 0) + 1
        writer.add_tensor_info(tensor.name, np_shape, np.dtype(item.dtype), item.nbytes)
        plan.append(item)
    return plan, converted


def _write_f16_tensor(gguf: Any, fout: Any, item: _TensorPlan, chunk_rows: int, input_path: Path) -> int:
    """Write one tensor's data (dequantized ``chunk_rows`` rows at a time when it is quantized); return its bytes."""
    import numpy as np

    tensor = item.tensor
    if not item.convert:
        data = np.asarray(tensor.data)
        data.tofile(fout)
        nbytes = int(data.nbytes)
    else:
        nbytes = 0
        raw = np.asarray(tensor.data)
        rows = raw.reshape(-1, raw.shape[-1])  # (rows, bytes per row)
        for start in range(0, rows.shape[0], chunk_rows):
            part = gguf.quants.dequantize(rows[start : start + chunk_rows], tensor.tensor_type)
            out = part.astype(np.float16)  # (chunk, row elements)
            if not np.isfinite(out).all():
                raise InvalidModelError(
                    f"{input_path}: tensor {tensor.name!r} has values outside the F16 range; "
                    "an F16 copy would lose them (dequantize to F32 is not offered)"
                )
            out.tofile(fout)
            nbytes += out.nbytes
    if nbytes != item.nbytes:
        raise RuntimeBackendError(f"tensor {tensor.name!r}: wrote {nbytes} bytes, expected {item.nbytes}")
    return nbytes


# ---------------------------------------------------------------------------------------------------- quantize


class ImatrixParams(PassParams):
    text: str = Field(default="builtin:calibration.txt", description="calibration text: builtin:NAME or a path")
    max_tokens: int = Field(default=2048, gt=1)
    context_tokens: int = Field(default=512, gt=1)


class QuantizeParams(PassParams):
    type: QuantPreset
    allow_requantize: bool = True
    imatrix: ImatrixParams | None = None
    tensor_types: dict[str, str] = Field(default_factory=dict, description="regex on tensor names → tensor type")
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False

    @field_validator("tensor_types")
    @classmethod
    def _overrides(cls, value: dict[str, str]) -> dict[str, str]:
        for pattern, type_name in value.items():
            _check_tensor_type(type_name)
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"tensor_types pattern {pattern!r} is not a regular expression: {exc}") from None
        return value

    @field_validator("output_tensor_type", "token_embedding_type")
    @classmethod
    def _type(cls, value: str | None) -> str | None:
        return None if value is None else _check_tensor_type(value)


@register_pass
class Quantize(Pass[QuantizeParams]):
    """llama.cpp quantization (``llama_model_quantize``) to a preset, optionally with an importance matrix computed
    from a calibration text and per-tensor type overrides. Reports requantization and every tensor that did not get
    the type it asked for."""

    name = "quantize"
    input_format = "gguf"
    output_format = "gguf"
    params_model = QuantizeParams
    description = "llama.cpp quantization: presets, importance matrix, per-tensor types"

    def variant_label(self, params: QuantizeParams) -> str:
        label = params.type.lower()
        if params.imatrix is not None:
            label += "-imat"
        if params.tensor_types or params.output_tensor_type or params.token_embedding_type:
            label += "-mix"
        return label

    def output_stem(self, params: QuantizeParams) -> str:
        return params.type.lower()

    def apply(self, input_path: Path, params: QuantizeParams, output: Path, progress: PassProgress) -> dict[str, Any]:
        from slmops.optimize._llama import import_llama, quiet_llama_logs
        from slmops.registry.formats.gguf import read_gguf

        llama_cpp = import_llama("quantizing a GGUF model")
        quiet_llama_logs()
        source = read_gguf(input_path)
        source_types = {t.type_name for t in source.tensors if len(t.shape) >= 2}
        already_quantized = sorted(source_types - {"F32", "F16", "BF16"})
        report: dict[str, Any] = {"preset": params.type, "source_types": sorted(source_types)}
        if already_quantized:
            report["requantized_from"] = already_quantized
            report["allow_requantize"] = params.allow_requantize
            if not params.allow_requantize:
                raise InvalidModelError(
                    f"{input_path} is already quantized ({', '.join(already_quantized)}); quantizing it again "
                    "compounds the error. Dequantize it first (pass 'dequantize'), or set allow_requantize: true"
                )
        threads = max(1, os.cpu_count() or 1)
        keep: list[Any] = []  # ctypes buffers that must outlive the call
        qparams = llama_cpp.llama_model_quantize_default_params()
        qparams.nthread = threads
        qparams.ftype = QUANT_PRESETS[params.type][0]
        qparams.allow_requantize = params.allow_requantize
        qparams.pure = params.pure
        if params.output_tensor_type is not None:
            qparams.output_tensor_type = _ggml_type_id(params.output_tensor_type)
        if params.token_embedding_type is not None:
            qparams.token_embedding_type = _ggml_type_id(params.token_embedding_type)
        if params.tensor_types:
            overrides = (llama_cpp.llama_model_tensor_override * (len(params.tensor_types) + 1))()
            for i, (pattern, type_name) in enumerate(params.tensor_types.items()):
                encoded = ctypes.create_string_buffer(pattern.encode())
                keep.append(encoded)
                overrides[i].pattern = ctypes.cast(encoded, ctypes.c_char_p)
                overrides[i].type = _ggml_type_id(type_name)
            overrides[len(params.tensor_types)].pattern = None
            keep.append(overrides)
            qparams.tt_overrides = overrides
        if params.imatrix is not None:
            matrix_report = self._attach_imatrix(input_path, params.imatrix, qparams, keep, threads, progress)
            report["imatrix"] = matrix_report
        status = llama_cpp.llama_model_quantize(str(input_path).encode(), str(output).encode(), ctypes.byref(qparams))
        if status != 0 or not output.exists():
            raise RuntimeBackendError(
                f"llama.cpp failed to quantize {input_path} to {params.type} (status {status}); "
                "an importance-matrix type without an imatrix, or an unsupported architecture, are the usual causes"
            )
        del keep
        report.update(_type_report(read_gguf(output), params))
        progress(1, 1)
        return report

    def _attach_imatrix(
        self,
        input_path: Path,
        settings: ImatrixParams,
        qparams: Any,
        keep: list[Any],
        threads: int,
        progress: PassProgress,
    ) -> dict[str, Any]:
        import numpy as np

        from slmops.optimize._data import read_text
        from slmops.optimize._imatrix import compute_imatrix
        from slmops.optimize._llama import LlamaSession, import_llama

        llama_cpp = import_llama("computing an importance matrix")
        with LlamaSession(input_path, vocab_only=True) as vocab:
            tokens = vocab.tokenize(read_text(settings.text), add_special=False)[: settings.max_tokens]
        matrix, summary = compute_imatrix(
            input_path, tokens, context_tokens=settings.context_tokens, threads=threads, progress=progress
        )
        entries = (llama_cpp.llama_model_imatrix_data * (len(matrix) + 1))()
        for i, (name, values) in enumerate(sorted(matrix.items())):
            array = np.ascontiguousarray(values, dtype=np.float32)
            encoded = ctypes.create_string_buffer(name.encode())
            keep.extend((array, encoded))
            entries[i].name = ctypes.cast(encoded, ctypes.c_char_p)
            entries[i].data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = array.size
        entries[len(matrix)].name = None
        keep.append(entries)
        qparams.imatrix = entries
        return {**summary, "text": settings.text}


def _type_report(info: Any, params: QuantizeParams) -> dict[str, Any]:
    """Which type each weight matrix got, against the type it asked for (preset default, override, embedding)."""
    default = QUANT_PRESETS[params.type][1]
    compiled = [(re.compile(p), t) for p, t in params.tensor_types.items()]
    fallbacks: list[dict[str, Any]] = []
    preset_mix: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for tensor in info.tensors:
        counts[tensor.type_name] = counts.get(tensor.type_name, 0) + 1
        if len(tensor.shape) < 2:
            continue  # norms and biases stay F32 in every preset
        requested = next((t for rx, t in compiled if rx.search(tensor.name)), None)
        if requested is None and tensor.name == "token_embd.weight" and params.token_embedding_type:
            requested = params.token_embedding_type
        if requested is None and tensor.name == "output.weight" and params.output_tensor_type:
            requested = params.output_tensor_type
        explicit = requested is not None
        requested = requested or default
        if tensor.type_name == requested:
            continue
        row = tensor.shape[0]
        if row % _ggml_block_size(requested):
            fallbacks.append(
                {
                    "tensor": tensor.name,
                    "requested": requested,
                    "got": tensor.type_name,
                    "reason": f"row size {row} is not a multiple of the {requested} block "
                    f"({_ggml_block_size(requested)})",
                }
            )
        elif explicit:
            fallbacks.append(
                {
                    "tensor": tensor.name,
                    "requested": requested,
                    "got": tensor.type_name,
                    "reason": "llama.cpp chose another type",
                }
            )
        else:
            preset_mix.setdefault(tensor.type_name, []).append(tensor.name)
    return {
        "default_type": default,
        "tensor_types": dict(sorted(counts.items())),
        "fallbacks": fallbacks,
        "preset_mix": {k: len(v) for k, v in sorted(preset_mix.items())},
    }
