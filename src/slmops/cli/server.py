"""`slmops server`, `slmops token …` (local, on the database) and `slmops enroll-token …` (over HTTP)."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from slmops.cli._common import console, print_json
from slmops.control.client import OperatorClient
from slmops.control.settings import ServerSettings
from slmops.errors import ConfigError, MissingExtraError

__all__ = [
    "JsonOpt",
    "ServerOpt",
    "TokenOpt",
    "client",
    "enroll_token_app",
    "parse_labels",
    "register",
    "server",
    "token_app",
]

ServerOpt = typer.Option(None, "--server", help="Control-plane URL (default $SLMOPS_SERVER_URL or 127.0.0.1:8080).")
TokenOpt = typer.Option(None, "--token", help="Operator API token (default $SLMOPS_TOKEN).")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON.")

token_app = typer.Typer(help="Operator API tokens, managed directly on the local database.", no_args_is_help=True)
enroll_token_app = typer.Typer(help="Enrollment tokens that devices enroll with.", no_args_is_help=True)


def client(server: str | None, token: str | None) -> OperatorClient:
    return OperatorClient(server, token)


def parse_labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"label {item!r} must look like KEY=VALUE, e.g. site=berlin-3")
        labels[key] = value
    return labels


def server(
    host: str | None = typer.Option(None, "--host", help="Address to bind (default $SLMOPS_HOST or 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port to bind (default $SLMOPS_PORT or 8080)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """Run the control plane: migrate the database, then serve the HTTP API.

    Create the first admin token with `slmops token create --role admin --name NAME` before or after.

    Example: slmops server --host 0.0.0.0 --port 8080
    """
    try:
        import uvicorn

        from slmops.control.app import create_app
    except ImportError as exc:
        raise MissingExtraError("server", "`slmops server`", exc.name or "fastapi") from None
    from slmops.control.service import ControlPlane

    updates: dict[str, Any] = {}
    if host is not None:
        updates["host"] = host
    if port is not None:
        updates["port"] = port
    settings = ServerSettings(**updates)
    ControlPlane.open(settings).close()  # migrate before serving, and fail fast on a bad database URL
    console.print(f"slmops control plane on http://{settings.host}:{settings.port} (home {settings.home})")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level)


def _local_plane() -> Any:
    from slmops.control.service import ControlPlane

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
    if role not in ("admin", "operator", "viewer"):
        raise ConfigError(f"--role must be admin, operator or viewer, got {role!r}")
    plane = _local_plane()
    try:
        created = plane.create_api_token(name, role, "cli")
    finally:
        plane.close()
    if json_out:
        print_json(created.model_dump(mode="json"))
        return
    console.print(f"created {created.role} token '{created.name}'; it is shown only this once:")
    typer.echo(created.token)


@token_app.command("list")
def token_list(json_out: bool = JsonOpt) -> None:
    """List operator API tokens (names and roles; secrets are never stored).

    Example: slmops token list
    """
    plane = _local_plane()
    try:
        tokens = plane.api_tokens()
    finally:
        plane.close()
    if json_out:
        print_json([t.model_dump(mode="json") for t in tokens])
        return
    table = Table("name", "role", "created", "by", "revoked")
    for t in tokens:
        table.add_row(t.name, t.role, t.created_at, t.created_by, "yes" if t.revoked else "")
    console.print(table)


@token_app.command("revoke")
def token_revoke(name: str = typer.Argument(..., help="The token's name.")) -> None:
    """Revoke an operator API token at once.

    Example: slmops token revoke alice
    """
    plane = _local_plane()
    try:
        plane.revoke_api_token(name)
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


@enroll_token_app.command("list")
def enroll_token_list(
    server_url: str | None = ServerOpt, token: str | None = TokenOpt, json_out: bool = JsonOpt
) -> None:
    """List enrollment tokens and how often they were used.

    Example: slmops enroll-token list
    """
    with client(server_url, token) as api:
        tokens = api.enrollment_tokens()
    if json_out:
        print_json([t.model_dump(mode="json") for t in tokens])
        return
    table = Table("id", "uses", "expires", "auto-approve", "labels")
    for t in tokens:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(t.labels.items()))
        table.add_row(t.id, f"{t.uses}/{t.max_uses}", t.expires_at, "yes" if t.auto_approve else "", labels)
    console.print(table)


def register(root: typer.Typer) -> None:
    """Add the control-plane commands to the root CLI."""
    from slmops.cli import blueprint, device, telemetry

    root.command("server")(server)
    root.add_typer(token_app, name="token")
    root.add_typer(enroll_token_app, name="enroll-token")
    root.add_typer(device.app, name="device")
    root.command("apply")(blueprint.apply)
    root.command("plan")(blueprint.plan)
    root.add_typer(blueprint.app, name="blueprint")
    root.add_typer(telemetry.app, name="telemetry")
