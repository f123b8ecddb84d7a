"""Inference backends: one small interface in front of an inference engine, and its llama.cpp implementation.

A backend is not thread-safe: :class:`slmops.runtime.host.ModelHost` serializes calls to each backend it holds.
Prompts and generated text stay in memory; nothing here logs them.

Prefix reuse. Requests of a fleet app share a system prompt (a site may set its own), so their prompts begin with
the same few hundred tokens. llama-cpp-python's ``Llama`` reuses the longest prefix a prompt shares with the
previous evaluation in its context, which helps only while requests with one system prompt follow each other:
requests of two apps or sites interleaved, or a prompt scored for drift (:func:`prompt_nll` resets the context),
evaluate the whole prompt again. Its own ``LlamaRAMCache`` saves the full state (KV cache and the logits array,
``n_batch x n_vocab`` floats: 512 MiB for Gemma 3's vocabulary) after every completion, which costs seconds.
So :class:`LlamaCppBackend` keeps a :class:`PrefixCache`: the llama.cpp sequence state (KV cells only, about
18 KB a token on gemma3-270m) saved at the point where a prompt stops repeating a recent prompt, restored when a
later prompt shares more with a saved state than with the live context, least recently used out past
``BackendConfig.prefix_cache_bytes``.
"""

from __future__ import annotations

import math
import os
import random
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Required, TypedDict, Unpack, runtime_checkable

from slmops.errors import MissingExtraError, RuntimeBackendError

if TYPE_CHECKING:
    import llama_cpp

__all__ = [
    "Backend",
    "BackendConfig",
    "Completion",
    "LlamaCppBackend",
    "PrefixCache",
    "PrefixCacheStats",
    "Sampling",
    "TextStream",
    "common_prefix_length",
    "completion_of",
    "prompt_nll",
]


def _import_llama_cpp() -> Any:
    """Import llama_cpp, with the OpenMP wait policy that was chosen for this process, or a fallback.

    ``OMP_WAIT_POLICY`` only counts before the OpenMP runtime loads, i.e. before the first ``import llama_cpp`` in
    the process. Whoever knows better sets it first: the user's environment, or the measured tuning of the model
    about to be served (:func:`slmops.runtime.tuning.apply_wait_policy`, called by ``slmops serve --threads auto``
    and the agent before they load a model; the measurements themselves run in child processes started with each
    policy). Only when nothing set it does this fall back to ``passive``: sleeping threads cannot collapse a
    device whose cores are busy with other work (gemma3-270m on 2 spinning threads of a loaded 2-core VM decoded
    31 tokens in 30 s), though on an idle device 2 passive threads decode at half the speed of 2 spinning ones,
    which is why the choice is measured where it can be. A measured ``bounded`` (the OpenMP runtime's own default:
    spin a few milliseconds, then sleep) leaves ``OMP_WAIT_POLICY`` unset on purpose and is not overridden.
    """
    import sys

    bounded = os.environ.get("SLMOPS_SET_OMP_WAIT_POLICY") == "bounded"  # measured best: the OpenMP default
    if "llama_cpp" not in sys.modules and not os.environ.get("OMP_WAIT_POLICY") and not bounded:
        os.environ["OMP_WAIT_POLICY"] = "passive"  # the fallback when no measurement or user chose (see above)
        os.environ["SLMOPS_SET_OMP_WAIT_POLICY"] = "passive"  # not the user's choice (slmops.runtime.tuning)
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

    ``prefix_cache_bytes`` bounds the saved states of shared prompt prefixes (see the module docstring); 0 turns
    prefix reuse beyond llama.cpp's own off. The default holds about 3,600 tokens of gemma3-270m's KV cache, a
    dozen system prompts of 300 tokens.
    """

    context_tokens: int = 2048
    threads: int | None = None
    seed: int = 0
    batch_tokens: int = 512
    prompt_nll_sample_rate: float = 0.05
    prompt_nll_max_tokens: int = 32
    lora_path: Path | None = None  # a GGUF LoRA adapter loaded over the model (see slmops.core.adapters)
    lora_scale: float = 1.0
    prefix_cache_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        if isinstance(self.lora_path, str):  # from JSON (the probe's child process)
            object.__setattr__(self, "lora_path", Path(self.lora_path))
        if not 0.0 <= self.prompt_nll_sample_rate <= 1.0:
            raise ValueError(f"prompt_nll_sample_rate must be in [0, 1] (0 = off); got {self.prompt_nll_sample_rate}")
        if self.prompt_nll_max_tokens < 1:
            raise ValueError(f"prompt_nll_max_tokens must be at least 1; got {self.prompt_nll_max_tokens}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be at least 0 (0 = off); got {self.prefix_cache_bytes}")


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


PREFIX_CACHE_MIN_TOKENS = 16  # shorter shared prefixes are cheaper to evaluate again than to save and restore
_RECENT_PROMPTS = 16  # prompts remembered (token ids only) to notice a prefix that repeats
_MAX_REPLAY_TOKENS = 64  # live tokens past a prefix boundary worth re-evaluating to save the state at that boundary


PREFIX_ALIGN_TOKENS = NLL_CHUNK_TOKENS  # prompts are split only at multiples of this (LlamaCppBackend._reuse_prefix)


def _aligned(n: int) -> int:
    return n - n % PREFIX_ALIGN_TOKENS


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    import numpy as np

    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(differ[0]) if len(differ) else n


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters of a :class:`PrefixCache` since it was made, and what it holds now.

    A request is a ``hit`` when a saved state was restored for it, ``live`` when the prefix it shares with earlier
    prompts was still in the context from the request before (llama.cpp reuses that by itself), and a ``miss`` when
    it shares a prefix of at least ``min_tokens`` with no saved state nor the context (its first or second sight).
    ``reused_tokens`` counts the prompt tokens restored instead of evaluated.
    """

    hits: int
    live: int
    misses: int
    stores: int
    evictions: int
    reused_tokens: int
    entries: int
    bytes: int
    capacity_bytes: int


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    state: bytearray

    @property
    def size_bytes(self) -> int:
        return len(self.state) + 4 * len(self.tokens)


