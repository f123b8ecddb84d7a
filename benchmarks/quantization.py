"""Quantization benchmark on gemma3-270m: our variants against llama.cpp's own presets, from the same F16 source.

    python -m benchmarks.quantization [--output BENCHMARKS.md] [--max-tokens 2048] [--tasks 120]

One run, in a fresh temporary SLMOPS_HOME: pull the default model, dequantize it to F16 (our ``dequantize`` pass),
quantize that F16 with llama.cpp's presets (``quantize`` pass, no importance matrix) and with our quality-aware
variants (the same presets with an importance matrix computed from ``calibration.txt``), evaluate every file with
the same token ids (``eval.txt`` for perplexity, ``tasks.jsonl`` for accuracy) and measure memory and speed in a
child process at 2 threads. Rewrites the quantization section of BENCHMARKS.md with the table and the command.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PRESETS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
OURS = ["Q4_K_M", "Q3_K_M", "Q2_K"]  # with an importance matrix
BEGIN, END = "<!-- quantization:begin -->", "<!-- quantization:end -->"


def _recipe(max_tokens: int, tasks: int) -> dict[str, Any]:
    variants: list[dict[str, Any]] = [{"name": "f16", "passes": [{"dequantize": {}}]}]
    for preset in PRESETS:
        variants.append({"name": preset.lower(), "passes": [{"dequantize": {}}, {"quantize": {"type": preset}}]})
    for preset in OURS:
        step = {"quantize": {"type": preset, "imatrix": {"text": "builtin:calibration.txt"}}}
        variants.append({"name": f"{preset.lower()}-imat", "passes": [{"dequantize": {}}, step]})
    return {
        "name": "benchmark-quantization",
        "source": "gemma3-270m",
        "evaluation": {
            "text": "builtin:eval.txt",
            "max_tokens": max_tokens,
            "context_tokens": 512,
            "tasks": "builtin:tasks.jsonl",
            "max_tasks": tasks,
            "device_profiles": ["gateway-2gb"],
            "speed_prompt_tokens": 128,
            "speed_decode_tokens": 32,
            "threads": 2,
        },
        "variants": variants,
    }


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / (1 << 20):.1f}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--tasks", type=int, default=120)
    args = parser.parse_args(argv)
    command = "python -m benchmarks.quantization" + (" " + shlex.join(argv if argv is not None else sys.argv[1:]))

    from slmops.config import Settings
    from slmops.optimize.recipe import parse_recipe
    from slmops.optimize.runner import run_recipe
    from slmops.registry import Registry, pull

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="slmops-bench-") as tmp:
        settings = Settings(home=Path(tmp) / "home")
        registry = Registry.open(settings)
        try:
            pull(registry, "gemma3-270m")
            recipe = parse_recipe(_recipe(args.max_tokens, args.tasks), "benchmark recipe")

            def progress(description: str) -> Any:
                def report(done: float, total: float) -> None:
                    if done >= total:
                        print(f"[{time.monotonic() - started:6.0f} s] {description}", file=sys.stderr, flush=True)

                return report

            result = run_recipe(registry, recipe, settings=settings, progress_factory=progress)
        finally:
            registry.close()
    elapsed = time.monotonic() - started

    f16 = next(v.metrics for v in result.variants if v.name == "f16")
    rows = [("source (PyPI package, Q4_K_M)", "imported", result.source_metrics)]
    for v in result.variants:
        made = " → ".join(
            s.pass_name
            + (f"({s.params['type']}{', imatrix' if s.params.get('imatrix') else ''})" if "type" in s.params else "")
            for s in v.steps
        )
        who = "ours" if v.name.endswith("-imat") or v.name == "f16" else "llama.cpp preset"
        rows.append((v.name, f"{who}: {made}", v.metrics))
    lines = [
        BEGIN,
        "## Quantization: gemma3-270m, our variants vs llama.cpp presets",
        "",
        f"Measured {datetime.now(UTC).strftime('%Y-%m-%d')} on {result.measured_on} in {elapsed / 60:.1f} min, with:",
        "",
        "```sh",
        command.strip(),
        "```",
        "",
        f"- Every variant is made from the same F16 GGUF, itself dequantized from the package's Q4_K_M file. "
        f"Perplexity: `eval.txt`, {int(f16['perplexity_tokens'])} scored tokens (chunks of 512, second half of each "
        f"scored), identical token ids for every row. Accuracy: {int(f16.get('accuracy_items', 0))} multiple-choice "
        "items of `tasks.jsonl`, scored by log-likelihood.",
        "- Peak RSS is the measuring child process's high-water mark (interpreter + llama.cpp + model, 512-token "
        "context, 128-token prompt, 32 decoded tokens); speeds at 2 threads on the machine above, which other jobs "
        "were sharing: treat speeds as rough.",
        "- `-imat` rows are ours: the same llama.cpp preset, quantized with an importance matrix that slmops computes "
        "from `calibration.txt` through llama.cpp's graph callback.",
        "",
        "| variant | made by | size MiB | perplexity | Δ vs F16 | accuracy | peak RSS MiB | prefill tok/s "
        "| decode tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, made, m in rows:
        ppl = m.get("perplexity")
        delta = f"{(ppl / f16['perplexity'] - 1) * 100:+.2f}%" if ppl is not None else "-"
        lines.append(
            f"| {name} | {made} | {_mib(m.get('size_bytes'))} | {_num(ppl, '.3f')} | {delta} | "
            f"{_num(m.get('accuracy'), '.1%')} | {_mib(m.get('peak_rss_bytes'))} | "
            f"{_num(m.get('prefill_tokens_per_s'), '.1f')} | {_num(m.get('decode_tokens_per_s'), '.1f')} |"
        )
    lines.append(END)
    section = "\n".join(lines) + "\n"
    old = args.output.read_text(encoding="utf-8") if args.output.exists() else "# Benchmarks\n\n"
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN)] + section + old[old.index(END) + len(END) + 1 :]
    else:
        new = old.rstrip("\n") + "\n\n" + section
    tmp_out = args.output.with_name(f".{args.output.name}.tmp")
    tmp_out.write_text(new, encoding="utf-8")
    os.replace(tmp_out, args.output)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
