"""`slmops agent …`: the edge agent daemon, its local status, and its installation as a systemd service.

`slmops agent install` writes three files under a target root (``/`` on a device, a scratch directory in tests):

- ``etc/systemd/system/slmops-agent.service``: the unit. It runs the agent as a transient user (``DynamicUser``)
  in a read-only system (``ProtectSystem=strict``) whose only writable place is its state directory
  ``/var/lib/slmops-agent`` (``StateDirectory``), restarts it on failure with a growing delay, and hands it the
  enrollment token as a systemd credential (``LoadCredential``), so the token is never on a command line.
- ``etc/slmops/agent.env``: the configuration the unit reads (control plane URL, extra agent options); no secret.
- ``etc/slmops/agent-enroll-token``: the enrollment token, mode 0600, owned by root. The agent needs it once; after
  enrolling it keeps its own credential in the state directory.

The unit in ``packaging/systemd/`` is this rendering with the default options (a test keeps them equal).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import typer
from rich.table import Table

from slmops.cli._common import console, print_json
from slmops.cli._remote import parse_labels
from slmops.errors import ConfigError

__all__ = ["AgentInstall", "app", "install_agent", "read_token_file", "render_agent_unit"]

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
    enroll_token_file: Path | None = typer.Option(
        None,
        "--enroll-token-file",
        help="Read the enrollment token from this file (mode 0600 or stricter), e.g. a systemd credential.",
    ),
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
    tune_budget_s: float = typer.Option(
        30.0,
        "--tune-budget-s",
        min=0.0,
        help="Seconds to measure serving configurations (threads, OpenMP wait policy, batch) when a model is "
        "activated; the best is kept per model and device (0: off, llama.cpp's defaults).",
    ),
    mqtt_url: str | None = typer.Option(
        None,
        "--mqtt-url",
        envvar="SLMOPS_AGENT_MQTT_URL",
        help="An MQTT broker (mqtt://host:1883 or mqtts://host:8883) whose 'poll now' nudges make the agent poll at "
        "once; without it, or while the broker is down, the agent polls at its interval. Needs slmops[mqtt].",
    ),
    mqtt_username: str | None = typer.Option(
        None, "--mqtt-username", envvar="SLMOPS_AGENT_MQTT_USERNAME", help="The broker's subscribe-only device user."
    ),
    mqtt_password_file: Path | None = typer.Option(
        None, "--mqtt-password-file", help="A file holding that user's password (its first line)."
    ),
    mqtt_ca_file: Path | None = typer.Option(
        None, "--mqtt-ca-file", help="mqtts: the CA of the broker's certificate (default: the system's)."
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
    from slmops.agent.nudge import NudgeConfig

    nudge = None
    if mqtt_url is not None:
        password = (
            read_token_file(mqtt_password_file, "MQTT password", "the device user's broker password")
            if mqtt_password_file is not None
            else None
        )
        nudge = NudgeConfig(url=mqtt_url, username=mqtt_username, password=password, ca_file=mqtt_ca_file)
    if enroll_token is not None and enroll_token_file is not None:
        raise ConfigError("pass --enroll-token or --enroll-token-file, not both")
    config = AgentConfig(
        data_dir=_data_dir(data_dir),
        server_url=server,
        enroll_token=read_token_file(enroll_token_file) if enroll_token_file is not None else enroll_token,
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
        tune_budget_s=tune_budget_s,
        restart_for_tuning=True,
        nudge=nudge,
    )
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, _stop)
    restart = None
    try:
        with Agent(config) as daemon:
            console.print(f"agent data in {config.data_dir}", highlight=False)
            daemon.run(once=once, stop=stop)
            restart = daemon.restart_requested
    finally:
        signal.signal(signal.SIGTERM, previous)
    if restart is not None:  # the measured configuration needs another OpenMP wait policy: only a new process has it
        from slmops.agent.daemon import restart_process

        restart_process(restart.omp_wait_policy)


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


# ----------------------------------------------------------------------------------------------- install

UNIT_PATH = Path("etc/systemd/system/slmops-agent.service")
ENV_PATH = Path("etc/slmops/agent.env")
TOKEN_PATH = Path("etc/slmops/agent-enroll-token")
DEFAULT_EXE = "/opt/slmops/bin/slmops"  # where packaging/ and the README install slmops (a venv under /opt)
NEXT_STEPS = "systemctl daemon-reload && systemctl enable --now slmops-agent"
# characters that survive systemd's ExecStart= word splitting and EnvironmentFile= parsing unquoted
_UNSAFE = set(" \t\r\n\"'\\$%`;#")
_HIDDEN_BY_UNIT = (Path("/home"), Path("/root"), Path("/run/user"))  # ProtectHome=yes

_UNIT = """\
# The slmops edge agent. Written by `slmops agent install`; configure it in /etc/slmops/agent.env.
[Unit]
Description=slmops edge agent (keeps the desired model downloaded, verified and served on 127.0.0.1)
Wants=network-online.target
After=network-online.target
# never give up restarting: the delay below grows instead
StartLimitIntervalSec=0

