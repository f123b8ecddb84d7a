"""The demo's way back: simulated users rate the real agents' answers, the redacted feedback is curated into a
dataset, a LoRA adapter is trained on it and gated, and it goes out to the fleet as an adapter-only release; the
users then ask again. Part of `slmops demo` (see :mod:`slmops.cli.demo`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from slmops.cli._common import console
from slmops.errors import SLMOpsError

__all__ = ["close_the_loop"]

_QUESTIONS_PER_AGENT = 40
_FEEDBACK = """\
  # the way back: rated answers may leave the device, redacted on it, where the site opted in too
  # (the demo's agents run with --feedback-opt-in)
  feedback: {mode: opt_in, sample_rate: 1.0, max_samples_per_day: 1000}
  local: {adapters: [lora-shop], system_prompt_max_chars: 400, sampling: {temperature: [0.0, 1.0]}}
"""
_RECIPE = """\
# slmops improve: the fleet's feedback -> a LoRA adapter -> gates -> registry -> a staged release
name: shop
model: gemma3-270m@{base}
dataset: shop-feedback@latest
adapter: lora-shop
lora: {{rank: 4, alpha: 8, steps: 30, learning_rate: 0.001, batch_size: 4, max_seq_tokens: 96,
       target_modules: [q_proj, v_proj]}}
evaluation:
  format_regex: '{answer_format}'
  max_heldout: 24
  max_new_tokens: 32
gates: {{task_metric: format, min_gain: 0.2, max_perplexity_increase_pct: 20, max_accuracy_drop: 0.05}}
release:
  blueprint: shop-assistant
  policy:
    stages: [0.1, 1.0]
    soak_s: 15
    min_reporting_devices: 2
    gates:
      - {{name: crashes, metric: crashes, min_samples: 2, critical: true}}
      - {{name: error-rate, metric: errors, min_samples: 100, max_increase: 0.02, critical: true}}
