"""`slmops token …` (operator API tokens, on the local database) and `slmops enroll-token …` (over HTTP)."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from slmops.cli._common import console, print_json, print_result
from slmops.cli._remote import JsonOpt, ServerOpt, TokenOpt, client, parse_labels
from slmops.control.schemas import ROLES, ApiTokenPublic, EnrollmentTokenPublic
from slmops.control.settings import ServerSettings
from slmops.errors import ConfigError

__all__ = ["enroll_token_app", "token_app"]

token_app = typer.Typer(help="Operator API tokens, managed directly on the local database.", no_args_is_help=True)
enroll_token_app = typer.Typer(help="Enrollment tokens that devices enroll with.", no_args_is_help=True)


def _local_plane() -> Any:
    from slmops.control import ControlPlane

    return ControlPlane.open(ServerSettings())


@token_app.command("create")
def token_create(
    name: str = typer.Option(..., "--name", help="A name for the token, e.g. ci or alice."),
    role: str = typer.Option("operator", "--role", help="admin, operator or viewer."),
    json_out: bool = JsonOpt,
) -> None:
    """Create an operator API token on the local database (no server needed) and print it once.

    Example: slmops token create --role admin --name alice
    """
    if role not in ROLES:
        raise ConfigError(f"--role must be admin, operator or viewer, got {role!r}")
    from slmops.control.credentials import create_api_token

    plane = _local_plane()
    try:
        created = create_api_token(plane, name, role, "cli")
    finally:
        plane.close()
    if json_out:
        print_json(created.model_dump(mode="json"))
        return
    console.print(f"created {created.role} token '{created.name}'; it is shown only this once:")
    typer.echo(created.token)


def _token_table(tokens: list[ApiTokenPublic]) -> None:
    table = Table("name", "role", "created", "by", "revoked")
    for t in tokens:
        table.add_row(t.name, t.role, t.created_at, t.created_by, "yes" if t.revoked else "")
    console.print(table)


@token_app.command("list")
def token_list(json_out: bool = JsonOpt) -> None:
    """List operator API tokens (names and roles; secrets are never stored).

    Example: slmops token list
    """
    from slmops.control.credentials import list_api_tokens

    plane = _local_plane()
    try:
        tokens = list_api_tokens(plane)
    finally:
        plane.close()
    print_result(tokens, json_out, _token_table)


@token_app.command("revoke")
def token_revoke(name: str = typer.Argument(..., help="The token's name.")) -> None:
    """Revoke an operator API token at once.

    Example: slmops token revoke alice
    """
    from slmops.control.credentials import revoke_api_token

    plane = _local_plane()
    try:
        revoke_api_token(plane, name)
    finally:
        plane.close()
    console.print(f"revoked token '{name}'")


@enroll_token_app.command("create")
def enroll_token_create(
    uses: int = typer.Option(1, "--uses", help="How many devices may enroll with it."),
    expires_in_s: float | None = typer.Option(None, "--expires-in-s", help="Lifetime in seconds (default 24 h)."),
    auto_approve: bool = typer.Option(False, "--auto-approve", help="Approve devices at once, no operator step."),
    label: list[str] = typer.Option([], "--label", help="KEY=VALUE given to every device enrolled with it."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Create an enrollment token and print it once; give it to `slmops agent --enroll-token`.

    Example: slmops enroll-token create --uses 10 --auto-approve --label site=berlin-3
    """
    with client(server_url, token) as api:
        created = api.create_enrollment_token(
            max_uses=uses, expires_in_s=expires_in_s, auto_approve=auto_approve, labels=parse_labels(label)
        )
    if json_out:
        print_json(created.model_dump(mode="json"))
        return
    approve = "auto-approve" if created.auto_approve else "needs approval"
    console.print(
        f"enrollment token {created.id}: {created.max_uses} use(s), expires {created.expires_at}, {approve}, "
        f"labels {json.dumps(created.labels)}; shown only this once:"
    )
    typer.echo(created.token)


def _enrollment_table(tokens: list[EnrollmentTokenPublic]) -> None:
    table = Table("id", "uses", "expires", "auto-approve", "labels")
    for t in tokens:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(t.labels.items()))
        table.add_row(t.id, f"{t.uses}/{t.max_uses}", t.expires_at, "yes" if t.auto_approve else "", labels)
    console.print(table)


@enroll_token_app.command("list")
def enroll_token_list(
    server_url: str | None = ServerOpt, token: str | None = TokenOpt, json_out: bool = JsonOpt
) -> None:
    """List enrollment tokens and how often they were used.

    Example: slmops enroll-token list
    """
    with client(server_url, token) as api:
        tokens = api.enrollment_tokens()
    print_result(tokens, json_out, _enrollment_table)
