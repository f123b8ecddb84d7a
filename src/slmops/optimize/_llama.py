"""A thin, bounded-memory session over llama.cpp's C API (llama-cpp-python's ctypes bindings).

The high-level ``llama_cpp.Llama`` keeps a (context × vocabulary) score array when all logits are wanted: with
Gemma 3's 262,144-token vocabulary that is 1 GiB at a 1,024-token context. Here logits are requested only for the
positions that are scored, at most ``max_outputs`` per decode call, and read straight from llama.cpp's output buffer.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from slmops.errors import MissingExtraError, RuntimeBackendError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["LlamaSession", "attach_lora", "import_llama", "quiet_llama_logs"]

_log_callback: Any = None


def import_llama(purpose: str) -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise MissingExtraError("llama", purpose, "llama-cpp-python") from None
    return llama_cpp


def quiet_llama_logs() -> None:
    """Send llama.cpp's own log lines nowhere (they go to stderr by default)."""
    global _log_callback
    llama_cpp = import_llama("running llama.cpp")
    if _log_callback is None:

        def _drop(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            return None

        _log_callback = llama_cpp.llama_log_callback(_drop)
        llama_cpp.llama_backend_init()
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


class LlamaSession:
    """One model and one context. Use as a context manager; everything is freed on exit."""

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int = 512,
        n_threads: int = 2,
        max_outputs: int = 64,
        vocab_only: bool = False,
        cb_eval: Any = None,
        lora_path: Path | None = None,
        lora_scale: float = 1.0,
    ) -> None:
        self.model_path = Path(model_path)
        self.lora_path = lora_path  # a GGUF LoRA adapter applied over the model (slmops.core.adapters)
        self.lora_scale = lora_scale
        self._adapter: Any = None
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.max_outputs = max_outputs
        self.vocab_only = vocab_only
        self.cb_eval = cb_eval
        self._lib: Any = None
        self._model: Any = None
        self._ctx: Any = None
        self._vocab: Any = None
        self.n_vocab = 0
        self.bos: int | None = None
        self.add_bos = False

    def __enter__(self) -> LlamaSession:
        lib = import_llama("running a GGUF model")
        quiet_llama_logs()
        self._lib = lib
        mparams = lib.llama_model_default_params()
        mparams.vocab_only = self.vocab_only
        model = lib.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not model:
            raise RuntimeBackendError(
                f"llama.cpp could not load {self.model_path}; check that it is a GGUF model of a supported "
                "architecture (`slmops model show` prints what the file says)"
            )
        self._model = model
        self._vocab = lib.llama_model_get_vocab(model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        bos = int(lib.llama_vocab_bos(self._vocab))
        self.bos = bos if bos >= 0 else None
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab)) and self.bos is not None
        if not self.vocab_only:
            cparams = lib.llama_context_default_params()
            cparams.n_ctx = self.n_ctx
            cparams.n_batch = self.max_outputs
            cparams.n_ubatch = self.max_outputs
            cparams.n_seq_max = 1
            cparams.n_threads = self.n_threads
            cparams.n_threads_batch = self.n_threads
            cparams.no_perf = True
            if self.cb_eval is not None:
                cparams.cb_eval = self.cb_eval
            ctx = lib.llama_init_from_model(model, cparams)
            if not ctx:
                self.close()
                raise RuntimeBackendError(
                    f"llama.cpp could not create a {self.n_ctx}-token context for {self.model_path} "
                    "(out of memory?); try a smaller context"
                )
            self._ctx = ctx
            if self.lora_path is not None:
                try:
                    attach_lora(self, self.lora_path, self.lora_scale)
                except RuntimeBackendError:
                    self.close()
                    raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._ctx:
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if self._adapter:
            self._lib.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        buffer = (self._lib.llama_token * capacity)()
        count = self._lib.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, False)
        if count < 0:  # byte-fallback vocabularies can need more tokens than bytes; -count is the size needed
            capacity = -count
            buffer = (self._lib.llama_token * capacity)()
            count = self._lib.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, False)
            if count < 0:
                raise RuntimeBackendError(f"llama.cpp could not tokenize {len(data)} bytes of text")
        return list(buffer[:count])

    # ------------------------------------------------------------------ decoding

    def clear(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)

    def forget_from(self, position: int) -> None:
        """Drop the cached positions ``position`` and later (to score another continuation of the same prefix)."""
        self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self._ctx), 0, position, -1)

    def decode(
        self, tokens: Sequence[int], start: int, want: Sequence[bool], *, read: bool = True
    ) -> npt.NDArray[np.float32] | None:
        """Decode ``tokens`` at positions ``start``..; return a copy of the logits of the positions marked in
        ``want``, shape (n_wanted, n_vocab), or None when none are wanted (or ``read`` is False: computed, not
        copied). At most ``max_outputs`` tokens a call."""
        import numpy as np

        n = len(tokens)
        if n == 0 or n > self.max_outputs or len(want) != n:
            raise ValueError(f"decode takes 1..{self.max_outputs} tokens with one flag each, got {n}")
        lib = self._lib
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = bool(want[i])
            batch.n_tokens = n
            status = lib.llama_decode(self._ctx, batch)
            if status != 0:
                raise RuntimeBackendError(
                    f"llama.cpp failed to decode {n} tokens at position {start} (status {status}); "
                    f"the context holds {self.n_ctx} tokens"
                )
        finally:
            lib.llama_batch_free(batch)
        wanted = sum(1 for w in want if w)
        if not wanted or not read:
            return None
        pointer = lib.llama_get_logits(self._ctx)
        rows = np.ctypeslib.as_array(pointer, shape=(wanted * self.n_vocab,))
        return rows.reshape(wanted, self.n_vocab).copy()  # (wanted, vocab)


def attach_lora(session: LlamaSession, lora_path: Path, scale: float = 1.0) -> None:
    """Load the GGUF LoRA adapter ``lora_path`` for the session's model and apply it to its context (freed with the
    session); a :class:`RuntimeBackendError` when llama.cpp refuses it."""
    lib = session._lib
    adapter = lib.llama_adapter_lora_init(session._model, str(lora_path).encode())
    if not adapter:  # a NULL POINTER is falsy, not None
        raise RuntimeBackendError(
            f"llama.cpp could not load the LoRA adapter {lora_path} for {session.model_path.name}; an adapter loads "
            "only beside the base architecture and tensor shapes it was trained on (check its base)"
        )
    session._adapter = adapter
    adapters = (lib.llama_adapter_lora_p_ctypes * 1)(adapter)
    scales = (ctypes.c_float * 1)(scale)
    if lib.llama_set_adapters_lora(session._ctx, adapters, 1, scales) != 0:
        raise RuntimeBackendError(f"llama.cpp could not apply the LoRA adapter {lora_path}")


def log_softmax_at(logits: npt.NDArray[np.float32], targets: Sequence[int]) -> npt.NDArray[np.float64]:
    """log p(target_i | row_i) for each row of ``logits`` (rows, vocab), in float64."""
    import numpy as np

    rows = logits.astype(np.float64)  # (rows, vocab)
    peak = rows.max(axis=1, keepdims=True)
    lse = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
    picked = rows[np.arange(len(targets)), np.asarray(targets)]
    result: npt.NDArray[np.float64] = picked - lse
    return result
