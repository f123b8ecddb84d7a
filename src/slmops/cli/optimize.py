"""`slmops optimize RECIPE` and `slmops optimize report MODEL`: make, evaluate and compare variants."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from slmops.cli._common import console, human_bytes, print_json, progress_bars
from slmops.registry import Registry


class _RunByDefault(TyperGroup):
    """`slmops optimize RECIPE` runs a recipe; `slmops optimize report MODEL` is a sub-command."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_RunByDefault,
    help="Optimize a model with a recipe, and compare its variants.\n\nExample: slmops optimize recipes/default.yaml",
    no_args_is_help=True,
)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _rows_table(rows: list[Any], title: str) -> Table:
    table = Table(title=title)
    for column in ("version", "variant", "quant", "size", "ppl", "Δppl", "accuracy", "peak RSS", "decode tok/s"):
        table.add_column(column, justify="right" if column not in ("version", "variant", "quant") else "left")
    for r in rows:
        delta = (
            "source"
            if r.is_source
            else (f"{r.delta_perplexity_pct:+.2f}%" if r.delta_perplexity_pct is not None else "-")
        )
        table.add_row(
            r.version,
            r.variant or "-",
            r.quantization or "-",
            human_bytes(r.size_bytes),
            _fmt(r.perplexity, ".3f"),
            delta,
            _fmt(r.accuracy, ".1%"),
            human_bytes(int(r.peak_rss_bytes)) if r.peak_rss_bytes is not None else "-",
            _fmt(r.decode_tokens_per_s, ".1f"),
        )
    return table


@app.command("run")
def run_command(
    recipe: Path = typer.Argument(..., help="A recipe YAML file, e.g. recipes/default.yaml."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Run RECIPE: make every variant (cached), evaluate it, register it with lineage and metrics.

    Example: slmops optimize recipes/default.yaml
    """
    from slmops.optimize.recipe import load_recipe
    from slmops.optimize.report import report_rows
    from slmops.optimize.runner import run_recipe

    parsed = load_recipe(recipe)
    registry = Registry.open()
    try:
        with progress_bars(not json_out) as factory:
            result = run_recipe(registry, parsed, progress_factory=factory)
        if json_out:
            print_json(result.to_json())
            return
        for v in result.variants:
            ran = sum(1 for s in v.steps if not s.cached)
            state = "registered" if v.created else "already registered as"
            console.print(
                f"{v.name}: {state} {v.envelope.manifest.name}@{v.envelope.manifest.version} "
                f"({ran} of {len(v.steps)} passes run, evaluation {'cached' if v.evaluation_cached else 'measured'})"
            )
            for s in v.steps:
                fallbacks = s.report.get("fallbacks")
                if fallbacks and not s.cached:
                    kinds = sorted({f"{f['requested']}→{f['got']}" for f in fallbacks})
                    console.print(f"  [dim]{s.pass_name}: {len(fallbacks)} tensors fell back ({', '.join(kinds)})[/]")
        name = parsed.output_name or result.source.manifest.name
        console.print(_rows_table(report_rows(registry, name), f"{name}: variants"))
        for note in result.notes:
            console.print(f"[dim]{note}[/]")
    finally:
        registry.close()


@app.command("report")
def report_command(
    model: str = typer.Argument(..., help="Model name, e.g. gemma3-270m."),
    png: Path | None = typer.Option(None, "--png", help="Also write a Pareto plot (size vs perplexity) here."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """A table of every variant of MODEL (size, perplexity, Δ vs source, accuracy, memory, speed).

    Example: slmops optimize report gemma3-270m --png pareto.png
    """
    from slmops.optimize.report import report_rows, write_pareto_png

    registry = Registry.open()
    try:
        rows = report_rows(registry, model)
    finally:
        registry.close()
    plotted = write_pareto_png(rows, png, f"{model}: size vs perplexity") if png is not None else 0
    if json_out:
        print_json({"model": model, "variants": [r.to_json() for r in rows], "png": str(png) if png else None})
        return
    console.print(_rows_table(rows, f"{model}: variants"))
    if png is not None:
        console.print(f"wrote {png} ({plotted} variants with a perplexity)")
