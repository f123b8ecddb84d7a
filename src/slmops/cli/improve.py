"""`slmops improve RECIPE`: curated feedback → LoRA adapter → gates → registry → staged release, in one report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from slmops.cli._common import console, print_json, progress_bars
from slmops.cli._remote import ServerOpt, TokenOpt, client
from slmops.registry import Registry

__all__ = ["improve", "render_report"]


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_report(report: Any) -> None:
    steps = Table(title=f"improve {report.name}: steps")
    for column in ("step", "cached", "seconds", "numbers"):
        steps.add_column(column)
    for s in report.steps:
        shown = ", ".join(f"{k}={_number(v)}" for k, v in s.numbers.items() if not isinstance(v, dict))
        steps.add_row(s.name, "yes" if s.cached else "no", f"{s.seconds:.1f}", shown)
    console.print(steps)
    if report.gates:
        gates = Table(title="gates (parent = the base alone, candidate = base + adapter, measured in this run)")
        for column in ("gate", "status", "parent", "candidate", "reason"):
            gates.add_column(column)
        for g in report.gates:
            colour = {"pass": "green", "fail": "red"}.get(g.status, "yellow")
            gates.add_row(g.name, f"[{colour}]{g.status}[/]", _number(g.parent), _number(g.candidate), g.reason)
        console.print(gates)
    if report.measured_on:
        console.print(f"[dim]measured on {report.measured_on}[/]")
    if report.adapter is not None:
        m = report.adapter.manifest
        console.print(f"registered {m.name}@{m.version} ({m.variant}) {report.adapter.digest}")
    if report.release_id:
        console.print(f"release {report.release_id} (follow it: slmops rollout status {report.release_id} --watch)")
    colour = "red" if report.outcome == "gates_failed" else "green"
    console.print(f"[{colour}]outcome: {report.outcome}[/]")


def improve(
    recipe: Path = typer.Argument(..., help="An improve recipe YAML file (see slmops.improve.spec)."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Train a LoRA adapter on a curated dataset, gate it against its base, register it, and start its release.

    Resumable: every step is cached by its inputs. Exit code 0 when the candidate passed every gate (and its release
    started, when the recipe asks for one), 1 when a gate failed (nothing is registered or released).

    Example: slmops improve recipes/improve-shop.yaml --server http://127.0.0.1:8080
    """
    from slmops.improve import load_improve_spec, run_improve

    spec = load_improve_spec(recipe)
    registry = Registry.open()
    operator = client(server_url, token) if spec.release is not None else None
    try:
        with progress_bars(not json_out) as factory:
            report = run_improve(spec, registry=registry, progress_factory=factory, client=operator)
    finally:
        registry.close()
        if operator is not None:
            operator.close()
    if json_out:
        print_json(report.to_json())
    else:
        render_report(report)
    if report.outcome == "gates_failed":
        raise typer.Exit(1)