class PrefixCache:
    """Evaluated model states of prompt prefixes, least recently used first out, bounded by ``capacity_bytes``.

    An entry is the llama.cpp sequence state (its KV cache cells) after exactly ``tokens`` were evaluated, under a
    ``namespace`` naming everything besides the tokens that shaped that state (the LoRA adapter and its scale).
    :meth:`lookup` finds, within a namespace, the entry sharing the longest prefix with a prompt: an entry is usable
    for any prefix of its tokens, since the KV cells past the shared part can be dropped after restoring. The cache
    also remembers the token ids of the last prompts, so :meth:`shared_prefix` can tell where a prompt stops
    repeating earlier ones (a system prompt and its chat template frame): that is where a state is worth saving.
    Pure bookkeeping: the backend saves and restores the states.
    """

    def __init__(self, capacity_bytes: int, *, min_tokens: int = PREFIX_CACHE_MIN_TOKENS) -> None:
        self.capacity_bytes = capacity_bytes
        self.min_tokens = min_tokens
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], _Entry] = OrderedDict()
        self._recent: deque[tuple[str, tuple[int, ...]]] = deque(maxlen=_RECENT_PROMPTS)
        self._bytes = 0
        self.hits = self.live = self.misses = self.stores = self.evictions = self.reused_tokens = 0

    def lookup(self, namespace: str, tokens: Sequence[int]) -> tuple[tuple[int, ...], bytearray, int] | None:
        """The (tokens, state, shared length) of the entry sharing the longest prefix (at least ``min_tokens``)
        with ``tokens`` in ``namespace``, marked most recently used; None when there is none."""
        best: tuple[tuple[str, tuple[int, ...]], int] | None = None
        for key, entry in self._entries.items():
            if key[0] != namespace:
                continue
            shared = common_prefix_length(entry.tokens, tokens)
            if shared >= self.min_tokens and (best is None or shared > best[1]):
                best = (key, shared)
        if best is None:
            return None
        self._entries.move_to_end(best[0])
        entry = self._entries[best[0]]
        return entry.tokens, entry.state, best[1]

    def shared_prefix(self, namespace: str, tokens: Sequence[int]) -> int:
        """The longest prefix ``tokens`` share with one of the recent prompts of ``namespace``, then remember them."""
        key = (namespace, tuple(tokens))
        shared = max(
            (common_prefix_length(seen, key[1]) for space, seen in self._recent if space == namespace), default=0
        )
        self._recent.append(key)
        return shared

    def put(self, namespace: str, tokens: Sequence[int], state: bytearray) -> bool:
        """Keep ``state`` for ``tokens``, evicting the least recently used entries until it fits; False (nothing
        kept) when it alone is larger than the capacity."""
        key = (namespace, tuple(tokens))
        entry = _Entry(key[1], state)
        if entry.size_bytes > self.capacity_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.size_bytes
        while self._entries and self._bytes + entry.size_bytes > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.size_bytes
            self.evictions += 1
        self._entries[key] = entry
        self._bytes += entry.size_bytes
        self.stores += 1
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._recent.clear()
        self._bytes = 0

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            hits=self.hits,
            live=self.live,
            misses=self.misses,
            stores=self.stores,
            evictions=self.evictions,
            reused_tokens=self.reused_tokens,
            entries=len(self._entries),
            bytes=self._bytes,
            capacity_bytes=self.capacity_bytes,
        )


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


