"""`slmops server`: run the control plane."""

from __future__ import annotations

from typing import Any

import typer

from slmops.cli._common import console
from slmops.control.settings import ServerSettings
from slmops.errors import MissingExtraError

__all__ = ["server"]


def server(
    host: str | None = typer.Option(None, "--host", help="Address to bind (default $SLMOPS_HOST or 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", help="Port to bind (default $SLMOPS_PORT or 8080)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
    workers: int = typer.Option(
        1,
        "--workers",
        min=1,
        help="Worker processes (uvicorn's); each reads its settings from the SLMOPS_ environment. The server is "
        "stateless: replicas and workers share the database, and one of them at a time runs the rollout controller.",
    ),
) -> None:
    """Run the control plane: migrate the database, then serve the HTTP API.

    Create the first admin token with `slmops token create --role admin --name NAME` before or after.

    Example: slmops server --host 0.0.0.0 --port 8080 --workers 2
    """
    try:
        import uvicorn

        from slmops.control.app import create_app
    except ImportError as exc:
        raise MissingExtraError("server", "`slmops server`", exc.name or "fastapi") from None
    from slmops.control import ControlPlane

    updates: dict[str, Any] = {}
    if host is not None:
        updates["host"] = host
    if port is not None:
        updates["port"] = port
    settings = ServerSettings(**updates)
    ControlPlane.open(settings).close()  # migrate before serving, and fail fast on a bad database URL
    console.print(f"slmops control plane on http://{settings.host}:{settings.port} (home {settings.home})")
    if workers == 1:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level)
        return
    # Several processes: uvicorn starts each from an import string, and each builds its app from the environment
    # (the same SLMOPS_ variables as this one; --host and --port go to uvicorn, which binds the socket they share).
    uvicorn.run(
        "slmops.control.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        log_level=log_level,
    )
