"""An importance matrix computed from Python, the way llama.cpp's ``llama-imatrix`` tool does it.

For every matrix multiplication ``W @ x`` with a model weight ``W`` (a tensor named ``blk.*.weight``, or the tied
``token_embd.weight`` used as the output projection), accumulate the mean of ``x_j²`` over all calibration tokens for
each input column ``j``. ``llama_model_quantize`` takes these per-column importances (``llama_model_imatrix_data``)
and weights the quantization error of each column by them.

The activations are read in llama.cpp's graph-evaluation callback (``cb_eval``): the callback is asked whether it
wants a node; for ``MUL_MAT`` nodes it says yes, and is called again once the node is computed, when the input
activations ``src[1]`` are in host memory (CPU backend). ``struct ggml_tensor`` is not part of the Python bindings,
so its layout is declared here and checked against ``ggml_get_name`` before the first use.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops.errors import RuntimeBackendError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["ImportanceMatrix", "compute_imatrix"]

_GGML_MAX_DIMS = 4
_GGML_MAX_OP_PARAMS = 64
_GGML_MAX_SRC = 10
_GGML_MAX_NAME = 64
_GGML_TYPE_F32 = 0


class _GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ggml 0.9 / llama.cpp as bundled with llama-cpp-python 0.3.x."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * _GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * _GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (_GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * _GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * _GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


ImportanceMatrix = dict[str, "npt.NDArray[np.float32]"]
"""Tensor name → mean squared activation per input column (length = the tensor's row size)."""


def _ggml_base(llama_cpp: Any) -> ctypes.CDLL:
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))
            lib.ggml_get_name.restype = ctypes.c_void_p
            lib.ggml_get_name.argtypes = [ctypes.c_void_p]
            lib.ggml_op_name.restype = ctypes.c_char_p
            lib.ggml_op_name.argtypes = [ctypes.c_int]
            return lib
    raise RuntimeBackendError(f"cannot find ggml's base library in {lib_dir}; reinstall llama-cpp-python")


class _Collector:
    def __init__(self, ggml: ctypes.CDLL) -> None:
        import numpy as np

        self.ggml = ggml
        self.np = np
        self.sums: dict[str, npt.NDArray[np.float64]] = {}
        self.counts: dict[str, int] = {}
        self.mul_mat: int | None = None
        self.checked = False
        self.error: str | None = None

    def _is_mul_mat(self, op: int) -> bool:
        if self.mul_mat is None:
            if self.ggml.ggml_op_name(op) == b"MUL_MAT":
                self.mul_mat = op
            return self.mul_mat is not None
        return op == self.mul_mat

    def _check_layout(self, address: int, tensor: _GGMLTensor) -> bool:
        if not self.checked:
            name_at = self.ggml.ggml_get_name(address)
            expected = address + _GGMLTensor.name.offset
            if name_at != expected:
                self.error = "the ggml_tensor layout of this llama.cpp build is not the one slmops knows"
                return False
            self.checked = True
        return True

    def _weight_name(self, tensor: _GGMLTensor) -> str | None:
        if not tensor.src[0]:
            return None
        weight = _GGMLTensor.from_address(tensor.src[0])
        name = bytes(weight.name).split(b"\0", 1)[0].decode("utf-8", "replace")
        if (name.startswith("blk.") and name.endswith(".weight")) or name in ("output.weight", "token_embd.weight"):
            return name
        return None

    def __call__(self, address: int, ask: bool, user_data: int) -> bool:
        try:
            tensor = _GGMLTensor.from_address(address)
            if not self._check_layout(address, tensor) or not self._is_mul_mat(tensor.op):
                return False
            name = self._weight_name(tensor)
            if name is None:
                return False
            if ask:
                return True
            act = _GGMLTensor.from_address(tensor.src[1])
            columns = int(act.ne[0])
            rows = int(act.ne[1]) * int(act.ne[2]) * int(act.ne[3])
            contiguous = act.nb[0] == 4 and act.nb[1] == 4 * columns
            if act.type != _GGML_TYPE_F32 or not contiguous or not act.data:
                return True
            buffer = (ctypes.c_float * (rows * columns)).from_address(act.data)
            x = self.np.ctypeslib.as_array(buffer).reshape(rows, columns)  # (tokens, columns)
            squares = self.np.einsum("ij,ij->j", x, x, dtype=self.np.float64)  # (columns,)
            if name in self.sums:
                if self.sums[name].shape[0] == columns:
                    self.sums[name] += squares
                    self.counts[name] += rows
            else:
                self.sums[name] = squares
                self.counts[name] = rows
            return True
        except Exception as exc:  # never let an exception cross into C
            self.error = f"{type(exc).__name__}: {exc}"
            return False


def compute_imatrix(
    model_path: Path,
    tokens: Sequence[int],
    *,
    context_tokens: int,
    threads: int,
    progress: Callable[[float, float], None] | None = None,
) -> tuple[ImportanceMatrix, dict[str, Any]]:
    """Run ``tokens`` through the model in chunks of ``context_tokens`` and return the importance matrix and a
    summary (chunks, tokens, tensors)."""
    from slmops.optimize._llama import LlamaSession, import_llama

    llama_cpp = import_llama("computing an importance matrix")
    collector = _Collector(_ggml_base(llama_cpp))
    callback = llama_cpp.ggml_backend_sched_eval_callback(collector)
    chunks = [list(tokens[i : i + context_tokens]) for i in range(0, len(tokens), context_tokens)]
    chunks = [c for c in chunks if len(c) >= 2]
    if not chunks:
        raise RuntimeBackendError(f"the calibration text gave {len(tokens)} tokens; at least 2 are needed")
    batch = 64
    done = 0
    with LlamaSession(model_path, n_ctx=context_tokens, n_threads=threads, max_outputs=batch, cb_eval=callback) as s:
        for chunk in chunks:
            if s.add_bos and s.bos is not None:
                chunk = [s.bos, *chunk[1:]]
            s.clear()
            for start in range(0, len(chunk), batch):
                part = chunk[start : start + batch]
                s.decode(part, start, [True] * len(part), read=False)  # logits too: the output projection
                if collector.error:
                    raise RuntimeBackendError(f"collecting the importance matrix failed: {collector.error}")
                done += len(part)
                if progress is not None:
                    progress(done, len(tokens))
    if not collector.sums:
        raise RuntimeBackendError(f"no matrix multiplications with model weights were seen while running {model_path}")
    np = collector.np
    matrix: ImportanceMatrix = {
        name: (collector.sums[name] / max(collector.counts[name], 1)).astype(np.float32) for name in collector.sums
    }
    summary = {"chunks": len(chunks), "tokens": sum(len(c) for c in chunks), "tensors": len(matrix)}
    return matrix, summary
