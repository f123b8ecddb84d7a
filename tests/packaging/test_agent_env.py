"""`pip install 'slmops[agent]'` into a fresh venv gives a device what it needs, and nothing of the server's.

A new venv (no system site-packages) gets the wheel built from this tree with the agent extra. `slmops agent --help`
must work there, the server-only packages must be absent, and an agent started from that venv must enroll with a
real `slmops server`, download, verify and serve a tiny model on its local OpenAI-compatible API: the agent extra
is enough for the whole agent code path. Needs the package index (pip) and llama-cpp-python from pip's wheel cache
or a compiler; about 40 s when the wheel is cached.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from slmops.cli import run
from slmops.config import Settings
from slmops.registry import Registry
from tests.packaging._env import BLUEPRINT, SERVER_ONLY, build_dists, make_agent_venv, start_agent
from tests.servers import free_port, running_server
from tests.tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wheel, _sdist = build_dists(tmp_path_factory.mktemp("dist"))
    return make_agent_venv(wheel, tmp_path_factory.mktemp("venv") / "agent")


def _in_venv(agent_bin: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(agent_bin / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_agent_venv_runs_the_agent_cli_without_server_packages(agent_bin: Path) -> None:
    # Execute
    helped = _in_venv(agent_bin, "slmops", "agent", "--help")
    install_help = _in_venv(agent_bin, "slmops", "agent", "install", "--help")
    checked = _in_venv(agent_bin, "python", "-m", "pip", "check")
    probe = "import importlib.util as u, json, sys; print(json.dumps({m: bool(u.find_spec(m)) for m in sys.argv[1:]}))"
    found = json.loads(_in_venv(agent_bin, "python", "-c", probe, *SERVER_ONLY, "llama_cpp", "fastapi").stdout)

    # Assert
    assert helped.returncode == 0, helped.stderr
    assert "--enroll-token-file" in helped.stdout
    assert install_help.returncode == 0 and "--root" in install_help.stdout
    assert checked.returncode == 0, checked.stdout
    assert found == {**dict.fromkeys(SERVER_ONLY, False), "llama_cpp": True, "fastapi": True}


@pytest.fixture
def server(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with running_server(tmp_path / "server.log") as url:
        assert run(["token", "create", "--role", "admin", "--name", "root", "--json"]) == 0
        monkeypatch.setenv("SLMOPS_SERVER_URL", url)
        monkeypatch.setenv("SLMOPS_TOKEN", json.loads(capsys.readouterr().out)["token"])
        yield url


def test_an_agent_from_the_agent_venv_enrolls_and_serves_a_model(
    agent_bin: Path, server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a tiny model tagged stable, a blueprint for site=packaging, an enrollment token.
    registry = Registry.open(Settings())
    registry.import_model(write_tiny_gguf(tmp_path / "tiny.gguf", seed=1), "tiny")
    registry.tag("tiny@v1", "stable")
    registry.close()
    blueprint = tmp_path / "blueprint.yaml"
    blueprint.write_text(BLUEPRINT.format(model="tiny"))
    assert run(["apply", "-f", str(blueprint)]) == 0
    capsys.readouterr()
    assert run(["enroll-token", "create", "--auto-approve", "--json"]) == 0
    enroll = json.loads(capsys.readouterr().out)["token"]
    port, log = free_port(), tmp_path / "agent.log"

    # Execute
    agent = start_agent(agent_bin, server, enroll, tmp_path / "agent", port, log)
    try:
        deadline, answer = time.monotonic() + 90, None
        while answer is None or answer.status_code != 200:
            assert agent.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
            try:
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0},
                    timeout=30,
                )
            except httpx.TransportError:
                answer = None
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    finally:
        agent.terminate()
        agent.wait(timeout=30)

    # Assert: the local API answered with the model, and served Prometheus metrics (prometheus-client is there).
    assert answer.json()["model"] == "tiny@v1"
    assert metrics.status_code == 200 and "# TYPE" in metrics.text
    assert agent.returncode == 0, log.read_text()[-3000:]
