"""End to end on loopback: a real `slmops server` process and three real `slmops agent` processes.

Each agent reports a different amount of RAM (2, 8 and 16 GiB); one blueprint with a memory policy must put a
different variant on each, every agent must answer on its local OpenAI-compatible API, and a blueprint change to a
new version must converge on all of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.cli import run
from slmops.config import Settings
from slmops.core.manifest import Lineage, Recipe, RecipeStep, Source
from slmops.registry import Registry
from tests.servers import SLMOPS_EXE, free_port
from tests.tiny_gguf import write_tiny_gguf

GiB = 1 << 30


def _wait(
    what: str, check: Callable[[], bool], timeout_s: float, logs: list[Path], diagnose: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
            pytest.fail(f"timed out waiting for {what}\n{diagnose()}\n{tails}")
        time.sleep(0.3)


class Fleet:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Path] = []
        self.url = ""
        self.token = ""

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        with log.open("ab") as out:
            proc = subprocess.Popen([SLMOPS_EXE, *argv], stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
        self.procs[name] = proc
        return proc

    def start_server(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        """Start `slmops server` on a free port, wait until it answers, and point the CLI at it with an admin token."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.start("server", ["server", "--port", str(port)])
        _wait("the server", lambda: _healthy(self.url), 60, self.logs)
        capsys.readouterr()
        assert run(["token", "create", "--role", "admin", "--name", "root", "--json"]) == 0
        self.token = json.loads(capsys.readouterr().out)["token"]
        monkeypatch.setenv("SLMOPS_SERVER_URL", self.url)
        monkeypatch.setenv("SLMOPS_TOKEN", self.token)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def diagnose(self) -> str:
        lines = []
        for device in self.devices():
            answer = httpx.get(
                f"{self.url}/api/v1/devices/{device['id']}/desired",
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=10,
            )
            desired = answer.json()
            lines.append(
                f"{device['id']} mem={device['capabilities']['memory_bytes']} labels={device['labels']} "
                f"phase={device['phase']} active={device['active_version']} error={device['last_error']} "
                f"desired model={(desired.get('model') or {}).get('variant')} reason={desired.get('reason')}"
            )
        return "\n".join(lines)

    def devices(self) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/devices", headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        answer.raise_for_status()
        result: list[dict[str, Any]] = answer.json()
        return result


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    yield fleet
    for name in list(fleet.procs):
        fleet.stop(name, signal.SIGKILL)


def _register_variants(registry: Registry, tmp_path: Path) -> dict[str, str]:
    """A base model and three variants whose metrics (test data) make 2, 8 and 16 GiB devices choose differently.

    The base has no perplexity (never evaluated), so the best-quality policy prefers any evaluated variant."""
    base = registry.import_model(write_tiny_gguf(tmp_path / "models" / "base.gguf", seed=1), "tiny").envelope
    registry.tag("tiny@v1", "stable")
    digests = {"base": base.digest}
    for variant, seed, ppl, rss in (
        ("f16", 5, 10.0, 6 * GiB),
        ("q8_0", 2, 10.1, 3 * GiB),
        ("q4_0", 3, 11.0, int(0.9 * GiB)),
    ):
        path = write_tiny_gguf(tmp_path / "models" / f"{variant}.gguf", seed=seed, file_type="F16")
        result = registry.register(
            "tiny",
            "gguf",
            {path.name: path},
            facts=base.manifest.facts,
            runtime=base.manifest.runtime,
            weight_bytes=path.stat().st_size,
            source=Source(kind="derived", origin=base.digest),
            lineage=Lineage(
                parents=[base.digest], recipe=Recipe(name="e2e", steps=[RecipeStep(pass_name="quantize", params={})])
            ),
            variant=variant,
            metrics={"perplexity": ppl, "peak_rss_bytes": float(rss)},
        )
        digests[variant] = result.envelope.digest
    return digests


BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata: {{name: tills}}
spec:
  priority: 10
  selector: {{labels: {{site: e2e}}}}
  model: {{name: tiny, ref: {ref}}}
  variant:
    policy: {{objective: best_quality, max_memory_fraction: 0.5}}
  runtime: {{threads: 1, context_tokens: 128, port: 18089}}
