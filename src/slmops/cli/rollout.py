"""`slmops rollout start|list|status|events|pause|resume|abort|promote`: releases over the control-plane API.

The commands are thin: parse, call :class:`~slmops.control.client.OperatorClient`, render. :func:`render_release`
turns a :class:`~slmops.control.schemas.ReleasePublic` into a Rich renderable without any I/O (the clock is passed
in), so ``status`` and ``status --watch`` draw the same thing and tests can check it directly.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from slmops.cli._common import console, err_console, print_json, print_result
from slmops.cli._remote import JsonOpt, ServerOpt, TokenOpt, client, list_command
from slmops.control.client import OperatorClient
from slmops.control.schemas import ClassProgress, ReleaseEventPublic, ReleasePublic, ReleaseStart
from slmops.core.rollout import RolloutPolicy
from slmops.errors import ConfigError, NotFoundError

__all__ = [
    "ACTIVE_STATES",
    "app",
    "build_policy",
    "format_event",
    "parse_duration",
    "parse_stages",
    "render_release",
    "watch_exit_code",
]

ACTIVE_STATES = ("running", "paused")
STATE_STYLE = {"running": "cyan", "paused": "yellow", "completed": "green", "halted": "red", "aborted": "red"}
STATUS_STYLE = {"pass": "green", "wait": "yellow", "fail": "bold red", "not judged": "dim"}
VERDICT_STYLE = {"pass": "green", "wait": "yellow", "fail": "bold red"}

app = typer.Typer(
    help=(
        "Releases: move a blueprint to a new model version stage by stage (1% -> 10% -> 50% -> 100% by default), "
        "judged by gates per device class, rolled back when a gate fails.\n\n"
        "Example: slmops rollout start tills --to gemma3-270m@v2 --watch"
    ),
    no_args_is_help=True,
)
IdArg = typer.Argument(..., help="The release id, e.g. rel-3f2a9c81d0 (see `slmops rollout list`).")


# ---------------------------------------------------------------------------------------------------- parsing


def parse_stages(text: str) -> tuple[float, ...]:
    """``"1,10,50,100"`` (percent of each device class) -> ``(0.01, 0.1, 0.5, 1.0)``."""
    example = "e.g. --stages 1,10,50,100"
    items = [item.strip().removesuffix("%").strip() for item in text.split(",")]
    try:
        percents = [float(item) for item in items]
    except ValueError:
        raise ConfigError(f"--stages takes comma-separated percentages, {example}; got {text!r}") from None
    for percent in percents:
        if not (math.isfinite(percent) and 0 < percent <= 100):
            raise ConfigError(f"--stages: every stage is a percentage in (0, 100], {example}; got {text!r}")
    if any(b <= a for a, b in itertools.pairwise(percents)):
        raise ConfigError(f"--stages must grow strictly, {example}; got {text!r}")
    if percents[-1] != 100:
        raise ConfigError(f"--stages must end at 100 (the whole fleet), {example}; got {text!r}")
    return tuple(round(p / 100, 10) for p in percents)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``"600"`` / ``"600s"`` / ``"10m"`` / ``"1.5h"`` / ``"1d"`` -> seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ConfigError(f"--soak takes a duration such as 600, 90s, 10m, 2h or 1d; got {text!r}")
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]


def _load_policy_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise NotFoundError(f"policy file {path} does not exist; write a YAML RolloutPolicy (stages, soak_s, gates)")
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"policy file {path} is not valid YAML ({exc}); fix it and try again") from None
    if isinstance(value, dict) and set(value) == {"rollout"} and isinstance(value["rollout"], dict):
        value = value["rollout"]  # the `rollout:` section copied from a blueprint's spec
    if not isinstance(value, dict):
        raise ConfigError(
            f"policy file {path} must hold a mapping such as `stages: [0.01, 0.1, 1.0]` and `soak_s: 600`; "
            f"found {type(value).__name__}"
        )
    return value


def build_policy(
    base: Mapping[str, Any] | None, stages: tuple[float, ...] | None, soak_s: float | None, min_devices: int | None
) -> RolloutPolicy | None:
    """The policy a start sends: ``base`` (a policy file's fields) with the flags on top; None when nothing given."""
    if base is None and stages is None and soak_s is None and min_devices is None:
        return None
    fields: dict[str, Any] = dict(base or {})
    if stages is not None:
        fields["stages"] = stages
    if soak_s is not None:
        fields["soak_s"] = soak_s
    if min_devices is not None:
        fields["min_reporting_devices"] = min_devices
    try:
        return RolloutPolicy.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'policy'}: {error['msg']}" for error in exc.errors()
        )
        raise ConfigError(f"invalid rollout policy: {problems}") from None


