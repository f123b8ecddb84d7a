"""What the commands that talk to a control plane share: the --server/--token/--json options, the client, labels."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer
from pydantic import BaseModel

from slmops.cli._common import print_result
from slmops.control.client import OperatorClient
from slmops.errors import ConfigError

__all__ = ["JsonOpt", "ServerOpt", "TokenOpt", "client", "list_command", "parse_labels"]

M = TypeVar("M", bound=BaseModel)

ServerOpt = typer.Option(None, "--server", help="Control-plane URL (default $SLMOPS_SERVER_URL or 127.0.0.1:8080).")
TokenOpt = typer.Option(None, "--token", help="Operator API token (default $SLMOPS_TOKEN).")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON.")


def client(server: str | None, token: str | None) -> OperatorClient:
    """An operator client for ``--server``/``--token`` (each falls back to its environment variable)."""
    return OperatorClient(server, token)


def parse_labels(items: list[str]) -> dict[str, str]:
    """``["site=berlin-3", " ring = canary"]`` -> ``{"site": "berlin-3", "ring": "canary"}`` (spaces stripped)."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"label {item!r} must look like KEY=VALUE, e.g. site=berlin-3")
        labels[key.strip()] = value.strip()
    return labels


def list_command(
    fetch: Callable[[OperatorClient, str | None], list[M]],
    human: Callable[[list[M]], None],
    state_help: str,
    doc: str,
) -> Callable[..., None]:
    """A `list` command: ``fetch`` what is in the ``--state`` given, print it as JSON or let ``human`` render it."""

    def list_(
        state: str | None = typer.Option(None, "--state", help=state_help),
        server_url: str | None = ServerOpt,
        token: str | None = TokenOpt,
        json_out: bool = JsonOpt,
    ) -> None:
        with client(server_url, token) as api:
            found = fetch(api, state)
        print_result(found, json_out, human)

    list_.__doc__ = doc
    return list_
