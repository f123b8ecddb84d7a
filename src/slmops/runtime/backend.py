"""Inference backends: one small interface in front of an inference engine, and its llama.cpp implementation.

A backend is not thread-safe: :class:`slmops.runtime.host.ModelHost` serializes calls to each backend it holds.
Prompts and generated text stay in memory; nothing here logs them.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Required, TypedDict, Unpack, runtime_checkable

from slmops.errors import MissingExtraError, RuntimeBackendError

if TYPE_CHECKING:
    import llama_cpp

__all__ = ["Backend", "BackendConfig", "Completion", "LlamaCppBackend", "Sampling", "TextStream", "prompt_nll"]


def _import_llama_cpp() -> Any:
    """Import llama_cpp; first make OpenMP threads sleep rather than spin while they wait (unless the user chose).

    llama.cpp's OpenMP threads busy-wait by default. On a device whose cores are also busy with other work that
    collapses throughput: gemma3-270m on 2 threads of a loaded 2-core VM decoded 31 tokens in 30 s spinning and
    8.6 tokens/s with ``OMP_WAIT_POLICY=passive``. The variable only counts before the OpenMP runtime loads,
    i.e. before the first ``import llama_cpp`` in the process.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    try:
        import llama_cpp
    except ImportError as exc:
        raise MissingExtraError("llama", "running GGUF models", "llama-cpp-python") from exc
    return llama_cpp


@dataclass(frozen=True)
class BackendConfig:
    """How to load a model: context window, CPU threads (None: llama.cpp's default), sampling seed, batch size,
    and the prompt-NLL drift signal.

    ``prompt_nll_sample_rate`` is the fraction of requests whose prompt is scored (0 turns it off, 1 scores every
    request); a scored request's NLL is the mean negative log-likelihood, in nats per token, of its first
    ``prompt_nll_max_tokens`` prompt tokens after the first, each predicted from the tokens before it. See
    :func:`prompt_nll` for its cost.
    """

    context_tokens: int = 2048
    threads: int | None = None
    seed: int = 0
    batch_tokens: int = 512
    prompt_nll_sample_rate: float = 0.05
    prompt_nll_max_tokens: int = 32
    lora_path: Path | None = None  # a GGUF LoRA adapter loaded over the model (see slmops.core.adapters)
    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.lora_path, str):  # from JSON (the probe's child process)
            object.__setattr__(self, "lora_path", Path(self.lora_path))
        if not 0.0 <= self.prompt_nll_sample_rate <= 1.0:
            raise ValueError(f"prompt_nll_sample_rate must be in [0, 1] (0 = off); got {self.prompt_nll_sample_rate}")
        if self.prompt_nll_max_tokens < 1:
            raise ValueError(f"prompt_nll_max_tokens must be at least 1; got {self.prompt_nll_max_tokens}")