[Service]
Type=exec
EnvironmentFile=/etc/slmops/agent.env
Environment=SLMOPS_HOME=%S/slmops-agent
# the token reaches the agent as a credential (readable by the service only), never on its command line
LoadCredential=enroll-token:/etc/slmops/agent-enroll-token
ExecStart={exe} agent --server ${{SLMOPS_AGENT_SERVER}} --data-dir %S/slmops-agent \\
    --enroll-token-file %d/enroll-token $SLMOPS_AGENT_ARGS
Restart=on-failure
RestartSec=2s
# systemd 254 and newer: the delay grows from RestartSec to RestartMaxDelaySec over RestartSteps (older: fixed)
RestartSteps=8
RestartMaxDelaySec=5min
TimeoutStopSec=30s

# a transient user, a read-only system, and one writable directory: /var/lib/slmops-agent
DynamicUser=yes
StateDirectory=slmops-agent
StateDirectoryMode=0700
UMask=0077
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def render_agent_unit(exe: str = DEFAULT_EXE) -> str:
    """The text of ``slmops-agent.service`` running the ``slmops`` executable at the absolute path ``exe``."""
    if not exe.startswith("/") or _UNSAFE & set(exe):
        raise ConfigError(
            f"the slmops executable for the unit must be an absolute path without spaces, quotes, $ or %; got {exe!r}"
        )
    return _UNIT.format(exe=exe)


def render_agent_env(server: str, args: list[str]) -> str:
    """The text of ``/etc/slmops/agent.env``: the control plane's URL and the agent's other options."""
    return (
        "# Read by slmops-agent.service (written by `slmops agent install`). After a change:\n"
        "#   systemctl restart slmops-agent\n"
        f"SLMOPS_AGENT_SERVER={server}\n"
        "# more `slmops agent` options, separated by spaces (see `slmops agent --help`)\n"
        f"SLMOPS_AGENT_ARGS={' '.join(args)}\n"
    )


