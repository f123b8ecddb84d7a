"""Evaluation of a variant: perplexity, task accuracy, size, and memory and speed per device profile.

GGUF variants run through llama.cpp; ONNX Runtime GenAI directories (the second runtime) through
:func:`evaluate_onnx_genai_dir`, with the same token ids, chunking and metric names (see the section at the end).

- Perplexity: the text is tokenized once (with the source model) and the same token ids are scored for every
  variant. They are cut into chunks of ``context_tokens``; each chunk starts from an empty cache (its first token
  replaced by BOS when the model adds one), and only the second half of each chunk is scored, so every scored token
  has at least half a context before it (llama.cpp's ``llama-perplexity`` does the same). Logits are requested for
  at most ``max_outputs`` positions per decode call and reduced to one log-probability each at once: memory is
  bounded by ``max_outputs × vocabulary`` floats, never by the text length.
- Accuracy: each multiple-choice item is scored by the summed log-likelihood of each option after the prompt (no
  sampling, no instruction following needed, so base models can be scored); the highest wins.
- Memory and speed: measured in a child process per distinct thread count (see :mod:`slmops.optimize._probe`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.core.candidates import profile_metric
from slmops.core.device_profiles import DeviceProfile
from slmops.errors import RuntimeBackendError
from slmops.optimize._data import TaskItem

__all__ = [
    "EvalTokens",
    "Measurement",
    "TaskTokens",
    "accuracy",
    "evaluate_onnx_genai_dir",
    "machine_label",
    "measure",
    "measure_onnx_genai",
    "onnx_genai_probe_main",
    "perplexity",
    "perplexity_onnx_genai",
    "profile_metrics",
    "tokenize_for_eval",
]

Progress = Callable[[float, float], None]


@dataclass(frozen=True)
class TaskTokens:
    prompt: tuple[int, ...]
    options: tuple[tuple[int, ...], ...]
    answer: int


@dataclass(frozen=True)
class EvalTokens:
    """Everything evaluation feeds a model, as token ids of the source model: identical for every variant."""

    text: tuple[int, ...]
    tasks: tuple[TaskTokens, ...] = ()


def tokenize_for_eval(model_path: Path, text: str, max_tokens: int, tasks: Sequence[TaskItem]) -> EvalTokens:
    from slmops.optimize._llama import LlamaSession

    with LlamaSession(model_path, vocab_only=True) as s:
        ids = tuple(s.tokenize(text)[:max_tokens])
        prefix = (s.bos,) if s.add_bos and s.bos is not None else ()
        task_tokens = tuple(
            TaskTokens(
                prompt=prefix + tuple(s.tokenize(t.prompt)),
                options=tuple(tuple(s.tokenize(o)) for o in t.options),
                answer=t.answer,
            )
            for t in tasks
        )
    return EvalTokens(ids, task_tokens)


def perplexity(
    model_path: Path,
    tokens: Sequence[int],
    *,
    context_tokens: int = 512,
    threads: int = 2,
    max_outputs: int = 64,
    progress: Progress | None = None,
    lora_path: Path | None = None,
) -> tuple[float, int]:
    """(perplexity, number of scored tokens) of ``tokens`` under the model (with a LoRA adapter over it, if given)."""
    from slmops.optimize._llama import LlamaSession, log_softmax_at

    n_chunks = len(tokens) // context_tokens
    if n_chunks < 1:
        raise RuntimeBackendError(
            f"perplexity needs at least one full chunk of {context_tokens} tokens; the text gave {len(tokens)}. "
            "Use a longer text, a larger max_tokens or a smaller context_tokens"
        )
    total_nll = 0.0
    scored = 0
    first = context_tokens // 2
    session = LlamaSession(
        model_path, n_ctx=context_tokens, n_threads=threads, max_outputs=max_outputs, lora_path=lora_path
    )
    with session as s:
        for c in range(n_chunks):
            chunk = list(tokens[c * context_tokens : (c + 1) * context_tokens])
            if s.add_bos and s.bos is not None:
                chunk[0] = s.bos
            s.clear()
            for start in range(0, context_tokens, max_outputs):
                part = chunk[start : start + max_outputs]
                # position i predicts token i + 1; score predictions of tokens first .. end
                want = [first - 1 <= start + i < context_tokens - 1 for i in range(len(part))]
                logits = s.decode(part, start, want)
                if logits is None:
                    continue
                targets = [chunk[start + i + 1] for i, w in enumerate(want) if w]
                logp = log_softmax_at(logits, targets)
                total_nll -= float(logp.sum())
                scored += len(targets)
            if progress is not None:
                progress(c + 1, n_chunks)
    return math.exp(total_nll / scored), scored


def accuracy(
    model_path: Path,
    tasks: Sequence[TaskTokens],
    *,
    threads: int = 2,
    context_tokens: int = 512,
    progress: Progress | None = None,
    lora_path: Path | None = None,
) -> float:
    """Fraction of items whose correct option has the highest summed log-likelihood after the prompt."""
    from slmops.optimize._llama import LlamaSession, log_softmax_at

    if not tasks:
        raise RuntimeBackendError("no task items to score")
    correct = 0
    batch = 64
    session = LlamaSession(model_path, n_ctx=context_tokens, n_threads=threads, max_outputs=batch, lora_path=lora_path)
    with session as s:
        for index, item in enumerate(tasks):
            s.clear()
            prompt = list(item.prompt)
            last: Any = None
            for start in range(0, len(prompt), batch):
                part = prompt[start : start + batch]
                is_last = start + batch >= len(prompt)
                last = s.decode(part, start, [False] * (len(part) - 1) + [is_last])
            assert last is not None
            scores: list[float] = []
            for option in item.options:
                s.forget_from(len(prompt))
                logp = float(log_softmax_at(last, [option[0]])[0])
                if len(option) > 1:
                    body = list(option[:-1])
                    logits = s.decode(body, len(prompt), [True] * len(body))
                    assert logits is not None
                    logp += float(log_softmax_at(logits, list(option[1:])).sum())
                scores.append(logp)
            if max(range(len(scores)), key=lambda k: scores[k]) == item.answer:
                correct += 1
            if progress is not None:
                progress(index + 1, len(tasks))
    return correct / len(tasks)


# ------------------------------------------------------------------------------------------- memory and speed


def machine_label() -> str:
    """This machine, as speeds are labelled: CPU model and core count."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count() or 1
    return f"{model}, {cores} core{'s' if cores != 1 else ''}"


