"""End to end on loopback: a release fails its latency gate and three real agents switch back.

A real `slmops server` (with its rollout controller ticking every half second) and three real `slmops agent`
processes of the same device class serve v1 of a tiny model. v2 is healthy (it passes every agent's activation
probe) but much larger: 4 layers of width 512 instead of 2 of width 64, so a chat completion takes on the order of
100 ms on llama.cpp instead of a few ms. A release to v2 with stages [0.5, 1.0] puts it on two of the three
devices; the test sends chat completions to every agent's local API, the agents send short telemetry windows, and
the critical latency gate (median ratio above 2, Mann-Whitney p below 0.01) must halt the release. Every agent must
then be back on v1 (the slot it kept) and still answer.

The soak time is long on purpose: the stage can never be promoted during the test, so the only way out of stage 1 is
a gate failing (a critical gate halts whatever the soak time), and nothing but the two canaries ever runs v2.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.cli import run
from slmops.config import Settings
from slmops.control.client import OperatorClient
from slmops.control.schemas import ReleaseEventPublic, ReleaseStart
from slmops.core.cohorts import stage_members
from slmops.core.rollout import GateSpec, RolloutPolicy
from slmops.registry import Registry
from tests.agent.test_e2e_control_plane import Fleet, GiB, _wait
from tests.servers import free_port
from tests.tiny_gguf import write_tiny_gguf

BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: tills}
spec:
  selector: {labels: {site: rollout-e2e}}
  model: {name: tiny, ref: v1}
  runtime: {threads: 1, context_tokens: 512, port: 18089}
"""

LATENCY_GATE = "median-latency"
MAX_RATIO = 2.0
ALPHA = 0.01
POLICY = RolloutPolicy(
    stages=(0.5, 1.0),  # one class of 3 devices: ceil(0.5 * 3) = 2 canaries
    soak_s=3600.0,  # never promoted while the test runs: leaving stage 1 needs a failing gate
    min_reporting_devices=1,
    gates=(
        GateSpec(name="crashes", metric="crashes", min_samples=1, critical=True),
        GateSpec(name="rollbacks", metric="rollbacks", min_samples=1, max_rate=0.05, critical=True),
        # The median, not the p95: the baseline's windows include the seconds when the canaries download, probe and
        # load v2 on the same 2 shared cores, which also slows v1's requests; its tail measures that contention.
        GateSpec(
            name=LATENCY_GATE,
            metric="latency",
            min_samples=20,
            max_ratio=MAX_RATIO,
            alpha=ALPHA,
            quantile=0.5,
            critical=True,
        ),
    ),
)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    yield fleet
    for name in list(fleet.procs):
        fleet.stop(name, signal.SIGKILL)


