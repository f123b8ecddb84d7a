from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from slmops.agent.config import AgentConfig
from slmops.agent.download import DownloadConfig
from slmops.core.manifest import SignedManifest
from slmops.registry import Registry
from tests.agent.simulator import RunningSim, SimServer, Simulator
from tests.tiny_gguf import write_tiny_gguf


@dataclass(frozen=True)
class Models:
    v1: SignedManifest
    v2: SignedManifest
    registry: Registry

    def degenerate(self, tmp_path: Path) -> SignedManifest:
        """A version llama.cpp loads but whose output projection is all zeros: it fails the health probe."""
        import gguf

        path = write_tiny_gguf(tmp_path / "degenerate" / "tiny.gguf", seed=7)
        reader = gguf.GGUFReader(str(path), "r+")
        for tensor in reader.tensors:
            if tensor.name == "output.weight":
                tensor.data[...] = 0
        del reader
        return self.registry.import_model(path, "tiny").envelope


@pytest.fixture
def models(make_registry: Callable[[str], Registry], tmp_path: Path) -> Models:
    registry = make_registry("cp")
    registry.keys.init()
    v1 = registry.import_model(write_tiny_gguf(tmp_path / "m1" / "tiny.gguf", seed=1), "tiny").envelope
    v2 = registry.import_model(write_tiny_gguf(tmp_path / "m2" / "tiny.gguf", seed=2, n_layers=3), "tiny").envelope
    return Models(v1, v2, registry)


@pytest.fixture
def sim(models: Models) -> Iterator[RunningSim]:
    simulator = Simulator(models.registry)
    server = SimServer(simulator.app()).start()
    yield RunningSim(simulator, server)
    server.stop()


@pytest.fixture
def agent_config(tmp_path: Path, sim: RunningSim) -> Callable[..., AgentConfig]:
    def make(**overrides: object) -> AgentConfig:
        values: dict[str, object] = {
            "data_dir": tmp_path / "agent",
            "server_url": sim.url,
            "enroll_token": "tok",
            "poll_interval_s": 0.1,
            "probation_s": 0.0,
            "health_interval_s": 3600.0,
            "heartbeat_interval_s": 0.0,
            "request_timeout_s": 5.0,
            "download": DownloadConfig(backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=4, disk_margin_bytes=0),
        }
        values.update(overrides)
        return AgentConfig(**values)  # type: ignore[arg-type]

    return make
