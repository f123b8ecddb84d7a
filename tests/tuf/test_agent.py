"""A real agent (llama.cpp on tiny GGUFs) as a TUF client, against the simulator serving a static TUF repository.

The simulator plays a control plane that an attacker controls: it can name any old signed manifest in the desired
state and serve old or withheld metadata. The agent enrolled before TUF existed moves to it through the root pin,
installs only current targets for its device class, and otherwise keeps serving what it has and says why.
"""

from __future__ import annotations

import datetime as dt
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from tuf.ngclient._internal import trusted_metadata_set

from slmops.agent import Agent, AgentConfig
from slmops.agent.download import DownloadConfig
from slmops.core.device_class import device_class
from slmops.core.wire import API_PREFIX, Capabilities
from slmops.tuf.pin import RootPin, sign_root_pin
from tests.agent.conftest import Models
from tests.agent.simulator import SimServer, Simulator, free_port
from tests.tuf.repo import Repo

GiB = 1 << 30
HWID = device_class(Capabilities(memory_bytes=8 * GiB, disk_free_bytes=0, cpu_cores=1, arch=platform.machine()))


class TufSim:
    """The simulator plus ``/api/v1/tuf/*`` from a :class:`Repo`, with overrides an attacker would serve."""

    def __init__(self, models: Models) -> None:
        self.sim = Simulator(models.registry)
        self.repo = Repo(dt.datetime.now(dt.UTC).replace(microsecond=0))
        self.overrides: dict[str, bytes] = {}
        self.pin: RootPin | None = sign_root_pin(self.repo.root_bytes, 1, models.registry.keys.signer())
        app = self.sim.app()

        def authorized(request: Request) -> bool:
            auth = request.headers.get("authorization", "")
            return any(auth == f"Bearer {d.credential}" and d.approved for d in self.sim.devices.values())

        @app.get(f"{API_PREFIX}/tuf/bootstrap")
        async def bootstrap(request: Request) -> Response:
            if not authorized(request):
                return JSONResponse({"detail": "unauthenticated"}, status_code=401)
            if self.pin is None:
                return JSONResponse({"detail": "TUF is not set up"}, status_code=404)
            return Response(self.pin.model_dump_json(), media_type="application/json")

        @app.get(f"{API_PREFIX}/tuf/{{path:path}}")
        async def metadata(path: str, request: Request) -> Response:
            if not authorized(request):
                return JSONResponse({"detail": "unauthenticated"}, status_code=401)
            data = self.overrides.get(path, self.repo.files.get(path))
            if data is None:
                return JSONResponse({"detail": "not found"}, status_code=404)
            return Response(data, media_type="application/json")

        self.server = SimServer(app)


@pytest.fixture
def tuf_sim(models: Models) -> Iterator[TufSim]:
    running = TufSim(models)
    running.server.start()
    yield running
    running.server.stop()


@pytest.fixture
def config(tmp_path: Path, tuf_sim: TufSim) -> Callable[..., AgentConfig]:
    def make(**overrides: Any) -> AgentConfig:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "agent",
            "server_url": tuf_sim.server.url,
            "enroll_token": "tok",
            "poll_interval_s": 0.1,
            "probation_s": 0.0,
            "health_interval_s": 3600.0,
            "heartbeat_interval_s": 0.0,
            "request_timeout_s": 5.0,
            "memory_bytes": 8 * GiB,
            "download": DownloadConfig(backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=4, disk_margin_bytes=0),
        }
        values.update(overrides)
        return AgentConfig(**values)

    return make