"""


def _apply(tmp_path: Path, ref: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"blueprint-{ref}.yaml"
    path.write_text(BLUEPRINT.format(ref=ref))
    capsys.readouterr()
    assert run(["apply", "-f", str(path)]) == 0, capsys.readouterr().err


def _chat(port: int) -> dict[str, Any]:
    answer = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_three_agents_get_their_variant_serve_it_and_converge_on_a_new_version(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a registry with a base model and two variants, a running server, an admin token, three agents.
    registry = Registry.open(Settings())
    digests = _register_variants(registry, tmp_path)
    fleet.start_server(capsys, monkeypatch)
    assert run(["enroll-token", "create", "--uses", "3", "--auto-approve", "--label", "site=e2e", "--json"]) == 0
    enroll_token = json.loads(capsys.readouterr().out)["token"]
    api_ports = {}
    for gib in (2, 8, 16):
        api_ports[gib] = free_port()
        fleet.start(
            f"agent-{gib}",
            [
                "agent",
                "--server",
                fleet.url,
                "--enroll-token",
                enroll_token,
                "--data-dir",
                str(tmp_path / f"agent-{gib}"),
                "--memory-bytes",
                str(gib * GiB),
                "--poll-interval-s",
                "0.5",
                "--probation-s",
                "1",
                "--api-port",
                str(api_ports[gib]),
            ],
        )
    _wait("three enrolled devices", lambda: len(fleet.devices()) == 3, 60, fleet.logs)

    # Execute: apply the blueprint.
    _apply(tmp_path, "stable", capsys)

    # Assert: each device runs the variant its memory allows, and answers on its local API.
    by_memory = {d["capabilities"]["memory_bytes"] // GiB: d for d in fleet.devices()}
    expected = {2: digests["q4_0"], 8: digests["q8_0"], 16: digests["f16"]}  # budgets: 1, 4 and 8 GiB
    _wait(
        "each device to run its variant",
        lambda: {d["capabilities"]["memory_bytes"] // GiB: d["active_digest"] for d in fleet.devices()} == expected,
        60,
        fleet.logs,
        fleet.diagnose,
    )
    assert set(by_memory) == {2, 8, 16}
    for gib, digest in expected.items():
        body = _chat(api_ports[gib])
        assert body["model"].startswith("tiny@")
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert registry.resolve(digest).manifest.name == "tiny"

    # Execute: a new version, and the blueprint moved to it.
    new = registry.import_model(write_tiny_gguf(tmp_path / "models" / "v2" / "base.gguf", seed=7), "tiny").envelope
    _apply(tmp_path, new.manifest.version, capsys)

    # Assert: all three converge on it and serve it.
    _wait(
        "all devices on the new version",
        lambda: all(d["active_digest"] == new.digest for d in fleet.devices()),
        60,
        fleet.logs,
        fleet.diagnose,
    )
    for gib in (2, 8, 16):
        assert _chat(api_ports[gib])["model"] == f"tiny@{new.manifest.version}"
    registry.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.integration
def test_an_agent_serves_gemma3_to_the_official_openai_client(
    fleet: Fleet, tmp_path: Path, gemma_gguf: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    openai = pytest.importorskip("openai")
    from slmops.registry import pull

    registry = Registry.open(Settings())
    pulled = pull(registry, "gemma3-270m").envelope
    fleet.start_server(capsys, monkeypatch)
    assert run(["enroll-token", "create", "--auto-approve", "--label", "site=e2e", "--json"]) == 0
    enroll_token = json.loads(capsys.readouterr().out)["token"]
    api_port = free_port()
    fleet.start(
        "agent",
        [
            "agent",
            "--server",
            fleet.url,
            "--enroll-token",
            enroll_token,
            "--data-dir",
            str(tmp_path / "agent"),
            "--memory-bytes",
            str(8 * GiB),
            "--poll-interval-s",
            "0.5",
            "--api-port",
            str(api_port),
        ],
    )
    blueprint = tmp_path / "gemma.yaml"
    blueprint.write_text(
        "apiVersion: slmops/v1\nkind: Blueprint\nmetadata: {name: gemma}\n"
        "spec:\n  selector: {labels: {site: e2e}}\n  model: {name: gemma3-270m, ref: v1}\n"
        "  runtime: {threads: 2, context_tokens: 512}\n"
    )
    _wait("the device", lambda: len(fleet.devices()) == 1, 60, fleet.logs)
    assert run(["apply", "-f", str(blueprint)]) == 0

    _wait("gemma served", lambda: fleet.devices()[0]["active_digest"] == pulled.digest, 240, fleet.logs, fleet.diagnose)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="unused", timeout=120)
    reply = client.chat.completions.create(
        model="gemma3-270m",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=12,
        temperature=0,
    )

    assert reply.model == "gemma3-270m@v1"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    registry.close()
