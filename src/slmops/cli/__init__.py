"""The `slmops` command line: thin Typer commands over the library, Rich output, `--json` for machines."""

from __future__ import annotations

import logging
import os
import sys

import typer

from slmops import __version__
from slmops.errors import SLMOpsError

__all__ = ["app", "main", "run"]

app = typer.Typer(
    name="slmops",
    help=(
        "Operate small language models on fleets of edge devices: optimize, register, release, run, watch.\n\n"
        "State lives in SLMOPS_HOME (default ~/.slmops).\n\n"
        "Example: slmops model pull gemma3-270m && slmops model list"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"slmops {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version, is_eager=True
    ),
) -> None:
    """slmops command line."""


def _register() -> None:
    """Add every command group to the root CLI; the one place that knows them all."""
    from slmops.cli import (
        agent,
        alerts,
        blueprint,
        cost,
        dataset,
        demo,
        device,
        drift,
        feedback,
        improve,
        keys,
        model,
        optimize,
        pipeline,
        rollout,
        select,
        serve,
        server,
        sim,
        site,
        telemetry,
        tokens,
    )

    app.add_typer(model.app, name="model")
    app.add_typer(pipeline.app, name="pipeline")
    model.app.command("select")(select.select)
    app.add_typer(keys.app, name="keys")
    app.add_typer(optimize.app, name="optimize")
    app.command("server")(server.server)
    app.add_typer(tokens.token_app, name="token")
    app.add_typer(tokens.enroll_token_app, name="enroll-token")
    app.add_typer(device.app, name="device")
    app.command("apply")(blueprint.apply)
    app.command("plan")(blueprint.plan)
    app.add_typer(blueprint.app, name="blueprint")
    app.add_typer(telemetry.app, name="telemetry")
    app.add_typer(drift.app, name="drift")
    app.add_typer(alerts.app, name="alerts")
    app.add_typer(feedback.app, name="feedback")
    app.add_typer(dataset.app, name="dataset")
    app.command("improve")(improve.improve)
    app.command("cost")(cost.cost)
    app.add_typer(agent.app, name="agent")
    app.add_typer(rollout.app, name="rollout")
    app.add_typer(site.app, name="site")
    app.command("serve")(serve.serve)
    app.command("demo")(demo.demo)
    app.command("sim")(sim.sim)


_register()


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; an SLMOpsError becomes a one-line message, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    command = typer.main.get_command(app)
    try:
        result = command.main(
            args=argv if argv is not None else sys.argv[1:], prog_name="slmops", standalone_mode=False
        )
    except SLMOpsError as exc:
        from slmops.cli._common import err_console

        err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:  # a usage error: an unknown command, a bad option value, a missing argument
        show = getattr(exc, "show", None)  # typer's (vendored click) errors print the usage and a --help hint
        if show is not None:
            show()
        else:
            print(f"Error: {exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("SLMOPS_DEBUG"):
            raise
        print(
            f"internal error: {type(exc).__name__}: {exc}\n"
            "this is a bug in slmops; re-run with SLMOPS_DEBUG=1 for a traceback and report it",
            file=sys.stderr,
        )
        return 70
    return result if isinstance(result, int) else 0


def main() -> None:
    sys.exit(run())