@dataclass(frozen=True)
class Measurement:
    threads: int
    load_s: float
    peak_rss_load_bytes: int
    peak_rss_bytes: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def _run_measurement(args: list[str], model: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``python ARGS`` (a measurement child) and return the JSON object on its last line of output."""
    try:
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeBackendError(f"measuring {model} took longer than {timeout_s:.0f} s") from None
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-3:]
        raise RuntimeBackendError(f"the measurement process for {model} failed: {' | '.join(tail)}")
    raw: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return raw


def measure(
    model_path: Path,
    prompt: Sequence[int],
    *,
    threads: int,
    context_tokens: int,
    decode_tokens: int,
    timeout_s: float = 600.0,
) -> Measurement:
    """Load, prefill ``prompt`` and decode ``decode_tokens`` greedily in a fresh child process; its peak RSS is
    the kernel's high-water mark (``VmHWM``) after loading and at the end: interpreter, llama.cpp and model."""
    with tempfile.TemporaryDirectory(prefix="slmops-probe-") as tmp:
        spec = Path(tmp) / "probe.json"
        spec.write_text(
            json.dumps(
                {
                    "model": str(model_path),
                    "prompt": list(prompt),
                    "threads": threads,
                    "context_tokens": context_tokens,
                    "decode_tokens": decode_tokens,
                }
            ),
            encoding="utf-8",
        )
        raw = _run_measurement(["-m", "slmops.optimize._probe", str(spec)], model_path, timeout_s)
    return Measurement(
        threads=threads,
        load_s=raw["load_s"],
        peak_rss_load_bytes=raw["peak_rss_load_bytes"],
        peak_rss_bytes=raw["peak_rss_bytes"],
        prefill_tokens_per_s=raw["prefill_tokens_per_s"],
        decode_tokens_per_s=raw["decode_tokens_per_s"],
    )


def profile_metrics(profile: DeviceProfile, m: Measurement) -> dict[str, float]:
    return {
        profile_metric("threads", profile.name): float(m.threads),
        profile_metric("load_s", profile.name): m.load_s,
        profile_metric("peak_rss_load_bytes", profile.name): float(m.peak_rss_load_bytes),
        profile_metric("peak_rss_bytes", profile.name): float(m.peak_rss_bytes),
        profile_metric("prefill_tokens_per_s", profile.name): m.prefill_tokens_per_s,
        profile_metric("decode_tokens_per_s", profile.name): m.decode_tokens_per_s,
    }


# --------------------------------------------------------------------------- ONNX Runtime GenAI (the second runtime)
#
# The same measurements for an ONNX GenAI model directory, so its row sits in the same report as the GGUF variants:
# perplexity of the same token ids (the source GGUF's tokenizer; the export keeps its vocabulary, so the ids mean
# the same tokens), chunked and scored exactly as :func:`perplexity` does; load time, peak RSS and greedy prefill and
# decode speed in a fresh child process per thread count, as :func:`measure` does. Task accuracy is not measured for
# this runtime (its rows show none).

ONNX_PROBE_CODE = (
    "import sys; from slmops.optimize.evaluate import onnx_genai_probe_main as m; sys.exit(m(sys.argv[1]))"
)


def _onnx_genai_session(model_dir: Path, threads: int | None, context_tokens: int) -> tuple[Any, Any, int]:
    """(onnxruntime_genai, the loaded model, the KV cache length to allocate: at least the sliding window)."""
    from slmops.registry.formats.hf import read_json_file
    from slmops.registry.formats.onnx_genai import GENAI_CONFIG_FILE, read_onnx_genai
    from slmops.runtime.onnx_genai_backend import import_onnxruntime_genai

    og = import_onnxruntime_genai("evaluating ONNX GenAI models")
    info = read_onnx_genai(model_dir)
    decoder = read_json_file(model_dir / GENAI_CONFIG_FILE)["model"]["decoder"]
    window = decoder.get("sliding_window", {}).get("window_size", 0) if isinstance(decoder, dict) else 0
    length = min(info.context_length, max(context_tokens, int(window or 0)))
    config = og.Config(str(model_dir))
    if threads is not None:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og, og.Model(config), length


def perplexity_onnx_genai(
    model_dir: Path,
    tokens: Sequence[int],
    *,
    bos: int | None,
    context_tokens: int = 512,
    threads: int = 2,
    max_outputs: int = 64,
    progress: Progress | None = None,
) -> tuple[float, int]:
    """(perplexity, scored tokens) of ``tokens`` under an ONNX GenAI model, chunked and scored as :func:`perplexity`
    (``bos``: the id that replaces each chunk's first token, None to keep it)."""
    from slmops.runtime.onnx_genai_backend import _log_softmax_at

    n_chunks = len(tokens) // context_tokens
    if n_chunks < 1:
        raise RuntimeBackendError(
            f"perplexity needs at least one full chunk of {context_tokens} tokens; the text gave {len(tokens)}. "
            "Use a longer text, a larger max_tokens or a smaller context_tokens"
        )
    og, model, length = _onnx_genai_session(Path(model_dir), threads, context_tokens)
    total_nll = 0.0
    scored = 0
    first = context_tokens // 2
    try:
        for c in range(n_chunks):
            chunk = list(tokens[c * context_tokens : (c + 1) * context_tokens])
            if bos is not None:
                chunk[0] = bos
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=length, do_sample=False)
            generator = og.Generator(model, params)
            for start in range(0, context_tokens, max_outputs):
                part = chunk[start : start + max_outputs]
                generator.append_tokens(part)
                # position i predicts token i + 1; score predictions of tokens first .. end
                rows = [i for i in range(len(part)) if first - 1 <= start + i < context_tokens - 1]
                if not rows:
                    continue
                logits = generator.get_output("logits")[0]  # (len(part), vocab)
                targets = [chunk[start + i + 1] for i in rows]
                total_nll -= float(_log_softmax_at(logits[rows], targets).sum())
                scored += len(targets)
            del generator
            if progress is not None:
                progress(c + 1, n_chunks)
    except RuntimeError as exc:
        raise RuntimeBackendError(f"ONNX Runtime GenAI failed scoring {model_dir}: {exc}") from exc
    return math.exp(total_nll / scored), scored


