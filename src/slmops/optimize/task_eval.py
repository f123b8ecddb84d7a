"""Held-out task scoring of a GGUF model, alone or with a GGUF LoRA adapter: what the improve gates compare.

Each line of a held-out chat JSONL (the ``lora`` pass's format) is rendered with the model's own chat template the way
the runtime renders a chat request (BOS not doubled, special-token text parsed), then:

- **generation**: greedy decoding in llama.cpp up to ``max_new_tokens`` or an end-of-generation token; the output is
  compared with the expected completion by **exact match** after :func:`normalize` (Unicode NFKC, case folded,
  whitespace collapsed, outer whitespace and a final full stop dropped), and, when the caller gives a regular
  expression, by a **format** check (``re.fullmatch`` on the stripped output);
- **likelihood**: the mean negative log-likelihood (nats per token) of the expected completion after the prompt, the
  completion being the tokens the template puts after the generation prompt (for gemma3 the text and
  ``<end_of_turn>``), as the ``lora`` pass trains on. Cheaper and smoother than exact match, so a gate can see small
  gains.

The adapter is attached with llama.cpp's adapter API and its load is checked: llama-cpp-python 0.3.36's
``Llama(lora_path=...)`` compares the returned pointer with ``None`` and so goes on without an adapter that failed
to load (a wrong base, for example).
"""

from __future__ import annotations

import ctypes
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops.errors import RuntimeBackendError
from slmops.optimize._llama import LlamaSession, attach_lora, log_softmax_at
from slmops.optimize.lora import ChatExample, ChatFormat, read_chat_jsonl, split_prompt

__all__ = ["ItemResult", "TaskScore", "attach_lora", "normalize", "score_examples", "score_task"]

Progress = Callable[[float, float], None]
_BATCH = 64


@dataclass(frozen=True)
class ItemResult:
    output: str
    expected: str
    exact: bool
    format_ok: bool | None
    nll: float  # summed nats over the expected completion's tokens
    n_tokens: int


@dataclass(frozen=True)
class TaskScore:
    """Scores over a held-out set: higher exact match and format score are better, lower mean NLL is better."""

    n_items: int
    exact_match: float
    format_score: float | None
    mean_nll: float  # nats per expected-completion token
    completion_tokens: int
    adapter: bool
    items: tuple[ItemResult, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "items": self.n_items,
            "exact_match": self.exact_match,
            "format_score": self.format_score,
            "mean_nll": self.mean_nll,
            "completion_tokens": self.completion_tokens,
            "adapter": self.adapter,
        }