"""


class Step(Protocol):
    workdir: Path

    def run(
        self, title: str, home: Path, *args: str, env: dict[str, str] | None = None, expect: int | tuple[int, ...] = 0
    ) -> int: ...

    def capture(self, home: Path, *args: str, env: dict[str, str] | None = None) -> Any: ...

    def wait(self, what: str, check: Any, timeout_s: float) -> None: ...


def _ask_everywhere(api_ports: dict[str, int], seed: int) -> dict[str, Any]:
    """Each agent gets its own questions, asked concurrently; the outcomes per agent."""
    from slmops.sim.users import ask_and_rate, questions

    asked = questions(_QUESTIONS_PER_AGENT * len(api_ports), seed=seed)
    outcomes: dict[str, Any] = {}

    def one(index: int, name: str, port: int) -> None:
        mine = asked[index * _QUESTIONS_PER_AGENT : (index + 1) * _QUESTIONS_PER_AGENT]
        outcomes[name] = ask_and_rate(f"http://127.0.0.1:{port}", mine)

    threads = [
        threading.Thread(target=one, args=(i, name, port)) for i, (name, port) in enumerate(sorted(api_ports.items()))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def _summary(outcomes: dict[str, Any]) -> tuple[float, float]:
    asked = sum(o.asked for o in outcomes.values())
    in_format = sum(o.in_format for o in outcomes.values())
    up = sum(o.up for o in outcomes.values())
    return (in_format / asked if asked else 0.0), (up / asked if asked else 0.0)


def _print_users(title: str, outcomes: dict[str, Any]) -> None:
    console.print(f"[bold]{title}[/]")
    for name, o in sorted(outcomes.items()):
        console.print(
            f"  {name}: asked {o.asked}, in the shop's format {o.in_format}, rated up {o.up}, down {o.down}, "
            f"ratings accepted by the agent {o.feedback_accepted}, errors {o.errors}"
        )


def close_the_loop(
    step: Step,
    central: Path,
    operator: dict[str, str],
    url: str,
    api_ports: dict[str, int],
    real: set[str],
    blueprint_text: str,
    devices: Callable[[], list[dict[str, Any]]],
) -> None:
    """``real``: the ids of the real agents (the simulated fleet shares their labels and blueprint);
    ``blueprint_text``: the demo's blueprint, which gets feedback and site limits here."""
    from slmops.sim.users import ANSWER_FORMAT

    console.rule("[bold]the way back: feedback from the real agents -> a better model")
    serving = {d["active_digest"] for d in devices() if d["id"] in real}
    versions = step.capture(central, "model", "list", "gemma3-270m", "--json")
    by_digest = {v["digest"]: v for v in versions}
    base = next((by_digest[d] for d in serving if d in by_digest), None)
    if base is None or len(serving) != 1:
        console.print(f"[yellow]the real agents run {len(serving)} versions; skipping the improve part[/]")
        return
    blueprint = step.workdir / "shop-assistant-feedback.yaml"
    text = blueprint_text.replace("ref: stable", f"ref: {base['version']}").rstrip("\n") + "\n" + _FEEDBACK
    blueprint.write_text(text)
    console.print(blueprint.read_text(), highlight=False, markup=False)
    step.run("plan: feedback allowed, site limits shown", central, "plan", "-f", str(blueprint), env=operator)
    step.run("apply it", central, "apply", "-f", str(blueprint), env=operator)
    time.sleep(5)  # the agents poll every second; the new policy needs no model reload
    before = _ask_everywhere(api_ports, seed=0)
    _print_users(
        "simulated users ask the real agents and rate each answer (up only for the shop's one-line format)", before
    )
    rated = sum(o.feedback_accepted for o in before.values())
    step.wait(
        f"the agents to upload their redacted samples ({rated} ratings given)",
        lambda: (
            len(step.capture(central, "feedback", "list", "--limit", "1000", "--json", env=operator)["samples"])
            >= rated * 0.9
        ),
        120,
    )
    step.run("the samples that came back (redacted on the devices)", central, "feedback", "list", "--limit", "5",
             env=operator)  # fmt: skip
    step.run(
        "curate them into a dataset version: dedupe, corrections become training pairs, split by prompt",
        central, "feedback", "curate", "shop-feedback", "--heldout", "0.25",
        env=operator,
    )  # fmt: skip
    recipe = step.workdir / "improve-shop.yaml"
    recipe.write_text(_RECIPE.format(base=base["version"], answer_format=ANSWER_FORMAT.replace("'", "''")))
    console.print(recipe.read_text(), highlight=False, markup=False)
    code = step.run(
        "improve: train a LoRA adapter on it, gate it against its base, register it, release it",
        central, "improve", str(recipe), "--server", url,
        env=operator, expect=(0, 1),
    )  # fmt: skip
    if code == 1:
        console.print("[yellow]a gate held the candidate back (the table above says which): nothing was registered "
                      "or released, and the fleet keeps its model[/]")  # fmt: skip
        return
    adapter = next(
        (v for v in step.capture(central, "model", "list", "gemma3-270m", "--json") if v["variant"] == "lora-shop"),
        None,
    )
    if adapter is None:
        raise SLMOpsError("slmops improve passed its gates but registered no lora-shop variant")
    releases = step.capture(central, "rollout", "list", "--json", env=operator)
    release = next(r for r in releases if r["to_digest"] == adapter["digest"])
    step.run(
        "watch its release: an adapter-only update, canaries per class, gates",
        central, "rollout", "status", release["id"], "--watch", "--interval", "3",
        env=operator,
    )  # fmt: skip
    step.wait(
        "the real agents to serve base + adapter",
        lambda: all(d["active_digest"] == adapter["digest"] for d in devices() if d["id"] in real),
        300,
    )
    step.run("the fleet now", central, "device", "list", env=operator)
    after = _ask_everywhere(api_ports, seed=1)
    _print_users("the same kind of users ask new questions", after)
    (f_before, up_before), (f_after, up_after) = _summary(before), _summary(after)
    console.print(
        f"[bold green]answers in the shop's format: {f_before:.0%} before, {f_after:.0%} after; "
        f"rated up: {up_before:.0%} before, {up_after:.0%} after[/] (adapter {adapter['version']}, "
        f"{adapter['size_bytes']:,} bytes, {adapter['size_bytes'] / base['size_bytes']:.1%} of its base)"
    )