class Traffic:
    """Chat completions to each agent's local API in turn, from a thread, until stopped. Every prompt is new (a
    counter first), so llama.cpp cannot reuse a cached prefix and each request costs a full prompt evaluation."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.ok: dict[int, int] = dict.fromkeys(ports, 0)
        self.failed: dict[int, int] = dict.fromkeys(ports, 0)
        self.models: dict[int, set[str]] = {p: set() for p in ports}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def _run(self) -> None:
        n = 0
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                for port in self.ports:
                    n += 1
                    prompt = f"{n} " + "the quick brown fox jumps over the lazy dog " * 3
                    try:
                        answer = client.post(
                            f"http://127.0.0.1:{port}/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 4},
                        )
                    except httpx.HTTPError:
                        self.failed[port] += 1
                        self._stop.wait(0.05)  # the agent is switching versions: its API is briefly away
                        continue
                    if answer.status_code == 200:
                        self.ok[port] += 1
                        self.models[port].add(answer.json()["model"])
                    else:
                        self.failed[port] += 1

    def summary(self) -> str:
        return f"traffic ok={self.ok} failed={self.failed} models={self.models}"


def _slow_but_healthy(path: Path) -> Path:
    """A tiny-model file about 150 times larger than v1 (4 layers of width 512 instead of 2 of width 64) that passes
    the agents' activation probe. Random weights this wide often generate degenerate text at temperature 0, which
    the probe rightly refuses, so seeds are tried in turn with the agent's own probe settings (seed 4 passes with
    llama-cpp-python 0.3.36; the loop keeps the test independent of that)."""
    from slmops.runtime import BackendConfig, LlamaCppBackend, ModelInfo, ProbeConfig, probe_backend

    config = BackendConfig(context_tokens=512, threads=1)  # the blueprint's runtime
    reasons = []
    for seed in range(4, 20):
        write_tiny_gguf(path, n_layers=4, n_embd=512, n_head=8, n_head_kv=4, n_ff=2048, context_length=512, seed=seed)
        info = ModelInfo.from_gguf(path, context_tokens=config.context_tokens)
        backend = LlamaCppBackend.load(path, info.model_id, config)
        try:
            result = probe_backend(backend, info, ProbeConfig(max_tokens=16))
        finally:
            backend.close()
        if result.ok:
            return path
        reasons.append(f"seed {seed}: {result.reason}")
    pytest.fail(f"no seed gave a large tiny model that passes the probe: {reasons}")


def _chat_model(port: int) -> str:
    answer = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    model: str = answer.json()["model"]
    return model


def _halted_event(events: list[ReleaseEventPublic]) -> ReleaseEventPublic:
    halted = [e for e in events if e.kind == "halted"]
    assert len(halted) == 1, [(e.kind, e.message) for e in events]
    return halted[0]


def _latency_gate(numbers: dict[str, Any]) -> dict[str, Any]:
    """The latency gate's result in the failing class of a halted event's numbers."""
    failed = [c for c in numbers["classes"] if c["status"] == "fail"]
    assert len(failed) == 1, numbers
    gates = {g["gate"]: g for g in failed[0]["gates"]}
    assert gates[LATENCY_GATE]["verdict"] == "fail", numbers
    assert {g for g, r in gates.items() if r["verdict"] == "fail"} == {LATENCY_GATE}, numbers
    result: dict[str, Any] = gates[LATENCY_GATE]
    return result


def test_a_slower_version_fails_its_latency_gate_and_every_agent_switches_back(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: v1 (tiny, fast) and v2 (healthy, much larger, so slow) of one model; a server whose controller ticks
    # fast; three agents of the same class with 2-second telemetry windows; the blueprint on v1 everywhere.
    registry = Registry.open(Settings())
    models = tmp_path / "models"
    v1 = registry.import_model(write_tiny_gguf(models / "v1.gguf", context_length=512, seed=1), "tiny").envelope
    v2 = registry.import_model(_slow_but_healthy(models / "v2.gguf"), "tiny").envelope
    assert (v1.manifest.version, v2.manifest.version) == ("v1", "v2")
    registry.close()
    for name, value in {
        "SLMOPS_ROLLOUT_TICK_S": "0.5",
        "SLMOPS_ROLLOUT_LEASE_S": "5",
        "SLMOPS_DESIRED_CACHE_TTL_S": "0.2",
    }.items():
        monkeypatch.setenv(name, value)
    fleet.start_server(capsys, monkeypatch)
    assert (
        run(["enroll-token", "create", "--uses", "3", "--auto-approve", "--label", "site=rollout-e2e", "--json"]) == 0
    )
    enroll_token = json.loads(capsys.readouterr().out)["token"]
    api_ports = [free_port() for _ in range(3)]
    for i, api_port in enumerate(api_ports):
        fleet.start(
            f"agent-{i}",
            [
                "agent",
                "--server",
                fleet.url,
                "--enroll-token",
                enroll_token,
                "--data-dir",
                str(tmp_path / f"agent-{i}"),
                "--memory-bytes",
                str(8 * GiB),
                "--poll-interval-s",
                "0.5",
                "--probation-s",
                "1",
                "--telemetry-window-s",
                "2",
                "--api-port",
                str(api_port),
            ],
        )
    _wait("three enrolled devices", lambda: len(fleet.devices()) == 3, 60, fleet.logs)
    blueprint = tmp_path / "blueprint.yaml"
    blueprint.write_text(BLUEPRINT)
    assert run(["apply", "-f", str(blueprint)]) == 0, capsys.readouterr().err
    _wait(
        "all three agents on v1",
        lambda: all(d["active_digest"] == v1.digest for d in fleet.devices()),
        60,
        fleet.logs,
        fleet.diagnose,
    )
    with OperatorClient(fleet.url, fleet.token) as operator:
        devices = {d.id: d.device_class for d in operator.devices()}
        assert len(set(devices.values())) == 1, devices  # one class: canaries and baseline are compared within it

        # Execute: traffic on every agent, and a release to v2.
        with Traffic(api_ports) as traffic:
            started = operator.start_rollout(ReleaseStart(blueprint="tills", to="tiny@v2", policy=POLICY))
            assert (started.state, started.stage, started.to_digest) == ("running", 1, v2.digest)

            def diagnose() -> str:
                current = operator.rollout(started.id)
                return f"release {current.state}: {current.reason}\n{traffic.summary()}\n{fleet.diagnose()}"

            _wait(
                "the release to halt", lambda: operator.rollout(started.id).state == "halted", 90, fleet.logs, diagnose
            )

            # Assert: every agent returns to v1 (from the slot it kept) while traffic still flows.
            _wait(
                "all three agents back on v1",
                lambda: all(d.active_digest == v1.digest for d in operator.devices()),
                60,
                fleet.logs,
                diagnose,
            )

        # Assert: the halt names the latency gate, with its numbers.
        halted = operator.rollout(started.id)
        assert halted.stage == 1 and halted.finished_at is not None
        assert LATENCY_GATE in halted.reason, halted.reason
        event = _halted_event(operator.rollout_events(started.id))
        assert event.stage == 1 and event.actor == "controller"
        assert LATENCY_GATE in event.message, event.message
        gate = _latency_gate(event.numbers)["numbers"]
        assert gate["p_value"] < ALPHA, gate
        assert gate["ratio"] > MAX_RATIO, gate
        assert gate["canary_p50"] > gate["baseline_p50"], gate
        assert gate["canary_n"] >= 1 and gate["baseline_n"] >= 1, gate

        # Assert: exactly the stage-1 cohort ran v2, and only they switched back.
        cohort = stage_members(devices, started.id, 0.5)
        assert len(cohort) == 2
        assert [(c.members, c.devices) for c in halted.classes] == [(2, 3)]
        ran_v2 = set()
        for device_id in devices:
            events = operator.device_events(device_id, limit=1000)
            if any(e.kind == "activated" and e.version_digest == v2.digest for e in events):
                ran_v2.add(device_id)
            # back from the kept slot: v1 was downloaded once, before the release
            assert sum(e.kind == "download_started" and e.version_digest == v1.digest for e in events) == 1, events
        assert ran_v2 == cohort, (ran_v2, cohort)
        for device in operator.devices():
            assert device.active_digest == v1.digest, device
            if device.id in cohort:
                assert device.previous_digest == v2.digest, device

    # Assert: every agent still answers, on v1.
    for api_port in api_ports:
        assert _chat_model(api_port) == "tiny@v1"
    assert sum(1 for p in api_ports if "tiny@v2" in traffic.models[p]) == 2, traffic.summary()