def onnx_genai_probe_main(spec_path: str) -> int:
    """The child process of :func:`measure_onnx_genai`: load, prefill, decode greedily; print one JSON line."""
    import time

    import numpy as np

    from slmops.optimize._probe import _peak_rss_bytes

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    prompt: list[int] = spec["prompt"]
    started = time.perf_counter()
    og, model, length = _onnx_genai_session(Path(spec["model"]), spec["threads"], spec["context_tokens"])
    load_s = time.perf_counter() - started
    peak_load = _peak_rss_bytes()
    if spec.get("bos") is not None:
        prompt = [spec["bos"], *prompt]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(length, len(prompt) + spec["decode_tokens"] + 1), do_sample=False)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    for start in range(0, len(prompt), 64):
        generator.append_tokens(prompt[start : start + 64])
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(spec["decode_tokens"]):
        generator.generate_next_token()  # samples from the last logits, then runs the model on the new token
        int(np.asarray(generator.get_next_tokens())[0])
    decode_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "load_s": load_s,
                "peak_rss_load_bytes": peak_load,
                "peak_rss_bytes": _peak_rss_bytes(),
                "prefill_tokens_per_s": len(prompt) / prefill_s,
                "decode_tokens_per_s": spec["decode_tokens"] / decode_s,
            }
        )
    )
    return 0