# ---------------------------------------------------------------------------------------------------- rendering


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.4g}%"


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 120:
        return f"{value / 60:.0f} min"
    return f"{value:.0f} s"


def stages_text(release: ReleasePublic) -> Text:
    text = Text()
    for i, fraction in enumerate(release.stages, start=1):
        if i > 1:
            text.append(" -> ", style="dim")
        if i == release.stage:
            text.append(f"[{_pct(fraction)}]", style="bold")
        else:
            text.append(_pct(fraction), style="dim" if i > release.stage else "")
    return text


def _state(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def _bar(done: int, total: int) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_row(ProgressBar(total=max(total, 1), completed=min(done, total), width=10), Text(f"{done}/{total}"))
    return grid


def _number(value: Any, percent: bool = False) -> str:
    if not isinstance(value, int | float):
        return str(value)
    if percent:
        return f"{value * 100:.3g}%"
    return f"{value:.3g}"


def gate_text(gate: Mapping[str, Any]) -> Text:
    """One gate verdict with its key numbers: ``latency pass p=0.41 ratio 1.02``."""
    verdict = str(gate.get("verdict", "?"))
    numbers: Mapping[str, Any] = gate.get("numbers") or {}
    parts: list[str] = []
    if "p_value" in numbers:
        parts.append(f"p={_number(numbers['p_value'])}")
    if "ratio" in numbers:
        parts.append(f"ratio {_number(numbers['ratio'])}")
    if "canary_rate" in numbers and "baseline_rate" in numbers:
        rates = f"{_number(numbers['canary_rate'], True)} vs {_number(numbers['baseline_rate'], True)}"
        parts.append(f"rate {rates}")
    elif "rate" in numbers:
        limit = f" (max {_number(numbers['max_rate'], True)})" if "max_rate" in numbers else ""
        parts.append(f"rate {_number(numbers['rate'], True)}{limit}")
    if "canary_count" in numbers:
        parts.append(f"count {_number(numbers['canary_count'])}")
    if not parts and verdict == "wait" and "canary_n" in numbers:
        parts.append(f"n={_number(numbers['canary_n'])}")
    text = Text(f"{gate.get('gate', '?')} ")
    text.append(verdict, style=VERDICT_STYLE.get(verdict, ""))
    if parts:
        text.append(" " + ", ".join(parts), style="dim")
    return text


def _class_row(progress: ClassProgress) -> list[RenderableType]:
    gates = Text("\n").join(gate_text(g) for g in progress.gates) if progress.gates else Text("-", style="dim")
    return [
        progress.device_class,
        _bar(progress.switched, progress.members),
        _bar(progress.members, progress.devices),
        str(progress.reporting),
        str(progress.online_members),
        Text(str(progress.rolled_back), style="red" if progress.rolled_back else ""),
        Text(progress.status, style=STATUS_STYLE.get(progress.status, "")),
        gates,
    ]


def render_release(release: ReleasePublic, now: datetime) -> RenderableType:
    """The release as a Rich renderable: header, stage and soak, then one row per device class. Pure."""
    header = Text()
    header.append(f"release {release.id}", style="bold")
    header.append(f"  {release.blueprint}: {release.from_version or 'nothing'} -> {release.to_version}  ")
    header.append_text(_state(release.state))
    stage = Text(f"stage {release.stage}/{len(release.stages)}  ")
    stage.append_text(stages_text(release))
    end = _parse_time(release.finished_at) if release.finished_at else now
    soaked = max(0.0, (end - _parse_time(release.stage_started_at)).total_seconds())
    done = " (soaked)" if soaked >= release.soak_s else ""
    stage.append(f"  soak {_seconds(soaked)} of {_seconds(release.soak_s)}{done}")
    lines: list[RenderableType] = [header, stage, Text(f"reason: {release.reason}")]
    started = f"started {release.started_at} by {release.created_by}"
    if release.finished_at:
        started += f", finished {release.finished_at}"
    evaluated = f"; last evaluated {release.evaluated_at}" if release.evaluated_at else "; not evaluated yet"
    lines.append(Text(started + evaluated, style="dim"))
    if release.classes:
        table = Table("class", "switched", "stage coverage", "reporting", "online", "rolled back", "status", "gates")
        for progress in release.classes:
            table.add_row(*_class_row(progress))
        lines.append(table)
        for progress in release.classes:
            if progress.status != "pass" and progress.reason:
                note = Text(f"{progress.device_class}: ", style=STATUS_STYLE.get(progress.status, ""))
                note.append(progress.reason, style="")
                lines.append(note)
    else:
        lines.append(Text("no per-class progress yet: the controller has not evaluated this stage", style="dim"))
    return Group(*lines)


def format_event(event: ReleaseEventPublic) -> str:
    return f"{event.time}  stage {event.stage}  {event.kind:<9}  {event.actor}  {event.message}"


def watch_exit_code(release: ReleasePublic) -> int:
    """0 when the release completed, 1 when it was halted or aborted (or still runs)."""
    return 0 if release.state == "completed" else 1


def _summary(release: ReleasePublic) -> Text:
    text = Text(f"{release.id}: ")
    text.append_text(_state(release.state))
    text.append(f" at stage {release.stage}/{len(release.stages)} ({_pct(release.stages[release.stage - 1])})")
    text.append(f"; {release.reason}")
    return text


# ---------------------------------------------------------------------------------------------------- watching


def _now() -> datetime:
    return datetime.now(UTC)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _watch(
    api: OperatorClient,
    release_id: str,
    interval_s: float,
    json_out: bool,
) -> int:
    """Re-render the release until it leaves running/paused; the exit code of :func:`watch_exit_code`."""
    from rich.live import Live

    current = api.rollout(release_id)
    try:
        if json_out or not console.is_terminal:
            while current.state in ACTIVE_STATES:
                _sleep(interval_s)
                current = api.rollout(release_id)
        else:
            with Live(render_release(current, _now()), console=console, auto_refresh=False) as live:
                while current.state in ACTIVE_STATES:
                    _sleep(interval_s)
                    current = api.rollout(release_id)
                    live.update(render_release(current, _now()), refresh=True)
    except KeyboardInterrupt:
        err_console.print(
            f"stopped watching; release {release_id} goes on (`slmops rollout status {release_id}`, "
            f"`slmops rollout abort {release_id}`)"
        )
        raise typer.Exit(130) from None
    if json_out:
        print_json(current.model_dump(mode="json"))
    else:
        if not console.is_terminal:
            console.print(render_release(current, _now()))
        console.print(_summary(current))
    return watch_exit_code(current)


# ---------------------------------------------------------------------------------------------------- commands


@app.command("start")
def start(
    blueprint: str = typer.Argument(..., help="The blueprint whose devices move, e.g. tills."),
    to: str = typer.Option(..., "--to", help="The new version: NAME@vN, NAME@ALIAS or a digest."),
    stages: str | None = typer.Option(None, "--stages", help="Stages in percent of each class, e.g. 1,10,50,100."),
    soak: str | None = typer.Option(None, "--soak", help="Soak time per stage: 600, 90s, 10m, 2h."),
    min_devices: int | None = typer.Option(
        None, "--min-devices", min=1, help="Reporting canaries needed per class before a stage is judged."
    ),
    policy_file: Path | None = typer.Option(
        None, "--policy", help="A YAML RolloutPolicy (stages as fractions, soak_s, gates); the flags override it."
    ),
    watch: bool = typer.Option(False, "--watch", help="Then follow the release until it finishes (exit 1 if not ok)."),
    interval: float = typer.Option(2.0, "--interval", min=0.05, help="Seconds between refreshes with --watch."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Start a release of BLUEPRINT to a new model version; canaries of the first stage are chosen at once.

    Without --stages/--soak/--min-devices/--policy the server uses the blueprint's spec.rollout, else the defaults
    (1% -> 10% -> 50% -> 100%, 10 min soak).

    Example: slmops rollout start tills --to gemma3-270m@v2 --stages 5,50,100 --soak 10m
    """
    policy = build_policy(
        _load_policy_file(policy_file) if policy_file is not None else None,
        parse_stages(stages) if stages is not None else None,
        parse_duration(soak) if soak is not None else None,
        min_devices,
    )
    with client(server_url, token) as api:
        started = api.start_rollout(ReleaseStart(blueprint=blueprint, to=to, policy=policy))
        if not watch:
            if json_out:
                print_json(started.model_dump(mode="json"))
                return
            stage_list = " -> ".join(_pct(f) for f in started.stages)
            console.print(
                f"started release [bold]{started.id}[/]: {started.blueprint} "
                f"{started.from_version or 'nothing'} -> {started.to_version}, stages {stage_list}, "
                f"soak {_seconds(started.soak_s)}"
            )
            console.print(f"follow it with `slmops rollout status {started.id} --watch`")
            return
        if not json_out:
            console.print(f"started release [bold]{started.id}[/]")
        code = _watch(api, started.id, interval, json_out)
    raise typer.Exit(code)


def _print_releases(releases: list[ReleasePublic]) -> None:
    table = Table("id", "blueprint", "state", "from -> to", "stage", "started", "reason")
    for r in releases:
        stage = f"{r.stage}/{len(r.stages)} ({_pct(r.stages[r.stage - 1])})"
        moving = f"{r.from_version or 'nothing'} -> {r.to_version}"
        table.add_row(r.id, r.blueprint, _state(r.state), moving, stage, r.started_at, r.reason)
    console.print(table)


list_ = app.command("list")(
    list_command(
        OperatorClient.rollouts,
        _print_releases,
        "Only releases in this state: running, paused, ...",
        """List releases, newest first.

    Example: slmops rollout list --state running
    """,
    )
)


@app.command("status")
def status(
    release_id: str = IdArg,
    watch: bool = typer.Option(
        False, "--watch", help="Re-render until the release finishes; exit 0 when completed, 1 when halted/aborted."
    ),
    interval: float = typer.Option(2.0, "--interval", min=0.05, help="Seconds between refreshes with --watch."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show a release: state, stage, soak, and per device class its canaries, reporting devices and gate verdicts.

    Example: slmops rollout status rel-3f2a9c81d0 --watch
    """
    with client(server_url, token) as api:
        if watch:
            code = _watch(api, release_id, interval, json_out)
            raise typer.Exit(code)
        found = api.rollout(release_id)
    if json_out:
        print_json(found.model_dump(mode="json"))
        return
    console.print(render_release(found, _now()))


@app.command("events")
def events(
    release_id: str = IdArg,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new events until the release finishes."),
    interval: float = typer.Option(2.0, "--interval", min=0.05, help="Seconds between polls with --follow."),
    server_url: str | None = ServerOpt,
    token: str | None = TokenOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Print a release's events (every decision, with who made it); --json prints one JSON object per line.

    Example: slmops rollout events rel-3f2a9c81d0 --follow
    """

    def emit(batch: Sequence[ReleaseEventPublic]) -> None:
        for event in batch:
            if json_out:
                typer.echo(json.dumps(event.model_dump(mode="json"), sort_keys=True, ensure_ascii=False))
            else:
                typer.echo(format_event(event))

    after = 0
    try:
        with client(server_url, token) as api:
            while True:
                finished = follow and api.rollout(release_id).state not in ACTIVE_STATES
                batch = api.rollout_events(release_id, after=after)
                emit(batch)
                if batch:
                    after = batch[-1].id
                    continue  # drain before sleeping or stopping
                if not follow or finished:
                    return
                _sleep(interval)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _operator_action(name: str, change: Callable[[OperatorClient, str], ReleasePublic], summary: str) -> None:
    """Register ``slmops rollout NAME RELEASE_ID``: one operator action on a release, then where it is now."""

    def command(
        release_id: str = IdArg,
        server_url: str | None = ServerOpt,
        token: str | None = TokenOpt,
        json_out: bool = JsonOpt,
    ) -> None:
        with client(server_url, token) as api:
            changed = change(api, release_id)
        print_result(changed, json_out, lambda release: console.print(_summary(release)))

    command.__doc__ = f"{summary}\n\nExample: slmops rollout {name} rel-3f2a9c81d0"
    app.command(name)(command)


_operator_action(
    "pause",
    OperatorClient.pause_rollout,
    "Pause a running release: no promotion and no new canaries (a critical gate failure still halts it).",
)
_operator_action("resume", OperatorClient.resume_rollout, "Resume a paused release.")
_operator_action(
    "abort", OperatorClient.abort_rollout, "Abort a release: every device returns to the previous version."
)
_operator_action(
    "promote",
    OperatorClient.promote_rollout,
    "Promote now: the next stage (or completion from the last) without waiting for soak time or gates.",
)
