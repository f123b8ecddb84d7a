"""The ONNX Runtime GenAI backend: an ONNX GenAI model directory run by ``onnxruntime-genai`` on the CPU.

The second runtime behind :class:`~slmops.runtime.backend.Backend` (the first is llama.cpp for GGUF). A model is a
directory (see :mod:`slmops.registry.formats.onnx_genai`) made by the ``export_onnx_genai`` pass; its tokenizer is
the runtime's own (``tokenizer.json``), so ``count_tokens`` and generation use the ids the model was exported with.

What it does like :class:`~slmops.runtime.backend.LlamaCppBackend`:

- ``count_tokens(prompt)`` counts the beginning-of-sequence token; special-token text (``<start_of_turn>``) is
  parsed as special tokens, and a prompt that already starts with the BOS text is not given a second one;
- ``max_tokens`` is cut to what fits in the context (then ``finish_reason`` is "length"); a prompt that does not
  fit raises :class:`~slmops.errors.RuntimeBackendError`; an end-of-sequence token ends the generation with
  "stop" and counts as a completion token; ``stop`` strings end it too and are not returned;
- temperature 0 is greedy; otherwise top-k 40 (llama-cpp-python's default), ``top_p`` and the request's seed;
- a fraction ``config.prompt_nll_sample_rate`` of the streams carries the prompt's NLL (the mean negative
  log-likelihood, nats per token, of its first ``prompt_nll_max_tokens`` tokens after the first), computed from the
  logits of a separate short prefill.

What it does not: LoRA adapters (``config.lora_path`` is refused), prefix reuse across requests
(``config.prefix_cache_bytes`` is ignored: every request prefills its whole prompt), and ``batch_tokens`` is the
prefill chunk (the model returns logits for every prompt position, ``chunk x vocabulary`` floats, so prompts are
appended in chunks to bound that memory).

``onnxruntime_genai`` is imported inside :meth:`OnnxGenAIBackend.load`; without it a
:class:`~slmops.errors.MissingExtraError` names the ``onnx`` extra.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Unpack

from slmops.errors import MissingExtraError, RuntimeBackendError
from slmops.runtime.backend import BackendConfig, Completion, Sampling, TextStream, completion_of

__all__ = ["DEFAULT_TOP_K", "OnnxGenAIBackend", "import_onnxruntime_genai", "split_stop"]

DEFAULT_TOP_K = 40  # llama-cpp-python's create_completion default, so both runtimes sample alike
PREFILL_CHUNK_MAX = 128


def import_onnxruntime_genai(purpose: str) -> Any:
    try:
        import onnxruntime_genai  # type: ignore[import-untyped]
    except ImportError as exc:
        raise MissingExtraError("onnx", purpose, "onnxruntime-genai") from exc
    return onnxruntime_genai


def split_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """(text safe to emit, text held back, whether a stop string was found) for generated ``text``.

    Text up to the first stop string is emitted and the generation ends; otherwise the longest suffix that could be
    the beginning of a stop string is held back until more text decides it.
    """
    first = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if first >= 0:
        return text[:first], "", True
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold], text[len(text) - hold :], False


def _log_softmax_at(logits: Any, targets: Sequence[int]) -> Any:
    import numpy as np

    rows = np.asarray(logits, dtype=np.float64)  # (positions, vocab)
    peak = rows.max(axis=1, keepdims=True)
    log_norm = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))  # (positions,)
    return rows[np.arange(len(targets)), list(targets)] - log_norm


class OnnxGenAIBackend:
    """An ONNX GenAI model on the CPU; see the module docstring for what it shares with the llama.cpp backend."""

    def __init__(
        self,
        og: Any,
        model: Any,
        tokenizer: Any,
        model_id: str,
        config: BackendConfig,
        *,
        context_length: int,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
    ) -> None:
        self._og = og
        self._model = model
        self._tokenizer = tokenizer
        self.model_id = model_id
        self.config = config
        self._closed = False
        self._nll_rng = random.Random(config.seed)
        self._context = min(config.context_tokens, context_length)
        self._eos = frozenset(eos_token_ids)
        self._bos = bos_token_id

    @classmethod
    def load(cls, model_dir: Path, model_id: str, config: BackendConfig) -> OnnxGenAIBackend:
        """Load the ONNX GenAI model directory ``model_dir`` (validated first, see
        :func:`~slmops.registry.formats.onnx_genai.read_onnx_genai`)."""
        from slmops.registry.formats.onnx_genai import GENAI_CONFIG_FILE, read_onnx_genai

        if config.lora_path is not None:
            raise RuntimeBackendError(
                f"cannot load model '{model_id}' with a LoRA adapter: the ONNX Runtime GenAI backend serves base "
                "models only; ship adapter versions over a GGUF base (llama.cpp)"
            )
        if not (Path(model_dir) / GENAI_CONFIG_FILE).is_file():
            raise RuntimeBackendError(
                f"cannot load model '{model_id}': expected an ONNX GenAI model directory with {GENAI_CONFIG_FILE} at "
                f"{model_dir}, found none"
            )
        og = import_onnxruntime_genai("running ONNX GenAI models")
        info = read_onnx_genai(Path(model_dir))
        sliding = _sliding_window(Path(model_dir) / GENAI_CONFIG_FILE)
        if sliding and config.context_tokens < sliding:
            raise RuntimeBackendError(
                f"model '{model_id}' attends over a sliding window of {sliding} tokens; ONNX Runtime GenAI needs a "
                f"context of at least that (configured: {config.context_tokens}); raise context_tokens"
            )
        try:
            og_config = og.Config(str(model_dir))
            if config.threads is not None:
                overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": config.threads}}}}
                og_config.overlay(json.dumps(overlay))
            model = og.Model(og_config)
            tokenizer = og.Tokenizer(model)
        except RuntimeError as exc:
            raise RuntimeBackendError(
                f"ONNX Runtime GenAI could not load model '{model_id}' from {model_dir} ({exc}); expected a complete "
                "model directory made by the export_onnx_genai pass: verify it (slmops model verify) or re-export"
            ) from exc
        return cls(
            og,
            model,
            tokenizer,
            model_id,
            config,
            context_length=info.context_length,
            bos_token_id=info.bos_token_id,
            eos_token_ids=info.eos_token_ids,
        )

    @property
    def context_tokens(self) -> int:
        return self._context

    def _require_open(self) -> Any:
        if self._closed:
            raise RuntimeBackendError(f"model '{self.model_id}' was unloaded; retry the request")
        return self._model

    def _tokens(self, text: str) -> list[int]:
        self._require_open()
        tokens = [int(t) for t in self._tokenizer.encode(text)]
        if self._bos is None:
            return tokens
        if tokens[:2] == [self._bos, self._bos]:
            return tokens[1:]  # the prompt's own BOS text (a chat template's bos_token), not a second one
        return tokens if tokens[:1] == [self._bos] else [self._bos, *tokens]

    def count_tokens(self, text: str) -> int:
        return len(self._tokens(text))

    def _generator(self, search: dict[str, Any]) -> Any:
        params = self._og.GeneratorParams(self._model)
        # The KV cache is allocated for max_length; a sliding-window model needs at least its window.
        params.set_search_options(max_length=self._context, **search)
        return self._og.Generator(self._model, params)

    def _append(self, generator: Any, tokens: Sequence[int]) -> None:
        chunk = max(1, min(self.config.batch_tokens, PREFILL_CHUNK_MAX))
        for start in range(0, len(tokens), chunk):
            generator.append_tokens(list(tokens[start : start + chunk]))

    def prompt_nll(self, tokens: Sequence[int], max_tokens: int) -> float | None:
        """Mean NLL (nats per token) of ``tokens[1 : max_tokens + 1]``, each predicted from those before it; None
        for a prompt of one token."""
        scored = list(tokens[: max_tokens + 1])
        if len(scored) < 2:
            return None
        generator = self._generator({"do_sample": False})
        try:
            generator.append_tokens(scored)
            logits = generator.get_output("logits")[0]  # (positions, vocab)
        finally:
            del generator
        logp = _log_softmax_at(logits[: len(scored) - 1], scored[1:])
        value = -float(logp.mean())
        return value if math.isfinite(value) else None

    def stream(self, prompt: str, **sampling: Unpack[Sampling]) -> TextStream:
        self._require_open()
        max_tokens = sampling["max_tokens"]
        tokens = self._tokens(prompt)
        room = self._context - len(tokens)
        if room <= 0:
            raise RuntimeBackendError(
                f"the prompt has {len(tokens)} tokens; model '{self.model_id}' has a context of {self._context} "
                "tokens: shorten the prompt"
            )
        if max_tokens < 1:
            raise RuntimeBackendError(f"max_tokens must be at least 1, got {max_tokens}")
        limit = min(max_tokens, room)
        temperature = float(sampling["temperature"])
        seed = sampling.get("seed")
        seed = self.config.seed if seed is None else seed
        search: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            search = {
                "do_sample": True,
                "temperature": temperature,
                "top_p": float(sampling["top_p"]),
                "top_k": DEFAULT_TOP_K,
                "random_seed": int(seed) % (1 << 31),
            }
        stops = [s for s in sampling["stop"] if s]
        nll: float | None = None
        rate = self.config.prompt_nll_sample_rate
        if rate > 0 and (rate >= 1 or self._nll_rng.random() < rate):
            try:
                nll = self.prompt_nll(tokens, self.config.prompt_nll_max_tokens)
            except RuntimeError as exc:
                raise RuntimeBackendError(
                    f"ONNX Runtime GenAI failed scoring a prompt of '{self.model_id}': {exc}"
                ) from exc
        try:
            generator = self._generator(search)
            self._append(generator, tokens)
        except RuntimeError as exc:
            raise RuntimeBackendError(
                f"ONNX Runtime GenAI failed reading the prompt of '{self.model_id}': {exc}"
            ) from exc

        def pieces() -> Iterator[str]:
            nonlocal generator
            decoder = self._tokenizer.create_stream()
            held = ""
            try:
                while result.completion_tokens < limit:
                    if result.completion_tokens > 0:
                        generator.generate_next_token()
                    token = int(generator.get_next_tokens()[0])
                    result.completion_tokens += 1
                    if token in self._eos:
                        result.finish_reason = "stop"
                        break
                    emit, held, stopped = split_stop(held + decoder.decode(token), stops)
                    if emit:
                        yield emit
                    if stopped:
                        result.finish_reason = "stop"
                        return
                    if generator.is_done():
                        result.finish_reason = "length" if result.completion_tokens >= limit else "stop"
                        break
                else:
                    result.finish_reason = "length"
                if held:
                    yield held
            except RuntimeError as exc:
                raise RuntimeBackendError(
                    f"ONNX Runtime GenAI failed while generating with '{self.model_id}': {exc}"
                ) from exc
            finally:
                generator = None  # frees the KV cache now, not when the stream object goes

        # The first token comes from the prompt's last logits: generate it before the loop reads it.
        try:
            generator.generate_next_token()
        except RuntimeError as exc:
            raise RuntimeBackendError(
                f"ONNX Runtime GenAI failed while generating with '{self.model_id}': {exc}"
            ) from exc
        result = TextStream(pieces(), prompt_tokens=len(tokens), prompt_nll=nll)
        return result

    def complete(self, prompt: str, **sampling: Unpack[Sampling]) -> Completion:
        return completion_of(self.stream(prompt, **sampling))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._tokenizer = None
            self._model = None


def _sliding_window(config_path: Path) -> int:
    from slmops.registry.formats.hf import read_json_file

    decoder = read_json_file(config_path).get("model", {}).get("decoder", {})
    window = decoder.get("sliding_window") if isinstance(decoder, dict) else None
    size = window.get("window_size") if isinstance(window, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0