def measure_onnx_genai(
    model_dir: Path,
    prompt: Sequence[int],
    *,
    bos: int | None,
    threads: int,
    context_tokens: int,
    decode_tokens: int,
    timeout_s: float = 600.0,
) -> Measurement:
    """:func:`measure` for an ONNX GenAI model directory (a fresh child process, its ``VmHWM``)."""
    with tempfile.TemporaryDirectory(prefix="slmops-probe-") as tmp:
        spec = Path(tmp) / "probe.json"
        spec.write_text(
            json.dumps(
                {
                    "model": str(model_dir),
                    "prompt": list(prompt),
                    "bos": bos,
                    "threads": threads,
                    "context_tokens": context_tokens,
                    "decode_tokens": decode_tokens,
                }
            ),
            encoding="utf-8",
        )
        raw = _run_measurement(["-c", ONNX_PROBE_CODE, str(spec)], model_dir, timeout_s)
    return Measurement(threads=threads, **raw)


def evaluate_onnx_genai_dir(
    model_dir: Path,
    tokens: EvalTokens,
    *,
    bos: int | None,
    context_tokens: int,
    threads: int,
    profiles: Sequence[DeviceProfile],
    speed_prompt_tokens: int,
    speed_decode_tokens: int,
    progress: Progress | None = None,
) -> dict[str, float]:
    """The metrics of an ONNX GenAI model directory under the keys the GGUF evaluation writes
    (``perplexity``, ``size_bytes``, ``peak_rss_bytes``, ``decode_tokens_per_s``, their ``@<profile>`` forms, ...)
    plus ``runtime_onnxruntime_genai`` = 1. ``bos`` is the source tokenizer's BOS when it adds one."""
    from slmops.core.requirements import estimate_requirements
    from slmops.registry.formats.onnx_genai import onnx_genai_facts, read_onnx_genai

    model_dir = Path(model_dir)
    info = read_onnx_genai(model_dir)
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    metrics: dict[str, float] = {"size_bytes": float(size), "runtime_onnxruntime_genai": 1.0}
    ppl, scored = perplexity_onnx_genai(
        model_dir, tokens.text, bos=bos, context_tokens=context_tokens, threads=threads, progress=progress
    )
    metrics["perplexity"] = ppl
    metrics["perplexity_tokens"] = float(scored)
    requirements = estimate_requirements(onnx_genai_facts(info), info.weight_bytes)
    runs = [r for r in requirements.memory_run if r.context_tokens >= context_tokens]
    estimate = runs[0].bytes if runs else requirements.memory_load_bytes
    prompt = list(tokens.text[:speed_prompt_tokens])
    cores = max(1, os.cpu_count() or 1)
    measured: dict[int, Measurement] = {}

    def at(count: int) -> Measurement:
        if count not in measured:
            measured[count] = measure_onnx_genai(
                model_dir, prompt, bos=bos, threads=count, context_tokens=context_tokens,
                decode_tokens=speed_decode_tokens,
            )  # fmt: skip
        return measured[count]

    for profile in profiles:
        if estimate > profile.memory_bytes:
            metrics[f"fits@{profile.name}"] = 0.0
            continue
        metrics[f"fits@{profile.name}"] = 1.0
        metrics.update(profile_metrics(profile, at(min(profile.threads, cores))))
    own = at(threads)
    metrics.update(
        {
            "threads": float(threads),
            "load_s": own.load_s,
            "peak_rss_load_bytes": float(own.peak_rss_load_bytes),
            "peak_rss_bytes": float(own.peak_rss_bytes),
            "prefill_tokens_per_s": own.prefill_tokens_per_s,
            "decode_tokens_per_s": own.decode_tokens_per_s,
            "estimated_memory_bytes": float(estimate),
        }
    )
    return metrics
