"""`slmops agent …`: the edge agent daemon, and its local status."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import typer
from rich.table import Table

from slmops.cli._common import console, print_json
from slmops.cli._remote import parse_labels

app = typer.Typer(
    help=(
        "The edge agent: enroll with a control plane, keep the desired model downloaded, verified, probed and "
        "served on 127.0.0.1, roll back by itself.\n\n"
        "Example: slmops agent --server http://cp:8080 --enroll-token T --label site=berlin-3"
    ),
    invoke_without_command=True,
)


def _data_dir(value: Path | None) -> Path:
    from slmops.agent.state import default_data_dir

    return value.expanduser().resolve() if value is not None else default_data_dir()


@app.callback()
def agent(
    ctx: typer.Context,
    server: str | None = typer.Option(None, "--server", help="The control plane's URL (remembered after enrolling)."),
    enroll_token: str | None = typer.Option(None, "--enroll-token", help="Enrollment token, used once."),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Agent data directory (default: $SLMOPS_HOME/agent)."
    ),
    label: list[str] = typer.Option([], "--label", help="A device label key=value sent at enrollment (repeatable)."),
    memory_bytes: int | None = typer.Option(None, "--memory-bytes", help="Report this much RAM instead of measuring."),
    cpu_cores: int | None = typer.Option(None, "--cpu-cores", help="Report this many cores instead of measuring."),
    capabilities_file: Path | None = typer.Option(
        None, "--capabilities-file", help="JSON object of capability fields that override what is measured."
    ),
    poll_interval_s: float | None = typer.Option(
        None, "--poll-interval-s", help="Seconds between polls (default: what the control plane says)."
    ),
    probation_s: float = typer.Option(120.0, "--probation-s", help="Seconds a new version serves before commit."),
    health_interval_s: float = typer.Option(60.0, "--health-interval-s", help="Seconds between health checks."),
    telemetry_window_s: float = typer.Option(
        60.0, "--telemetry-window-s", help="Seconds per telemetry window sent to the control plane."
    ),
    prompt_nll_sample_rate: float = typer.Option(
        0.05,
        "--prompt-nll-sample-rate",
        min=0.0,
        max=1.0,
        help="Fraction of requests whose prompt the model scores (its surprise, a drift signal); 0 turns it off.",
    ),
    api_port: int | None = typer.Option(
        None,
        "--api-port",
        help="Serve the local API on this port instead of the blueprint's (several agents per host).",
    ),
    feedback_opt_in: bool = typer.Option(
        False,
        "--feedback-opt-in",
        help=(
            "This site consents to sending redacted feedback samples (rated prompts and answers) to the control "
            "plane, where the blueprint's spec.feedback.mode is opt_in too. Off by default; the control plane "
            "cannot turn it on."
        ),
    ),
    once: bool = typer.Option(False, "--once", help="One reconcile pass, then exit (for scripts and tests)."),
) -> None:
    """Run the agent: enroll once, then poll, reconcile and serve until stopped (SIGTERM or Ctrl-C).

    Example: slmops agent --server http://127.0.0.1:8080 --enroll-token T --memory-bytes 2147483648
    """
    if ctx.invoked_subcommand is not None:
        return
    from slmops.agent.config import AgentConfig
    from slmops.agent.daemon import Agent

    config = AgentConfig(
        data_dir=_data_dir(data_dir),
        server_url=server,
        enroll_token=enroll_token,
        labels=parse_labels(label),
        poll_interval_s=poll_interval_s,
        probation_s=probation_s,
        health_interval_s=health_interval_s,
        memory_bytes=memory_bytes,
        cpu_cores=cpu_cores,
        capabilities_file=capabilities_file,
        api_port=api_port,
        telemetry_window_s=telemetry_window_s,
        prompt_nll_sample_rate=prompt_nll_sample_rate,
        feedback_opt_in=feedback_opt_in,
    )
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        with Agent(config) as daemon:
            console.print(f"agent data in {config.data_dir}", highlight=False)
            daemon.run(once=once, stop=stop)
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command()
def status(
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Agent data directory (default: $SLMOPS_HOME/agent)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show the local agent's state: device id, active and previous version, phase, health, buffered events.

    Example: slmops agent status --json
    """
    from slmops.agent.local_status import local_status

    info = local_status(_data_dir(data_dir))
    if json_out:
        print_json(info)
        return
    table = Table(show_header=False, box=None)
    for key in (
        "device_id",
        "server",
        "enrollment",
        "active_version",
        "active",
        "previous_version",
        "phase",
        "health",
        "committed",
        "last_error",
        "outbox_events",
    ):
        table.add_row(key.replace("_", " "), "-" if info[key] is None else str(info[key]))
    console.print(table)