def _served(port: int) -> str:
    return str(httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"][0]["id"])


def _last_refusal(tuf_sim: TufSim) -> str:
    with tuf_sim.sim.lock:
        failed = [e for e in tuf_sim.sim.events if e.kind == "verify_failed"]
    assert failed, "no verify_failed event was reported"
    return str(failed[-1].detail["reason"])


def test_the_agent_installs_only_current_targets_and_keeps_serving_through_rollback_and_freeze(
    tuf_sim: TufSim,
    models: Models,
    config: Callable[..., AgentConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo, sim = tuf_sim.repo, tuf_sim.sim
    repo.add(models.v1.manifest.canonical(), [HWID])
    repo.publish()
    first_release = dict(repo.files)
    port = free_port()
    sim.set_desired(models.v1, port)

    with Agent(config()) as agent:
        agent.run(once=True)  # enrolls (no TUF root yet), installs the pinned root, verifies v1 as a target
        assert agent.slots.current() == models.v1.digest and _served(port) == "tiny@v1"
        assert (Path(config().data_dir) / "tuf" / "root.json").exists()
        with sim.lock:
            kinds = [e.kind for e in sim.events]
            verified = next(e for e in sim.events if e.kind == "verified")
        assert kinds.index("tuf_root_installed") < kinds.index("verified")
        assert verified.detail["tuf"]["hardware_id"] == HWID and verified.detail["tuf"]["targets_version"] == 2

        sim.set_desired(models.v2, port)  # named by the control plane, but not released in TUF
        agent.reconcile_once()
        assert agent.slots.current() == models.v1.digest and _served(port) == "tiny@v1"
        assert "[tuf:not_a_target]" in _last_refusal(tuf_sim)
        assert not sim.requests_to(f"/blobs/{models.v2.manifest.files[0].digest}")  # nothing downloaded

        repo.add(models.v2.manifest.canonical(), [HWID])  # released: v1 stays a target too
        repo.publish()
        agent.reconcile_once()
        assert agent.slots.current() == models.v2.digest and _served(port) == "tiny@v2"

        sim.set_desired(models.v1, port)  # rollback: the old desired state and the metadata of that moment
        tuf_sim.overrides = {"timestamp.json": first_release["timestamp.json"]}
        agent.reconcile_once()
        assert agent.slots.current() == models.v2.digest and _served(port) == "tiny@v2"
        assert "[tuf:version]" in _last_refusal(tuf_sim)

        tuf_sim.overrides = {}
        sim.set_desired(models.v1, port)  # freeze: the server stops re-signing and the clock moves on
        later = repo.now + dt.timedelta(days=2)
        fake = SimpleNamespace(datetime=SimpleNamespace(now=lambda tz=None: later), timezone=dt.timezone)
        with monkeypatch.context() as patch:
            patch.setattr(trusted_metadata_set, "datetime", fake)
            agent.reconcile_once()
        assert agent.slots.current() == models.v2.digest and _served(port) == "tiny@v2"
        assert "[tuf:expired]" in _last_refusal(tuf_sim)

        sim.set_desired(models.v1, port)  # current metadata that lists v1: an operator's rollback installs
        agent.reconcile_once()
        assert agent.slots.current() == models.v1.digest and _served(port) == "tiny@v1"


def test_without_tuf_on_the_server_the_agent_keeps_todays_behaviour(
    tuf_sim: TufSim,
    models: Models,
    config: Callable[..., AgentConfig],
) -> None:
    tuf_sim.pin = None  # no root uploaded: 404 for the pin
    port = free_port()
    tuf_sim.sim.set_desired(models.v1, port)
    with Agent(config()) as agent:
        agent.run(once=True)
        assert agent.slots.current() == models.v1.digest
        assert not (Path(config().data_dir) / "tuf" / "root.json").exists()
    with tuf_sim.sim.lock:
        verified = next(e for e in tuf_sim.sim.events if e.kind == "verified")
    assert "tuf" not in verified.detail
    assert not tuf_sim.sim.requests_to("/tuf/timestamp.json")


def test_a_tampered_root_pin_installs_nothing(
    tuf_sim: TufSim,
    models: Models,
    config: Callable[..., AgentConfig],
) -> None:
    assert tuf_sim.pin is not None
    tuf_sim.pin = tuf_sim.pin.model_copy(update={"root": tuf_sim.pin.root + " "})
    port = free_port()
    tuf_sim.sim.set_desired(models.v1, port)
    with Agent(config()) as agent:
        agent.run(once=True)
        assert agent.slots.current() is None
        assert not (Path(config().data_dir) / "tuf" / "root.json").exists()
    assert "pin" in _last_refusal(tuf_sim) and "tampered" in _last_refusal(tuf_sim)