_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The form in which outputs are compared: NFKC, case folded, whitespace collapsed, a final full stop dropped."""
    value = _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return value[:-1].rstrip() if value.endswith(".") else value


class _Scorer:
    def __init__(self, session: LlamaSession) -> None:
        self.s = session
        self.lib = session._lib
        self.vocab = session._vocab

    def piece(self, token: int, *, special: bool) -> bytes:
        buffer = ctypes.create_string_buffer(256)
        n = self.lib.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, special)
        return buffer.raw[: max(n, 0)]

    def chat_format(self, template: str | None) -> ChatFormat:
        if template is None:
            buffer = ctypes.create_string_buffer(1 << 17)
            n = self.lib.llama_model_meta_val_str(self.s._model, b"tokenizer.chat_template", buffer, len(buffer))
            template = buffer.value.decode("utf-8") if n > 0 else None
        bos = self.piece(self.s.bos, special=True).decode("utf-8", "replace") if self.s.bos is not None else ""
        eos_id = int(self.lib.llama_vocab_eos(self.vocab))
        eos = self.piece(eos_id, special=True).decode("utf-8", "replace") if eos_id >= 0 else ""
        return ChatFormat(template, bos, eos)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        buffer = (self.lib.llama_token * capacity)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, capacity, False, True)
        if n < 0:
            capacity = -n
            buffer = (self.lib.llama_token * capacity)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buffer, capacity, False, True)
        return list(buffer[:n])

    def prompt_tokens(self, fmt: ChatFormat, prompt: str) -> list[int]:
        ids = self.tokenize(prompt)
        if self.s.add_bos and self.s.bos is not None and not (fmt.bos_token and prompt.startswith(fmt.bos_token)):
            ids.insert(0, self.s.bos)
        return ids

    def nll(self, prompt: Sequence[int], target: Sequence[int]) -> float:
        """Summed -log p(target | prompt)."""
        tokens = [*prompt, *target]
        self.s.clear()
        total = 0.0
        for start in range(0, len(tokens), _BATCH):
            part = tokens[start : start + _BATCH]
            want = [len(prompt) - 1 <= start + i < len(tokens) - 1 for i in range(len(part))]
            logits = self.s.decode(part, start, want)
            if logits is None:
                continue
            targets = [tokens[start + i + 1] for i, w in enumerate(want) if w]
            total -= float(log_softmax_at(logits, targets).sum())
        return total

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> str:
        self.s.clear()
        last: Any = None
        for start in range(0, len(prompt), _BATCH):
            part = list(prompt[start : start + _BATCH])
            is_last = start + _BATCH >= len(prompt)
            last = self.s.decode(part, start, [False] * (len(part) - 1) + [is_last])
        out: list[int] = []
        position = len(prompt)
        while len(out) < max_new_tokens and position < self.s.n_ctx:
            token = int(last[-1].argmax())
            if self.lib.llama_vocab_is_eog(self.vocab, token):
                break
            out.append(token)
            last = self.s.decode([token], position, [True])
            position += 1
        return b"".join(self.piece(t, special=False) for t in out).decode("utf-8", "replace")


def score_examples(
    model_path: Path,
    examples: Sequence[ChatExample],
    *,
    lora_path: Path | None = None,
    lora_scale: float = 1.0,
    chat_template: str | None = None,
    format_regex: str | None = None,
    max_new_tokens: int = 64,
    context_tokens: int = 1024,
    threads: int = 2,
    keep_items: bool = False,
    progress: Progress | None = None,
) -> TaskScore:
    """Score ``examples`` on the GGUF ``model_path`` (with the GGUF LoRA ``lora_path`` applied when given), rendered
    with ``chat_template`` (the manifest's template the runtime uses) or else the GGUF's own."""
    if not examples:
        raise RuntimeBackendError("no held-out examples to score")
    pattern = re.compile(format_regex, re.DOTALL) if format_regex is not None else None
    results: list[ItemResult] = []
    session = LlamaSession(
        model_path,
        n_ctx=context_tokens,
        n_threads=threads,
        max_outputs=_BATCH,
        lora_path=Path(lora_path) if lora_path is not None else None,
        lora_scale=lora_scale,
    )
    with session:
        scorer = _Scorer(session)
        fmt = scorer.chat_format(chat_template)
        for index, example in enumerate(examples):
            prompt_text, target_text = split_prompt(fmt, example)
            prompt = scorer.prompt_tokens(fmt, prompt_text)
            target = scorer.tokenize(target_text)
            if len(prompt) + max(len(target), 1) > context_tokens:
                raise RuntimeBackendError(
                    f"held-out item {index + 1} needs {len(prompt) + len(target)} tokens, more than the "
                    f"{context_tokens}-token context; raise context_tokens or shorten the item"
                )
            nll = scorer.nll(prompt, target) if target else 0.0
            output = scorer.greedy(prompt, min(max_new_tokens, context_tokens - len(prompt)))
            results.append(
                ItemResult(
                    output=output,
                    expected=example.completion,
                    exact=normalize(output) == normalize(example.completion),
                    format_ok=None if pattern is None else pattern.fullmatch(output.strip()) is not None,
                    nll=nll,
                    n_tokens=len(target),
                )
            )
            if progress is not None:
                progress(index + 1, len(examples))
    n_tokens = sum(r.n_tokens for r in results)
    mean_nll = sum(r.nll for r in results) / n_tokens if n_tokens else math.nan
    return TaskScore(
        n_items=len(results),
        exact_match=sum(r.exact for r in results) / len(results),
        format_score=None if pattern is None else sum(bool(r.format_ok) for r in results) / len(results),
        mean_nll=mean_nll,
        completion_tokens=n_tokens,
        adapter=lora_path is not None,
        items=tuple(results) if keep_items else (),
    )


def score_task(
    model_path: Path,
    heldout: Path,
    *,
    dataset_sha256: str | None = None,
    max_items: int | None = None,
    lora_path: Path | None = None,
    lora_scale: float = 1.0,
    chat_template: str | None = None,
    format_regex: str | None = None,
    max_new_tokens: int = 64,
    context_tokens: int = 1024,
    threads: int = 2,
    keep_items: bool = False,
    progress: Progress | None = None,
) -> TaskScore:
    """Score the held-out JSONL ``heldout`` (checked against ``dataset_sha256`` when given; the first ``max_items``
    lines) on ``model_path``, optionally with the adapter ``lora_path``; see :func:`score_examples`."""
    examples = read_chat_jsonl(Path(heldout), dataset_sha256)
    if max_items is not None:
        examples = examples[:max_items]
    return score_examples(
        model_path,
        examples,
        lora_path=lora_path,
        lora_scale=lora_scale,
        chat_template=chat_template,
        format_regex=format_regex,
        max_new_tokens=max_new_tokens,
        context_tokens=context_tokens,
        threads=threads,
        keep_items=keep_items,
        progress=progress,
    )