def read_token_file(
    path: Path, what: str = "enrollment token", source: str = "the token from `slmops enroll-token create`"
) -> str:
    """The secret (``what``) in ``path``; refuses a file that other users can read (like ssh refuses a key)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} does not exist; write {source} there") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(
            f"{what} file {path} has mode {mode:04o}, so other users can read it; expected 0600 "
            f"or stricter (run `chmod 600 {path}`)"
        )
    token = text.strip()
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"{what} file {path} must hold one secret on one line; found {len(text)} chars")
    return token


@dataclass(frozen=True)
class AgentInstall:
    """What :func:`install_agent` wrote, and the command that starts the service."""

    root: Path
    unit: Path
    env: Path
    token: Path
    exe: str
    next_steps: str = NEXT_STEPS

    def as_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "unit": str(self.unit),
            "env": str(self.env),
            "token": str(self.token),
            "exe": self.exe,
            "next_steps": self.next_steps,
        }


def _agent_args(labels: dict[str, str], api_port: int | None, feedback_opt_in: bool) -> list[str]:
    args: list[str] = []
    for key, value in labels.items():
        args += ["--label", f"{key}={value}"]
    if api_port is not None:
        args += ["--api-port", str(api_port)]
    if feedback_opt_in:
        args.append("--feedback-opt-in")
    for arg in args:
        if not arg or _UNSAFE & set(arg):
            raise ConfigError(
                f"agent option {arg!r} cannot go into agent.env: use no spaces, quotes, $, %, ; or # in labels"
            )
    return args


def install_agent(
    root: Path,
    server: str,
    token: str,
    *,
    labels: dict[str, str] | None = None,
    api_port: int | None = None,
    feedback_opt_in: bool = False,
    exe: str = DEFAULT_EXE,
) -> AgentInstall:
    """Write the agent's unit, its configuration and its enrollment token (mode 0600) under ``root``.

    Each file is replaced atomically, so running it again with other values is safe. Nothing is started: the caller
    runs :data:`NEXT_STEPS`.
    """
    from slmops.agent._files import atomic_write

    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.netloc or _UNSAFE & set(server):
        raise ConfigError(f"--server must be the control plane's http(s) URL, e.g. http://cp:8080; got {server!r}")
    if not token or any(c.isspace() for c in token):
        raise ConfigError("the enrollment token must be one word (from `slmops enroll-token create`)")
    if any(Path(exe).is_relative_to(hidden) for hidden in _HIDDEN_BY_UNIT):
        raise ConfigError(
            f"the unit hides home directories (ProtectHome=yes), so it cannot run {exe}; install slmops outside "
            "them (e.g. `python3 -m venv /opt/slmops`) or pass --exe"
        )
    unit_text = render_agent_unit(exe)
    env_text = render_agent_env(server.rstrip("/"), _agent_args(labels or {}, api_port, feedback_opt_in))
    unit, env, token_path = root / UNIT_PATH, root / ENV_PATH, root / TOKEN_PATH
    try:
        for directory in (unit.parent, env.parent):
            directory.mkdir(parents=True, exist_ok=True)
        atomic_write(token_path, (token + "\n").encode(), mode=0o600)
        os.chmod(token_path, 0o600)  # in case an older file was wider and the umask narrower
        atomic_write(env, env_text.encode(), mode=0o644)
        atomic_write(unit, unit_text.encode(), mode=0o644)
        os.chmod(env, 0o644)
        os.chmod(unit, 0o644)
    except PermissionError as exc:
        raise ConfigError(
            f"cannot write {exc.filename}: permission denied; run as root (sudo) or pass --root DIR"
        ) from None
    return AgentInstall(root, unit, env, token_path, exe)


def _default_exe() -> str:
    beside = Path(sys.executable).with_name("slmops")  # the venv this command runs from
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("slmops")
    if found is None:
        raise ConfigError("cannot find the slmops executable for the unit; pass --exe /path/to/slmops")
    return str(Path(found).absolute())


@app.command()
def install(
    server: str = typer.Option(..., "--server", help="The control plane's URL."),
    enroll_token: str | None = typer.Option(None, "--enroll-token", help="The enrollment token (used once)."),
    enroll_token_file: Path | None = typer.Option(
        None, "--enroll-token-file", help="Read the enrollment token from this file (mode 0600) instead."
    ),
    label: list[str] = typer.Option([], "--label", help="A device label key=value sent at enrollment (repeatable)."),
    api_port: int | None = typer.Option(None, "--api-port", help="Serve the local API on this port."),
    feedback_opt_in: bool = typer.Option(False, "--feedback-opt-in", help="This site consents to feedback upload."),
    root: Path = typer.Option(Path("/"), "--root", help="Write under this directory instead of / (for images)."),
    exe: str | None = typer.Option(
        None, "--exe", help="The slmops executable the unit runs (default: the one running this command)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Install the agent as a systemd service: write its unit, its config and its enrollment token (mode 0600).

    Then run `systemctl daemon-reload && systemctl enable --now slmops-agent`; the agent keeps its state in
    /var/lib/slmops-agent (see it with `slmops agent status --data-dir /var/lib/slmops-agent`).

    Example: sudo /opt/slmops/bin/slmops agent install --server http://cp:8080 --enroll-token-file token.txt
    """
    if (enroll_token is None) == (enroll_token_file is None):
        raise ConfigError("pass exactly one of --enroll-token TOKEN or --enroll-token-file PATH")
    token = read_token_file(enroll_token_file) if enroll_token_file is not None else str(enroll_token)
    result = install_agent(
        root.absolute(),
        server,
        token,
        labels=parse_labels(label),
        api_port=api_port,
        feedback_opt_in=feedback_opt_in,
        exe=exe or _default_exe(),
    )
    if json_out:
        print_json(result.as_dict())
        return
    for what, path in (("unit", result.unit), ("config", result.env), ("enrollment token (0600)", result.token)):
        console.print(f"wrote {what}: {path}", highlight=False)
    console.print(f"next: {result.next_steps}", highlight=False)
    if result.root != Path("/"):
        console.print(f"(files are under {result.root}; copy them to / on the device first)", highlight=False)
