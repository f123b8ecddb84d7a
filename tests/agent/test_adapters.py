"""Adapter-only delivery, end to end in one process: the real control-plane app on loopback, a real agent, llama.cpp.

A device of site ``shop`` runs the base ``tiny@v1``. The site chooses the adapter ``lora-shop`` (``PUT
/api/v1/sites/shop``): the desired model becomes the adapter version with its base, and the agent downloads only
the adapter's bytes (counted at the server), stages the pair, probes and serves the base with the adapter loaded.
A newer ``lora-shop`` that fails its health checks rolls back to the previous pair, still with its adapter; clearing
the site's choice goes back to the base-only slot without downloading anything.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from slmops.agent import Agent, AgentConfig
from slmops.agent.runtime import LlamaRuntime
from slmops.agent.state import ProbeRecord
from slmops.control.app import create_app
from slmops.control.blueprints import apply_blueprint
from slmops.control.credentials import create_api_token
from slmops.control.enrollment import create_enrollment_token
from slmops.core.manifest import SignedManifest
from slmops.core.wire import RuntimeConfig
from slmops.registry.db import make_engine, migrate
from tests.agent.simulator import SimServer, free_port
from tests.control.conftest import Clock, make_plane
from tests.tiny_gguf import write_tiny_gguf
from tests.tiny_lora import register_tiny_adapter, write_tiny_lora

BLUEPRINT = """
apiVersion: slmops/v1
kind: Blueprint
metadata: {name: shops}
spec:
  model: {name: tiny, ref: v1}
  runtime: {port: PORT, context_tokens: 256, threads: 1}
  local: {adapters: [lora-shop]}
"""

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class BlobBytes:
    """ASGI middleware: counts the body bytes the app sends for ``/blobs/`` requests."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sent = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "/blobs/" not in scope["path"]:
            await self.app(scope, receive, send)
            return

        async def counting(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.body":
                self.sent += len(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, counting)

    def take(self) -> int:
        sent, self.sent = self.sent, 0
        return sent


class ChecksFailFor(LlamaRuntime):
    """The real runtime, except that periodic health checks of the versions in ``bad`` fail."""

    def __init__(self) -> None:
        super().__init__()
        self.bad: set[str] = set()
        self.serving: str | None = None
        self.adapters: list[Path | None] = []

    def serve(
        self, model_file: Path, envelope: SignedManifest, runtime: RuntimeConfig, adapter_file: Path | None = None
    ) -> None:
        super().serve(model_file, envelope, runtime, adapter_file)
        self.serving = envelope.digest
        self.adapters.append(adapter_file)

    def check(self) -> ProbeRecord:
        if self.serving in self.bad:
            return ProbeRecord(ok=False, reason="the model generated no text")
        return super().check()


def _generate(port: int) -> str:
    reply = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={"prompt": "hello there", "max_tokens": 8, "temperature": 0.0},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["text"])


def test_adapter_only_update_loads_in_llama_cpp_and_rolls_back(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'control.db'}")
    migrate(engine)
    clock = Clock()
    clock.now = datetime.now(UTC)
    plane = make_plane(engine, tmp_path / "home", clock)
    registry = plane.registry
    base = registry.import_model(write_tiny_gguf(tmp_path / "m" / "tiny.gguf", seed=1), "tiny").envelope
    shop_a = register_tiny_adapter(registry, base, write_tiny_lora(tmp_path / "a" / "adapter.gguf", seed=3))
    port = free_port()
    apply_blueprint(plane, BLUEPRINT.replace("PORT", str(port)), "test")
    enroll = create_enrollment_token(
        plane, max_uses=1, expires_in_s=600, auto_approve=True, labels={}, created_by="test"
    ).token
    operator = create_api_token(plane, "op", "operator", "test").token
    counter = BlobBytes(create_app(plane.settings, plane))
    server = SimServer(counter).start()
    api = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {operator}"}, timeout=10)
    runtime = ChecksFailFor()
    config = AgentConfig(
        data_dir=tmp_path / "agent",
        server_url=server.url,
        enroll_token=enroll,
        labels={"site": "shop"},
        poll_interval_s=0.1,
        probation_s=0.0,
        health_interval_s=0.0,
        heartbeat_interval_s=0.0,
        request_timeout_s=10.0,
    )
    try:
        with Agent(config, runtime=runtime) as agent:
            # Prepare: the base alone
            agent.run(once=True)
            assert agent.slots.current() == base.digest, agent.state.last_error
            assert counter.take() == base.manifest.total_size
            base_text = _generate(port)

            # Execute: the site chooses its adapter
            reply = api.put("/api/v1/sites/shop", json={"adapter": "lora-shop"})
            assert reply.status_code == 200, reply.text
            agent.reconcile_once()

            # Assert: only the adapter's bytes travelled; the pair slot serves base + adapter
            assert agent.slots.current() == shop_a.digest, (agent.state.failed, agent.state.last_error)
            assert counter.take() == shop_a.manifest.total_size < base.manifest.total_size // 10
            assert (
                agent.slots.model_file(shop_a.digest).stat().st_ino
                == agent.cache.path(base.manifest.files[0].digest).stat().st_ino
            )
            assert agent.slots.adapter_file(shop_a.digest) is not None
            assert agent.slots.adapter_file(base.digest) is None
            assert runtime.adapters[-1] == agent.slots.adapter_file(shop_a.digest)
            pair_text = _generate(port)
            assert pair_text != base_text
            assert agent.slots.previous() == base.digest
            shown = api.get("/api/v1/sites/shop").json()
            [effect] = shown["effects"]
            assert effect["local"]["adapter"] == "lora-shop" and effect["model"] == "tiny@v2 (lora-shop)"

            # A newer lora-shop fails its health checks: back to the previous pair, adapter and all
            shop_b = register_tiny_adapter(registry, base, write_tiny_lora(tmp_path / "b" / "adapter.gguf", seed=4))
            runtime.bad.add(shop_b.digest)
            plane.world_cache.invalidate()
            for _ in range(5):
                agent.reconcile_once()
                if shop_b.digest in agent.state.failed:
                    break
            assert shop_b.digest in agent.state.failed, agent.state.last_error
            assert counter.take() == shop_b.manifest.total_size
            assert agent.slots.current() == shop_a.digest
            assert runtime.adapters[-1] == agent.slots.adapter_file(shop_a.digest)
            assert _generate(port) == pair_text

            # Clearing the site's adapter goes back to the base-only slot, nothing downloaded
            assert api.put("/api/v1/sites/shop", json={}).status_code == 200
            agent.reconcile_once()
            assert agent.slots.current() == base.digest, agent.state.last_error
            assert counter.take() == 0
            assert runtime.adapters[-1] is None
            assert _generate(port) == base_text
    finally:
        api.close()
        server.stop()
        plane.close()
        engine.dispose()
