"""`slmops model select MODEL --device-class X`: which variant a class of device should run, and why."""

from __future__ import annotations

from typing import cast, get_args

import typer
from rich.table import Table

from slmops.cli._common import console, human_bytes, print_json
from slmops.core.candidates import candidates_from_manifests
from slmops.core.device_profiles import DEVICE_PROFILES, get_profile
from slmops.core.selection import Objective, VariantPolicy, choose_variant
from slmops.errors import ConfigError
from slmops.registry import Registry


def select(
    model: str = typer.Argument(..., help="Model name: every version in its lineage is a candidate."),
    device_class: str = typer.Option(
        ..., "--device-class", "-d", help=f"Device class: {', '.join(sorted(DEVICE_PROFILES))}."
    ),
    objective: str = typer.Option("best_quality", help="best_quality, smallest_within or fastest_within."),
    runtimes: str | None = typer.Option(
        None, help="The runtimes the device has, comma-separated (llama.cpp, onnxruntime-genai); default llama.cpp."
    ),
    max_memory_fraction: float = typer.Option(0.5, help="Use at most this fraction of the device's RAM."),
    min_decode_tps: float | None = typer.Option(None, help="Require at least this many decode tokens/s."),
    max_ppl_increase_pct: float = typer.Option(5.0, help="smallest_within/fastest_within: perplexity slack, %."),
    context_tokens: int = typer.Option(2048, help="Context for memory estimates of unmeasured variants."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Choose the variant of MODEL for a device class, and say why each other variant lost (exit 1: none fits).

    Example: slmops model select gemma3-270m --device-class gateway-2gb --objective smallest_within
    """
    objectives = get_args(Objective)
    if objective not in objectives:
        raise ConfigError(f"--objective must be one of {', '.join(objectives)}, not {objective!r}")
    chosen_objective = cast(Objective, objective)
    installed = [r.strip() for r in runtimes.split(",") if r.strip()] if runtimes else None
    try:
        policy = VariantPolicy(chosen_objective, max_memory_fraction, min_decode_tps, max_ppl_increase_pct)
    except ValueError as exc:
        raise ConfigError(f"invalid policy: {exc}") from None
    profile = get_profile(device_class)
    registry = Registry.open()
    try:
        envelopes = []
        stack = list(registry.lineage(model))
        while stack:
            node = stack.pop()
            envelopes.append(node.envelope)
            stack.extend(node.children)
    finally:
        registry.close()
    candidates = candidates_from_manifests(envelopes, profile, context_tokens)
    choice = choose_variant(candidates, profile.memory_bytes, policy, runtimes=installed)
    if json_out:
        print_json(
            {
                "device_class": profile.name,
                "memory_bytes": profile.memory_bytes,
                "policy": {
                    "objective": policy.objective,
                    "max_memory_fraction": policy.max_memory_fraction,
                    "min_decode_tokens_per_s": policy.min_decode_tokens_per_s,
                    "max_perplexity_increase_pct": policy.max_perplexity_increase_pct,
                },
                "chosen": None
                if choice.chosen is None
                else {"digest": choice.chosen.digest, "label": choice.chosen.label},
                "explanation": choice.explanation,
                "rejected": [{"digest": r.digest, "label": r.label, "reason": r.reason} for r in choice.rejected],
            }
        )
        if choice.chosen is None:
            raise typer.Exit(1)
        return
    console.print(f"[bold]{profile.name}[/] ({profile.threads} threads, {human_bytes(profile.memory_bytes)} RAM)")
    if choice.chosen is None:
        console.print(f"[bold red]no variant chosen:[/] {choice.explanation}")
    else:
        console.print(f"[bold green]chosen:[/] {choice.chosen.label} — {choice.explanation}")
    if choice.rejected:
        table = Table(title="why the others lost")
        table.add_column("variant")
        table.add_column("reason")
        for r in choice.rejected:
            table.add_row(r.label, r.reason)
        console.print(table)
    if choice.chosen is None:
        raise typer.Exit(1)