def completion_of(stream: TextStream) -> Completion:
    """Read a whole :class:`TextStream` into a :class:`Completion` (a backend's ``complete`` over its ``stream``)."""
    with stream as pieces:
        text = "".join(pieces)
        return Completion(
            text=text,
            prompt_tokens=pieces.prompt_tokens,
            completion_tokens=pieces.completion_tokens,
            finish_reason=pieces.finish_reason or "stop",
        )


_END = object()


class _OnThread(Iterator[str]):
    """A generator whose every step (and its close) runs through ``on_thread``: the model's own thread."""

    def __init__(self, pieces: Iterator[str], on_thread: Callable[..., Any]) -> None:
        self._pieces = pieces
        self._on_thread = on_thread

    def __next__(self) -> str:
        piece = self._on_thread(next, self._pieces, _END)
        if piece is _END:
            raise StopIteration
        return str(piece)

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            self._on_thread(close)


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
    Prompts sharing a prefix of at least ``PREFIX_CACHE_MIN_TOKENS`` with recent prompts reuse its saved state
    (:class:`PrefixCache`, bounded by ``config.prefix_cache_bytes``); :meth:`prefix_cache_stats` counts how often.

    All of the model's evaluation runs on one thread of its own, whichever thread calls: OpenMP (GNU's libgomp,
    which llama.cpp uses) keeps a team of worker threads per calling thread, and once more threads are managed than
    there are cores it stops spinning between parallel regions, so a model evaluated from a second thread (the
    agent's health probe, another request's worker) decoded at 62% of its speed with the default (bounded) wait
    policy here (38.2 -> 23.5 tokens/s on gemma3-270m, 2 threads); ``active`` hides it by spinning for minutes.
    """

    def __init__(self, llama: llama_cpp.Llama, model_id: str, config: BackendConfig) -> None:
        self._llama = llama
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slmops-llama")
        self._worker_thread: int | None = None
        self.model_id = model_id
        self.config = config
        self._closed = False
        self._nll_rng = random.Random(config.seed)
        self._prefix_cache = PrefixCache(config.prefix_cache_bytes) if config.prefix_cache_bytes > 0 else None
        # A state depends on the adapter that shaped it, not only on the tokens.
        self._cache_namespace = f"lora={config.lora_path}@{config.lora_scale}" if config.lora_path else "base"

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

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The prefix cache's counters and size; None when ``config.prefix_cache_bytes`` is 0."""
        return self._prefix_cache.stats() if self._prefix_cache is not None else None

    def _reuse_prefix(self, llama: llama_cpp.Llama, tokens: list[int]) -> None:
        """Before ``tokens`` are generated from: restore the saved state sharing the longest prefix with them if it
        shares more than the live context, save the state at the end of the prefix they share with a recent prompt
        if no saved state covers it yet, and leave in the context a prefix of ``tokens`` whose length is a multiple
        of ``PREFIX_ALIGN_TOKENS`` and shorter than all of them; ``Llama.generate`` evaluates the rest.

        The alignment is what keeps greedy output independent of where the prompt was split: llama.cpp's CPU matrix
        kernels for quantized weights take the rows of a batch in blocks of 4 and the rest one by one, with different
        rounding, so gemma3-270m Q4_K_M's logits after a 431-token prompt evaluated as 350 + 81 tokens differ from one
        batch by up to 0.9 (and a greedy answer changed after 9 tokens), while every split at a multiple of 4 gave
        the same logits, bit for bit. llama-cpp-python's own prefix reuse splits anywhere; so it is trimmed here too.
        """
        engine: Any = llama  # the context, its token ids and flags are llama-cpp-python internals (0.3.x)
        if getattr(engine, "_is_recurrent", False) or getattr(engine, "_is_hybrid", False):
            return  # a recurrent state cannot be cut back to a prefix: llama.cpp evaluates the whole prompt
        limit = len(tokens) - 1  # generate() always evaluates at least the last prompt token
        cache = self._prefix_cache
        try:
            if cache is not None:
                self._use_cache(engine, cache, tokens, limit)
            keep = _aligned(min(common_prefix_length(engine.input_ids[: engine.n_tokens], tokens), limit))
            if engine.n_tokens > keep:
                if not engine._ctx.kv_cache_seq_rm(-1, keep, -1):
                    engine._ctx.kv_cache_seq_rm(-1, 0, -1)
                    keep = 0
                engine.n_tokens = keep
        except (AttributeError, RuntimeError, ValueError, TypeError, BufferError):
            engine.n_tokens = 0  # nothing trusted in the context: the generation evaluates the whole prompt
        finally:
            engine._requires_eval = True

    def _use_cache(self, engine: Any, cache: PrefixCache, tokens: list[int], limit: int) -> None:
        namespace = self._cache_namespace
        live = _aligned(min(common_prefix_length(engine.input_ids[: engine.n_tokens], tokens), limit))
        boundary = _aligned(min(cache.shared_prefix(namespace, tokens), limit))
        found = cache.lookup(namespace, tokens)
        covered = _aligned(min(found[2], limit)) if found is not None else 0
        if found is not None and covered > live and self._restore(engine, found[0], found[1]):
            cache.hits += 1
            cache.reused_tokens += covered
            live = covered
        elif live >= cache.min_tokens:
            cache.live += 1
        else:
            cache.misses += 1
        if boundary >= cache.min_tokens and boundary > covered:
            self._save_prefix(engine, cache, tokens, boundary, live)

    def _restore(self, engine: Any, tokens: tuple[int, ...], state: bytearray) -> bool:
        import ctypes

        import llama_cpp

        engine._ctx.kv_cache_seq_rm(-1, 0, -1)
        engine.n_tokens = 0
        buffer = (ctypes.c_uint8 * len(state)).from_buffer(state)
        if llama_cpp.llama_state_seq_set_data(engine._ctx.ctx, buffer, len(state), 0) != len(state):
            engine._ctx.kv_cache_seq_rm(-1, 0, -1)
            return False
        engine.input_ids[: len(tokens)] = tokens
        engine.n_tokens = len(tokens)
        return True

    def _save_prefix(self, engine: Any, cache: PrefixCache, tokens: list[int], boundary: int, live: int) -> None:
        """Bring the context to exactly ``tokens[:boundary]`` (evaluating what is missing, or dropping a few live
        tokens past it) and save its state."""
        import ctypes

        import llama_cpp

        if live > boundary:
            if live - boundary > _MAX_REPLAY_TOKENS or not engine._ctx.kv_cache_seq_rm(-1, boundary, -1):
                return  # a longer live prefix (a conversation going on) is worth more than the saved state
            engine.n_tokens = boundary
        elif live < boundary:
            engine.n_tokens = live
            engine.eval(tokens[live:boundary])
        elif engine.n_tokens > boundary:  # drop the cells past the shared part (they differ from the prompt)
            if not engine._ctx.kv_cache_seq_rm(-1, boundary, -1):
                return
            engine.n_tokens = boundary
        size = int(llama_cpp.llama_state_seq_get_size(engine._ctx.ctx, 0))
        state = bytearray(size)
        buffer = (ctypes.c_uint8 * size).from_buffer(state)
        written = int(llama_cpp.llama_state_seq_get_data(engine._ctx.ctx, buffer, size, 0))
        del buffer  # release the export so the bytearray can shrink
        if 0 < written <= size:
            del state[written:]
            cache.put(self._cache_namespace, tokens[:boundary], state)

    def _on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the model's own thread (at once when already on it)."""
        if threading.get_ident() == self._worker_thread:
            return fn(*args)

        def run() -> Any:
            self._worker_thread = threading.get_ident()
            return fn(*args)

        try:
            future = self._worker.submit(run)
        except RuntimeError:  # the backend was closed (its thread is gone): a late close of a stream, say
            return fn(*args)
        return future.result()

    def stream(self, prompt: str, **sampling: Unpack[Sampling]) -> TextStream:
        result: TextStream = self._on_worker(self._stream_here, prompt, sampling)
        return result

    def _stream_here(self, prompt: str, sampling: Sampling) -> TextStream:
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
        self._reuse_prefix(llama, tokens)

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

        result = TextStream(_OnThread(pieces(), self._on_worker), prompt_tokens=len(tokens), prompt_nll=nll)
        return result

    def complete(self, prompt: str, **sampling: Unpack[Sampling]) -> Completion:
        return completion_of(self.stream(prompt, **sampling))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._prefix_cache is not None:
                self._prefix_cache.clear()
            self._on_worker(self._llama.close)
            self._worker.shutdown(wait=False)