class Sampling(TypedDict, total=False):
    """How to generate: the keyword arguments of :meth:`Backend.complete` and :meth:`Backend.stream`."""

    max_tokens: Required[int]
    temperature: Required[float]
    top_p: Required[float]
    stop: Required[list[str]]
    seed: int | None  # None: the backend's configured seed


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class TextStream(Iterator[str]):
    """The text pieces of one generation, in order; the usage is known once the stream is exhausted.

    After the last piece, ``finish_reason`` is "stop" or "length" (None before, or if the stream was closed early),
    ``prompt_tokens`` is the prompt's length and ``completion_tokens`` the number of sampled tokens (an
    end-of-generation token counts). ``close()`` stops the generation early and frees the backend.
    Any iterator of pieces can be wrapped: ``TextStream(iter(["a", "b"]), prompt_tokens=3)``; the producer sets
    the fields as it goes. ``prompt_nll`` is the prompt's mean negative log-likelihood under the model (nats per
    token) when the backend measured it, else None.
    """

    def __init__(self, pieces: Iterator[str], *, prompt_tokens: int = 0, prompt_nll: float | None = None) -> None:
        self._pieces = pieces
        self.prompt_tokens = prompt_tokens
        self.prompt_nll = prompt_nll
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._on_close: list[Callable[[], None]] = []
        self._closed = False

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        if self._closed:
            raise StopIteration
        try:
            return next(self._pieces)
        except StopIteration:
            self.close()
            raise
        except BaseException:
            self.close()
            raise

    def call_on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once, when the stream is exhausted, fails or is closed."""
        self._on_close.append(callback)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._pieces, "close", None)
            if close is not None:
                close()
        finally:
            callbacks, self._on_close = self._on_close, []
            for callback in callbacks:
                callback()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@runtime_checkable
class Backend(Protocol):
    """A loaded model that completes prompts. Not thread-safe; see :class:`~slmops.runtime.host.ModelHost`."""

    model_id: str

    def complete(self, prompt: str, **sampling: Unpack[Sampling]) -> Completion: ...

    def stream(self, prompt: str, **sampling: Unpack[Sampling]) -> TextStream: ...

    def count_tokens(self, text: str) -> int: ...

    def close(self) -> None: ...


NLL_CHUNK_TOKENS = 8  # prompt positions per decode while scoring: llama.cpp's logits buffer holds 8 x n_vocab floats


def prompt_nll(llama: llama_cpp.Llama, tokens: Sequence[int], max_tokens: int) -> float | None:
    """The mean negative log-likelihood (nats per token) of ``tokens[1:n]``, ``n = min(len, max_tokens + 1)``, each
    predicted from the tokens before it; None when there is nothing to score or llama.cpp refuses.

    The positions are evaluated into the model's own context, ``NLL_CHUNK_TOKENS`` per ``llama_decode`` with the
    logits flag set for each (llama-cpp-python's batch), and recorded as evaluated: the generation that follows
    reuses them as a cached prefix, so scoring costs the output projection of ``max_tokens`` positions plus a
    log-softmax over the vocabulary per position, not a second prefill (8-token decodes are slower per token than
    one large batch, though). Memory stays ``NLL_CHUNK_TOKENS x
    n_vocab x 4`` bytes (8 MB for Gemma 3's 262,144 tokens) instead of the ``n_ctx x n_vocab x 4`` of
    ``logits_all=True``. The output projection over a large vocabulary dominates the cost: on gemma3-270m
    (Q4_K_M, 2 threads of a shared 2-core VM, 66-token chat prompts) scoring 32 positions raised the median
    request from 1.21 s to 2.28 s for 32 generated tokens (0.61 s to 1.45 s for one), 16 positions to 1.53 s;
    hence the default samples 5% of requests. Scoring also replaces the previous request's cached prefix.
    It uses llama-cpp-python's internal ``_ctx`` and ``_batch`` (0.3.x); if they change, scoring returns None
    and generation proceeds as before.
    """
    import numpy as np

    n = min(len(tokens), max_tokens + 1)
    if n < 2:
        return None
    engine: Any = llama  # the internals used here are untyped
    total = 0.0
    try:
        n_vocab = int(engine.n_vocab())
        engine.reset()
        engine._ctx.kv_cache_seq_rm(-1, 0, -1)
        for start in range(0, n, NLL_CHUNK_TOKENS):
            chunk = list(tokens[start : min(n, start + NLL_CHUNK_TOKENS)])
            engine._batch.set_batch(batch=chunk, n_past=start, logits_all=True)
            engine._ctx.decode(engine._batch)
            engine.input_ids[start : start + len(chunk)] = chunk
            engine.n_tokens = start + len(chunk)
            targets = np.asarray(tokens[start + 1 : min(n, start + len(chunk) + 1)], dtype=np.int64)  # (t,)
            if not len(targets):
                continue
            logits = np.ctypeslib.as_array(engine._ctx.get_logits(), shape=(len(chunk), n_vocab))  # (chunk, vocab)
            rows = logits[: len(targets)]  # (t, vocab), float32
            peak = rows.max(axis=1)  # (t,)
            log_z = peak + np.log(np.exp(rows - peak[:, None]).sum(axis=1))  # (t,)
            total += float((log_z - rows[np.arange(len(targets)), targets]).astype(np.float64).sum())
    except (AttributeError, RuntimeError, ValueError, TypeError):
        engine.n_tokens = 0  # nothing cached: the generation evaluates the whole prompt itself
        return None
    finally:
        engine._requires_eval = True  # the generation replays the last cached token before it samples
    value = total / (n - 1)
    return value if math.isfinite(value) else None


def _attach_lora(llama_cpp: Any, llama: llama_cpp.Llama, model_id: str, path: Path, scale: float) -> None:
    """Load the GGUF LoRA adapter at ``path`` over ``llama``'s model and make its context use it at ``scale``.

    llama.cpp's ``llama_adapter_lora_init`` returns NULL for a file that is missing, is not a GGUF adapter
    (``general.type = adapter``, ``adapter.type = lora``), was made for another architecture, or whose tensor shapes
    do not match the model. llama-cpp-python 0.3.x's own ``Llama(lora_path=...)`` tests that NULL pointer against
    ``None`` and so never notices, which is why the adapter is attached here. It is freed when the backend closes.
    """
    import ctypes

    engine: Any = llama  # the model, context and exit stack are llama-cpp-python internals (0.3.x)
    if not path.is_file():
        raise RuntimeBackendError(
            f"cannot load the LoRA adapter of '{model_id}': expected a GGUF adapter file at {path}, found none; "
            "stage the adapter version again"
        )
    adapter = llama_cpp.llama_adapter_lora_init(engine._model.model, str(path).encode("utf-8"))
    if not adapter:
        raise RuntimeBackendError(
            f"llama.cpp refused the LoRA adapter {path} for model '{model_id}': expected a GGUF LoRA adapter "
            "(general.type=adapter, adapter.type=lora) made for this base model's architecture and tensor shapes; "
            "export the adapter again for this base (slmops.optimize.gguf_lora) or choose the base it was trained on"
        )
    engine._stack.callback(llama_cpp.llama_adapter_lora_free, adapter)
    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
    scales = (ctypes.c_float * 1)(scale)
    if llama_cpp.llama_set_adapters_lora(engine._ctx.ctx, adapters, 1, scales):
        raise RuntimeBackendError(
            f"llama.cpp loaded the LoRA adapter {path} but could not apply it to model '{model_id}'; "
            "check that the adapter was exported for this base model"
        )


class LlamaCppBackend:
    """A GGUF model run by llama.cpp (llama-cpp-python), on the CPU.

    ``count_tokens(prompt)`` is the number of tokens the prompt occupies in the context, beginning-of-sequence
    token included. Special-token text in the prompt (``<start_of_turn>``) is parsed as special tokens, as chat
    templates need; a prompt that already starts with the model's BOS text (a chat template's ``bos_token``) is
    tokenized without the BOS llama.cpp would add, so it is not doubled.
    ``max_tokens`` is cut to what fits in the context window (then ``finish_reason`` is "length"); a prompt that
    does not fit at all raises :class:`RuntimeBackendError`.
    A fraction ``config.prompt_nll_sample_rate`` of the streams (chosen by a RNG seeded with ``config.seed``)
    carries the prompt's NLL (:func:`prompt_nll`).
    """

    def __init__(self, llama: llama_cpp.Llama, model_id: str, config: BackendConfig) -> None:
        self._llama = llama
        self.model_id = model_id
        self.config = config
        self._closed = False
        self._nll_rng = random.Random(config.seed)

    @classmethod
    def load(cls, model_path: Path, model_id: str, config: BackendConfig) -> LlamaCppBackend:
        llama_cpp = _import_llama_cpp()
        if not model_path.is_file():
            raise RuntimeBackendError(
                f"cannot load model '{model_id}': expected a GGUF file at {model_path}, found none"
            )
        try:
            llama = llama_cpp.Llama(
                str(model_path),
                n_ctx=config.context_tokens,
                n_batch=config.batch_tokens,
                n_ubatch=config.batch_tokens,
                n_threads=config.threads,
                n_threads_batch=config.threads,
                seed=config.seed,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise RuntimeBackendError(
                f"llama.cpp could not load model '{model_id}' from {model_path} ({exc}); expected a complete GGUF "
                "model of an architecture llama.cpp supports: verify the file (slmops model verify) or re-import it"
            ) from exc
        if config.lora_path is not None:
            try:
                _attach_lora(llama_cpp, llama, model_id, config.lora_path, config.lora_scale)
            except BaseException:
                llama.close()
                raise
        return cls(llama, model_id, config)

    @property
    def context_tokens(self) -> int:
        return int(self._llama.n_ctx())

    def _require_open(self) -> llama_cpp.Llama:
        if self._closed:
            raise RuntimeBackendError(f"model '{self.model_id}' was unloaded; retry the request")
        return self._llama

    def _tokens(self, text: str) -> list[int]:
        llama = self._require_open()
        bos = llama.token_bos()
        bos_text = llama.detokenize([bos], special=True).decode("utf-8", "replace") if bos >= 0 else ""
        has_bos = bool(bos_text) and text.startswith(bos_text)
        tokens: list[int] = llama.tokenize(text.encode("utf-8"), add_bos=not has_bos, special=True)
        return tokens

    def count_tokens(self, text: str) -> int:
        return len(self._tokens(text))

    def stream(self, prompt: str, **sampling: Unpack[Sampling]) -> TextStream:
        llama = self._require_open()
        max_tokens = sampling["max_tokens"]
        seed = sampling.get("seed")
        tokens = self._tokens(prompt)
        room = self.context_tokens - len(tokens)
        if room <= 0:
            raise RuntimeBackendError(
                f"the prompt has {len(tokens)} tokens; model '{self.model_id}' has a context of "
                f"{self.context_tokens} tokens: shorten the prompt"
            )
        if max_tokens < 1:
            raise RuntimeBackendError(f"max_tokens must be at least 1, got {max_tokens}")
        n_prompt = len(tokens)
        limit = min(max_tokens, room)
        sampled = [0]
        capped = [False]

        def count(input_ids: Any, _logits: Any) -> bool:
            # Called before each sampled token is yielded, with the tokens evaluated so far (prompt included, the
            # new token not yet), and once more at the end. llama-cpp-python lets a stream run past max_tokens while
            # a UTF-8 character is incomplete; stopping here makes max_tokens a hard bound.
            number = len(input_ids) - n_prompt + 1
            if number > limit:
                capped[0] = True
                return True
            sampled[0] = max(sampled[0], number)
            return False

        import llama_cpp

        nll: float | None = None
        rate = self.config.prompt_nll_sample_rate
        if rate > 0 and (rate >= 1 or self._nll_rng.random() < rate):
            nll = prompt_nll(llama, tokens, self.config.prompt_nll_max_tokens)

        chunks: Iterator[Any] = llama.create_completion(
            tokens,
            max_tokens=limit,
            temperature=sampling["temperature"],
            top_p=sampling["top_p"],
            stop=[s for s in sampling["stop"] if s],
            stream=True,
            seed=self.config.seed if seed is None else seed,
            stopping_criteria=llama_cpp.StoppingCriteriaList([count]),
        )  # type: ignore[assignment]

        def pieces() -> Iterator[str]:
            try:
                for chunk in chunks:
                    choice = chunk["choices"][0]
                    result.completion_tokens = sampled[0]
                    if choice.get("finish_reason"):
                        reason = str(choice["finish_reason"])
                        result.finish_reason = reason if reason in ("stop", "length") else "stop"
                    if choice["text"]:
                        yield str(choice["text"])
                result.completion_tokens = sampled[0]
                if capped[0]:
                    result.finish_reason = "length"
                elif result.finish_reason is None:
                    result.finish_reason = "stop"
            except (ValueError, RuntimeError) as exc:
                raise RuntimeBackendError(f"llama.cpp failed while generating with '{self.model_id}': {exc}") from exc
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()

        result = TextStream(pieces(), prompt_tokens=len(tokens), prompt_nll=nll)
        return result

    def complete(self, prompt: str, **sampling: Unpack[Sampling]) -> Completion:
        with self.stream(prompt, **sampling) as pieces:
            text = "".join(pieces)
            return Completion(
                text=text,
                prompt_tokens=pieces.prompt_tokens,
                completion_tokens=pieces.completion_tokens,
                finish_reason=pieces.finish_reason or "stop",
            )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._llama.close()
