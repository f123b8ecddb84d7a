"""`slmops pipeline run FILE`: build, evaluate, gate per device class, test matrix, register, release; for CI.

Exit codes (what a CI system acts on):

- ``0``: every class has a variant that passed its gates (and its release started, when the file asks for one);
- ``1``: a gate failed: at least one class has no variant to release (the others may still have been released;
  ``--allow-partial`` exits 0 then);
- ``2``: a usage or configuration error: a bad option, an invalid pipeline file, a reference to nothing;
- ``3``: an infrastructure error: the control plane or a server could not be reached, a process could not start,
  an integrity or permission failure; retrying may help.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from slmops.cli._common import console, err_console, print_json, progress_bars
from slmops.cli._remote import ServerOpt, TokenOpt, client
from slmops.errors import (
    BlueprintError,
    ConfigError,
    ConflictError,
    InvalidModelError,
    MissingExtraError,
    NotFoundError,
    SLMOpsError,
)

__all__ = ["EXIT_GATE", "EXIT_INFRA", "EXIT_OK", "EXIT_USAGE", "app", "exit_code_for"]

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_INFRA = 0, 1, 2, 3
_USAGE_ERRORS = (BlueprintError, ConfigError, NotFoundError, ConflictError, MissingExtraError, InvalidModelError)

app = typer.Typer(help="CI/CD for models: a pipeline file run end to end, with a device-class test matrix.")


def exit_code_for(exc: BaseException) -> int:
    """2 for what the user must fix in the file or the command line, 3 for everything else (infrastructure)."""
    return EXIT_USAGE if isinstance(exc, _USAGE_ERRORS) else EXIT_INFRA


def _render(report: Any) -> None:
    steps = Table(title=f"pipeline {report.name}: steps" + (" (cached report)" if report.cached else ""))
    for column in ("step", "cached", "seconds", "numbers"):
        steps.add_column(column)
    for s in report.steps:
        shown = ", ".join(f"{k}={v}" for k, v in s.numbers.items() if not isinstance(v, dict))
        steps.add_row(s.name, "yes" if s.cached else "no", f"{s.seconds:.1f}", shown)
    console.print(steps)
    gates = Table(title="gates per class")
    for column in ("class", "variant", "gate", "status", "detail"):
        gates.add_column(column)
    for g in report.gates:
        colour = {"pass": "green", "fail": "red"}.get(g.status, "yellow")
        gates.add_row(g.device_class, g.variant, g.name, f"[{colour}]{g.status}[/]", g.reason)
    console.print(gates)
    if report.matrix:
        matrix = Table(title="test matrix (real agents under each class's OS-enforced limits)")
        for column in ("class", "variant", "ok", "tokens/s", "peak MiB", "limits"):
            matrix.add_column(column)
        for r in report.matrix:
            matrix.add_row(
                r.device_class,
                r.variant,
                "[green]yes[/]" if r.ok else f"[red]no[/]: {r.reason}",
                f"{r.tokens_per_s:.1f}" if r.tokens_per_s is not None else "-",
                f"{r.peak_memory_bytes / (1 << 20):.0f}" if r.peak_memory_bytes else "-",
                "; ".join(f"{k}: {v}" for k, v in r.limits.items() if k != "notes"),
            )
        console.print(matrix)
    decisions = Table(title="what each class gets")
    for column in ("class", "variant", "released", "why"):
        decisions.add_column(column)
    for d in report.decisions:
        decisions.add_row(d.device_class, d.variant or "-", "yes" if d.released else "no", d.reason)
    console.print(decisions)
    if report.measured_on:
        console.print(f"[dim]measured on {report.measured_on}[/]")
    colour = {"released": "green", "registered": "green", "partial": "yellow"}.get(report.outcome, "red")
    console.print(f"[{colour}]outcome: {report.outcome}[/]")


@app.command("run")
def run(
    file: Path = typer.Argument(..., help="A pipeline YAML file (see slmops.pipeline.spec)."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    junit: Path | None = typer.Option(None, "--junit", help="Write a JUnit XML report here."),
    summary: Path | None = typer.Option(
        None, "--summary", help="Append a Markdown summary here (e.g. $GITHUB_STEP_SUMMARY)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and run nothing."),
    allow_partial: bool = typer.Option(
        False, "--allow-partial", help="Exit 0 when some classes were released and others failed their gates."
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Measure the test matrix again; rerun the gates."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Run a pipeline file: build → evaluate → gate per class → test matrix → register and tag → staged release.

    Resumable and cached by inputs: a rerun after success does no work, a rerun after a failure resumes. Exit codes:
    0 ok, 1 a gate failed, 2 usage or configuration error, 3 infrastructure error.

    Example: slmops pipeline run examples/ci/pipeline.yaml --junit report.xml --summary "$GITHUB_STEP_SUMMARY"
    """
    from slmops.pipeline import junit_xml, load_pipeline, markdown_summary, plan_pipeline, run_pipeline
    from slmops.pipeline.report import write_text_atomic
    from slmops.registry import Registry

    try:
        spec = load_pipeline(file)
        if dry_run:
            lines = plan_pipeline(spec)
            if json_out:
                print_json({"name": spec.name, "plan": lines})
            else:
                console.print(f"[bold]pipeline {spec.name}: plan (nothing runs)[/]")
                for index, line in enumerate(lines, start=1):
                    console.print(f"{index:2}. {line}", highlight=False)
            return
        needs_server = spec.release is not None or (spec.baseline is not None and spec.baseline.blueprint)
        operator = client(server_url, token) if needs_server else None
        registry = Registry.open()
        try:
            with progress_bars(not json_out) as factory:
                report = run_pipeline(
                    spec, registry=registry, client=operator, progress_factory=factory, use_cache=not no_cache
                )
        finally:
            registry.close()
            if operator is not None:
                operator.close()
    except SLMOpsError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exit_code_for(exc)) from None
    except OSError as exc:
        err_console.print(f"[bold red]infrastructure error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INFRA) from None
    if junit is not None:
        write_text_atomic(junit, junit_xml(report))
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        with summary.open("a", encoding="utf-8") as handle:
            handle.write(markdown_summary(report))
    if json_out:
        print_json(report.to_json())
    else:
        _render(report)
    code = report.exit_code
    if code == EXIT_GATE and allow_partial and report.outcome == "partial":
        code = EXIT_OK
    if code:
        raise typer.Exit(code)
