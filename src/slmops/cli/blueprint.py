"""`slmops apply -f`, `slmops plan -f` and `slmops blueprint list|show`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer
from rich.table import Column, Table

from slmops.cli._common import console, print_result
from slmops.cli._remote import JsonOpt, ServerOpt, TokenOpt, client
from slmops.control.client import OperatorClient
from slmops.control.schemas import ApplyResult, BlueprintPublic, PlanPublic
from slmops.core.sites import describe
from slmops.errors import NotFoundError

__all__ = ["app", "apply", "plan"]

app = typer.Typer(help="Blueprints: which model, variant and runtime for which devices.", no_args_is_help=True)
FileOpt = typer.Option(..., "--file", "-f", help="The blueprint YAML file ('-' for stdin).")


def _read(path: Path) -> str:
    if str(path) == "-":
        return typer.get_text_stream("stdin").read()
    if not path.is_file():
        raise NotFoundError(f"{path} does not exist; write a blueprint YAML file (see `slmops blueprint --help`)")
    return path.read_text(encoding="utf-8")


R = TypeVar("R", ApplyResult, PlanPublic)


def _file_command(
    send: Callable[[OperatorClient, str], R], human: Callable[[R], None], doc: str
) -> Callable[..., None]:
    """A command that reads a blueprint file, sends it to the control plane and prints the answer."""

    def command(
        file: Path = FileOpt,
        server_url: str | None = ServerOpt,
        token: str | None = TokenOpt,
        json_out: bool = JsonOpt,
    ) -> None:
        with client(server_url, token) as api:
            result = send(api, _read(file))
        print_result(result, json_out, human)

    command.__doc__ = doc
    return command


def _print_applied(result: ApplyResult) -> None:
    verb = "created" if result.created else "unchanged:"
    console.print(f"blueprint {result.name}@{result.revision} {verb}".replace(" unchanged:", " unchanged"))
    _print_warnings(result.warnings)


def _print_plan(result: PlanPublic) -> None:
    state = f"would become revision {result.revision}" if result.spec_changed else "unchanged"
    console.print(f"blueprint {result.name}: {state}")
    table = Table(
        Column("device", no_wrap=True),
        "class",
        "change",
        "from",
        "to",
        Column("winner", no_wrap=True),
        "matched",
        "site (local)",
    )
    for e in result.entries:
        table.add_row(
            e.device_id,
            e.device_class,
            e.change,
            e.before or "-",
            e.after or "-",
            e.winner or "-",
            ", ".join(e.matched),
            f"{e.local.site}: {describe(e.local)}" if e.local is not None else "-",
        )
    console.print(table)
    changes = sum(1 for e in result.entries if e.change != "unchanged")
    console.print(f"{changes} device(s) would change")
    dropped = [(e, reason) for e in result.entries if e.local is not None for reason in e.local.dropped]
    if dropped:
        console.print("site adaptations dropped:")
        for e, reason in dropped:
            console.print(
                f"  {e.device_id} (site {e.local.site if e.local else '-'}): {reason}", highlight=False, soft_wrap=True
            )
    _print_warnings(result.warnings)


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        console.print(f"[yellow]warning:[/] {warning}")


apply = _file_command(
    OperatorClient.apply,
    _print_applied,
    """Create or update a blueprint; a new revision only when it changed (idempotent).

    Example: slmops apply -f tills.yaml
    """,
)
plan = _file_command(
    OperatorClient.plan,
    _print_plan,
    """Show what applying a blueprint would change on each device, and which blueprint wins where.

    Example: slmops plan -f tills.yaml
    """,
)


@app.command("list")
def list_(server_url: str | None = ServerOpt, token: str | None = TokenOpt, json_out: bool = JsonOpt) -> None:
    """List the current revision of every blueprint.

    Example: slmops blueprint list
    """
    with client(server_url, token) as api:
        blueprints = api.blueprints()
    print_result(blueprints, json_out, _print_blueprints)


def _print_blueprints(blueprints: list[BlueprintPublic]) -> None:
    table = Table("name", "revision", "priority", "model", "applied", "by")
    for b in blueprints:
        table.add_row(b.name, str(b.revision), str(b.priority), b.model, b.created_at, b.created_by)
    console.print(table)


@app.command()
def show(
    name: str = typer.Argument(..., help="The blueprint name."),
    revision: int | None = typer.Option(None, "--revision", help="An older revision (default: the current one)."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show a blueprint as applied (its YAML), with revision and author.

    Example: slmops blueprint show tills-berlin --revision 2
    """
    with client(server_url, token) as api:
        found = api.blueprint(name, revision)
    print_result(found, json_out, _print_blueprint)


def _print_blueprint(blueprint: BlueprintPublic) -> None:
    current = " (current)" if blueprint.current else ""
    console.print(
        f"# {blueprint.name}@{blueprint.revision}{current}, applied {blueprint.created_at} by {blueprint.created_by}"
    )
    typer.echo(blueprint.source.rstrip("\n"))
