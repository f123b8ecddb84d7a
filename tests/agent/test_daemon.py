from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from slmops.agent import Agent, AgentConfig, local_status
from slmops.agent.runtime import LlamaRuntime
from slmops.agent.state import ProbeRecord
from slmops.cli import run
from slmops.core.wire import ClaimRequest
from slmops.registry import Registry
from tests.agent.conftest import Models
from tests.agent.simulator import BlobBehavior, RunningSim, free_port, iter_events

SECRET = "the patient in room 12 has a rare allergy to penicillin"


def _kinds(sim: RunningSim) -> list[str]:
    with sim.sim.lock:
        return [e.kind for e in sim.sim.events]


def _served_model(port: int) -> str:
    reply = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
    assert reply.status_code == 200
    return str(reply.json()["data"][0]["id"])


def test_enrolls_converges_serves_and_then_polls_with_a_304(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig]
) -> None:
    port = free_port()
    sim.sim.set_desired(models.v1, port)

    with Agent(agent_config(labels={"site": "lab"})) as agent:
        agent.run(once=True)
        assert agent.slots.current() == models.v1.digest
        assert _served_model(port) == "tiny@v1"
        blob_requests = len(sim.sim.requests_to("/blobs/"))
        agent.reconcile_once()

    desired = sim.sim.requests_to("/desired")
    assert [r.status for r in desired] == [200, 304]
    assert desired[1].headers["if-none-match"] == desired[0].headers.get("etag", f'"{sim.sim.desired.generation}"')
    assert len(sim.sim.requests_to("/blobs/")) == blob_requests == 1
    assert sim.sim.devices["dev-1"].labels == {"site": "lab"}
    kinds = _kinds(sim)
    assert kinds[0] == "enrolled"
    order = [k for k in kinds if k in ("verified", "downloaded", "staged", "probe_passed", "activated", "serving")]
    assert order == ["verified", "downloaded", "staged", "probe_passed", "activated", "serving"]
    last = sim.sim.statuses[-1]
    assert last.active_digest == models.v1.digest and last.health == "ok"
    assert last.capabilities is not None and last.capabilities.probe_decode_tokens_per_s


def test_a_pending_device_claims_its_credential_once_approved(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig], tmp_path: Path
) -> None:
    sim.sim.auto_approve = False
    with Agent(agent_config()) as agent:
        assert agent.enroll() is False
        assert agent.enroll() is False
        sim.sim.devices["dev-1"].approved = True
        assert agent.enroll() is True
    claims = sim.sim.requests_to("/enroll/claim")
    assert [r.status for r in claims] == [202, 200]
    assert (tmp_path / "agent" / "credential").read_text() == sim.sim.devices["dev-1"].credential
    assert len(sim.sim.requests_to("/api/v1/enroll")) == 3  # one enrollment, two claims


def test_a_claim_refused_as_not_newer_is_signed_anew_at_the_next_poll_and_the_agent_keeps_running(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig]
) -> None:
    port = free_port()
    sim.sim.set_desired(models.v1, port)
    sim.sim.auto_approve = False
    second = 1_700_000_000

    def refused() -> int:
        return sum(r.status == 409 for r in sim.sim.requests_to("/enroll/claim"))

    stop = threading.Event()
    with Agent(agent_config(), clock=lambda: second + 0.5 + refused()) as agent:  # the clock moves after a 409
        assert agent.enroll() is False
        device = sim.sim.devices["dev-1"]
        device.approved = True
        device.last_claim_timestamp = second  # a claim signed in this second got the credential; its answer was lost
        runner = threading.Thread(target=agent.run, kwargs={"stop": stop})
        runner.start()
        try:
            deadline = time.monotonic() + 60
            while agent.slots.current() != models.v1.digest and runner.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert runner.is_alive()
            assert agent.enrolled() and _served_model(port) == "tiny@v1"
        finally:
            stop.set()
            runner.join(timeout=30)

    claims = sim.sim.requests_to("/enroll/claim")
    assert [r.status for r in claims] == [409, 200]
    assert [ClaimRequest.model_validate_json(r.body).timestamp for r in claims] == [second, second + 1]
    assert (agent.data.root / "credential").read_text() == device.credential


def test_a_tampered_blob_is_rejected_and_the_old_model_keeps_serving(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig]
) -> None:
    port = free_port()
    sim.sim.set_desired(models.v1, port)
    with Agent(agent_config()) as agent:
        agent.run(once=True)
        blob = models.v2.manifest.files[0].digest
        tampered = bytearray(sim.sim.blob_bytes(blob))
        tampered[len(tampered) // 2] ^= 0x01
        sim.sim.behaviors[blob] = BlobBehavior(data=bytes(tampered))
        sim.sim.set_desired(models.v2, port)

        agent.reconcile_once()
        agent.reconcile_once()

        assert agent.slots.current() == models.v1.digest
        assert not agent.cache.has(blob)
        assert _served_model(port) == "tiny@v1"
        assert agent.state.phase == "error" and "does not match" in (agent.state.last_error or "")
    assert _kinds(sim).count("download_failed") == 1  # one event per distinct error, not one per poll
    assert sim.sim.statuses[-1].last_error and sim.sim.statuses[-1].active_digest == models.v1.digest


def test_an_untrusted_signature_is_rejected_before_any_download(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig], make_registry: Callable[[str], Registry]
) -> None:
    other = make_registry("rogue")
    other.keys.init()
    rogue = other.import_model(models.registry.blob_path(models.v2.manifest.files[0].digest), "tiny").envelope
    sim.sim.set_desired(rogue, free_port())

    with Agent(agent_config()) as agent:
        agent.run(once=True)
        assert agent.slots.current() is None
        assert "untrusted key" in (agent.state.last_error or "")

    assert sim.sim.requests_to("/blobs/") == []
    assert "verify_failed" in _kinds(sim)


def test_a_model_that_fails_the_probe_is_never_activated(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig], tmp_path: Path
) -> None:
    port = free_port()
    sim.sim.set_desired(models.v1, port)
    bad = models.degenerate(tmp_path)
    with Agent(agent_config()) as agent:
        agent.run(once=True)
        sim.sim.set_desired(bad, port)
        agent.reconcile_once()
        agent.reconcile_once()

        assert agent.slots.current() == models.v1.digest
        assert bad.digest in agent.state.failed and "generated no text" in agent.state.failed[bad.digest]
        assert _served_model(port) == "tiny@v1"
    failed = [e for e in sim.sim.events if e.kind == "probe_failed"]
    assert len(failed) == 1 and failed[0].version_digest == bad.digest
    assert "activated" not in [e.kind for e in sim.sim.events if e.version_digest == bad.digest]


class _FailingChecks(LlamaRuntime):
    """The real runtime, except that periodic health checks of one version fail (a model that goes bad)."""

    def __init__(self, bad: str) -> None:
        super().__init__()
        self.bad = bad
        self.serving: str | None = None

    def serve(self, model_file: Path, envelope: object, runtime: object, adapter_file: Path | None = None) -> None:
        super().serve(model_file, envelope, runtime, adapter_file)  # type: ignore[arg-type]
        self.serving = envelope.digest  # type: ignore[attr-defined]

    def check(self) -> ProbeRecord:
        if self.serving == self.bad:
            return ProbeRecord(ok=False, reason="the model generated no text")
        return super().check()


def test_repeated_health_check_failures_roll_back_by_themselves(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig]
) -> None:
    port = free_port()
    sim.sim.set_desired(models.v1, port)
    config = agent_config(health_interval_s=0.0, probation_s=3600.0)
    with Agent(config, runtime=_FailingChecks(models.v2.digest)) as agent:
        agent.run(once=True)
        sim.sim.set_desired(models.v2, port)
        for _ in range(4):
            agent.reconcile_once()

        assert agent.slots.current() == models.v1.digest
        assert models.v2.digest in agent.state.failed
        assert _served_model(port) == "tiny@v1"
    rolled = [e for e in sim.sim.events if e.kind == "rolled_back"]
    assert len(rolled) == 1 and "health checks" in rolled[0].detail["reason"]
    assert rolled[0].detail["to"] == models.v1.digest and rolled[0].detail["marked_failed"] is True
    assert _kinds(sim).count("health_check_failed") == 3


def test_offline_the_agent_keeps_serving_and_delivers_buffered_events_once(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig], tmp_path: Path
) -> None:
    port = free_port()
    sim.sim.set_desired(models.v1, port)
    with Agent(agent_config(request_timeout_s=1.0)) as agent:
        agent.run(once=True)
        sim.server.stop()
        for _ in range(3):
            agent.reconcile_once()
            assert _served_model(port) == "tiny@v1"
        chat = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": SECRET}], "max_tokens": 4},
            timeout=30,
        )
        assert chat.status_code == 200
        buffered = [e.id for e in agent.outbox.pending()]
        assert len(buffered) >= 1
        sim.server.start()  # same port
        agent.reconcile_once()
        agent.reconcile_once()
        assert agent.outbox.pending() == []

    received = [e.id for e in sim.sim.events]
    assert len(received) == len(set(received)), "an acknowledged event was sent twice"
    assert set(buffered) <= set(received)
    kinds = _kinds(sim)
    assert kinds.count("control_plane_unreachable") == 1 and kinds.count("control_plane_reachable") == 1
    for request in sim.sim.requests:  # privacy: no prompt text ever leaves the device
        assert SECRET.encode() not in request.body
        assert SECRET not in str(request.headers)


def test_agent_status_shows_local_state(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    sim.sim.set_desired(models.v1, free_port())
    config = agent_config()
    with Agent(config) as agent:
        agent.run(once=True)

    info = local_status(config.data_dir)
    assert info["device_id"] == "dev-1" and info["active_version"] == "tiny@v1" and info["phase"] == "serving"
    assert run(["agent", "status", "--data-dir", str(config.data_dir)]) == 0
    assert "tiny@v1" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- measured tuning


def _auto_threads(sim: RunningSim, models: Models, port: int) -> None:
    from slmops.core.wire import RuntimeConfig

    sim.sim.set_desired(models.v1, port)
    assert sim.sim.desired is not None
    sim.sim.desired = sim.sim.desired.model_copy(update={"runtime": RuntimeConfig(port=port, context_tokens=256)})


def _served_threads(agent: Agent) -> tuple[int, int]:
    """(llama.cpp's thread count, batch size) of the model the agent's runtime serves now."""
    import llama_cpp

    assert isinstance(agent.runtime, LlamaRuntime) and agent.runtime._host is not None
    with agent.runtime._host.lease() as (backend, _info):
        engine = backend._backend._llama  # type: ignore[attr-defined]
        return int(llama_cpp.llama_n_threads(engine._ctx.ctx)), int(engine.n_batch)


def test_a_probed_model_is_tuned_served_with_the_choice_reported_and_the_choice_reused_after_a_restart(
    sim: RunningSim,
    models: Models,
    agent_config: Callable[..., AgentConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the test process may have loaded llama.cpp already: pin its policy so the agent measures that one only
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    port = free_port()
    _auto_threads(sim, models, port)

    with Agent(agent_config(tune_budget_s=60.0)) as agent:
        agent.run(once=True)
        tuning = agent.tuning
        assert tuning is not None and tuning.model_digest == models.v1.digest
        assert _served_threads(agent) == (tuning.threads, min(tuning.batch_tokens, 256))  # llama.cpp caps at n_ctx
        assert tuning.candidates_measured >= 2 and tuning.omp_wait_policy in (None, "passive")
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert f"slmops_runtime_tuning_threads {float(tuning.threads)}" in metrics
        assert 'slmops_runtime_tuning_omp_wait_policy{policy="passive"}' in metrics

    last = sim.sim.statuses[-1]
    assert last.capabilities is not None and last.capabilities.tuning == tuning
    tuned = list(iter_events(sim.sim, "tuned"))
    assert len(tuned) == 1 and tuned[0].detail["threads"] == tuning.threads and tuned[0].detail["reused"] is False
    stored = (tmp_path / "agent" / "tuning.json").read_text()
    assert models.v1.digest in stored

    with Agent(agent_config(tune_budget_s=60.0)) as agent:  # a restart serves the stored choice, measuring nothing
        agent.run(once=True)
        assert agent.tuning == tuning
        assert agent.runtime.tuning_outcome is not None and agent.runtime.tuning_outcome.reused  # type: ignore[attr-defined]
        assert _served_threads(agent) == (tuning.threads, min(tuning.batch_tokens, 256))  # llama.cpp caps at n_ctx


def test_a_blueprint_thread_count_overrides_the_measurement(
    sim: RunningSim, models: Models, agent_config: Callable[..., AgentConfig], tmp_path: Path
) -> None:
    port = free_port()
    sim.sim.set_desired(models.v1, port)  # the simulator's runtime config says threads=1

    with Agent(agent_config(tune_budget_s=60.0)) as agent:
        agent.run(once=True)
        assert agent.slots.current() == models.v1.digest
        assert agent.tuning is None and _served_threads(agent)[0] == 1

    assert not (tmp_path / "agent" / "tuning.json").exists()
    last = sim.sim.statuses[-1]
    assert last.capabilities is not None and last.capabilities.tuning is None


def test_a_choice_that_needs_another_wait_policy_serves_the_best_loadable_and_asks_for_one_restart(
    sim: RunningSim,
    models: Models,
    agent_config: Callable[..., AgentConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from slmops.runtime import tuning as tuning_module
    from slmops.runtime.tuning import Candidate, Measurement, TuningOutcome, TuningStore, choose

    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")  # what this process runs (or will load) llama.cpp with
    found = (
        Measurement(Candidate(1, None, 512), 50.0, 50.0),
        Measurement(Candidate(2, "active", 512), 100.0, 100.0),
    )
    best = choose(found, model_digest=models.v1.digest, measured_at=1)
    (tmp_path / "agent").mkdir()
    TuningStore(tmp_path / "agent" / "tuning.json").put(
        TuningOutcome(best, found, ()), tuning_module.device_fingerprint()
    )
    port = free_port()
    _auto_threads(sim, models, port)

    with Agent(agent_config(tune_budget_s=60.0, restart_for_tuning=True)) as agent:
        agent.run()  # returns at the safe point after the pass, instead of polling on
        assert agent.restart_requested == best and best.omp_wait_policy == "active"
        assert agent.tuning is not None and agent.tuning.threads == 1 and _served_threads(agent)[0] == 1

    tuned = list(iter_events(sim.sim, "tuned"))
    assert tuned[-1].detail["restart_wanted_for"] == "active"

    monkeypatch.setenv("SLMOPS_RESTARTED_FOR_OMP", "active")  # restarted for it once and it still cannot apply
    stop = threading.Event()
    with Agent(agent_config(tune_budget_s=60.0, restart_for_tuning=True)) as agent:
        worker = threading.Thread(target=agent.run, kwargs={"stop": stop})
        worker.start()
        time.sleep(1.0)
        stop.set()
        worker.join(timeout=30)
        assert agent.restart_requested is None


_RESTARTING_AGENT = """
import json, os, sys
from pathlib import Path

first = "SLMOPS_RESTARTED_FOR_OMP" not in os.environ
if first:  # this run loaded llama.cpp before it knew the tuning (the passive fallback), as an earlier model would
    from slmops.runtime.backend import _import_llama_cpp

    _import_llama_cpp()
from slmops.agent import Agent, AgentConfig
from slmops.agent.daemon import restart_process
from slmops.runtime.tuning import loaded_wait_policy

config = AgentConfig(
    data_dir=Path(sys.argv[1]), server_url=sys.argv[2], enroll_token="tok", poll_interval_s=0.1, probation_s=0.0,
    health_interval_s=3600.0, heartbeat_interval_s=0.0, tune_budget_s=60.0, restart_for_tuning=True,
)
with Agent(config) as agent:
    agent.run(once=True)
    wanted, served = agent.restart_requested, agent.tuning
print(json.dumps({"first": first, "pid": os.getpid(), "loaded": loaded_wait_policy(),
                  "threads": served.threads if served else None,
                  "wanted": wanted.omp_wait_policy if wanted else None}), flush=True)
if wanted is not None:
    restart_process(wanted.omp_wait_policy)
"""


def test_the_agent_process_restarts_itself_into_the_wait_policy_its_tuning_needs(
    sim: RunningSim, models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import os
    import subprocess
    import sys

    from slmops.runtime import tuning as tuning_module
    from slmops.runtime.tuning import Candidate, Measurement, TuningOutcome, TuningStore, choose

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # the agent processes start without a user's policy
    found = (
        Measurement(Candidate(1, None, 512), 50.0, 50.0),
        Measurement(Candidate(2, "active", 512), 100.0, 100.0),
    )
    data = tmp_path / "agent"
    data.mkdir()
    TuningStore(data / "tuning.json").put(
        TuningOutcome(choose(found, model_digest=models.v1.digest, measured_at=1), found, ()),
        tuning_module.device_fingerprint(),
    )
    port = free_port()
    _auto_threads(sim, models, port)
    script = tmp_path / "agent_main.py"
    script.write_text(_RESTARTING_AGENT)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}

    result = subprocess.run(
        [sys.executable, str(script), str(data), sim.url], capture_output=True, text=True, timeout=300, env=env
    )

    runs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(runs) == 2, result.stderr[-2000:]
    assert runs[0] == {"first": True, "pid": runs[0]["pid"], "loaded": "passive", "threads": 1, "wanted": "active"}
    assert runs[1] == {"first": False, "pid": runs[0]["pid"], "loaded": "active", "threads": 2, "wanted": None}
    kinds = [e.kind for e in sim.sim.events]
    assert "crash" not in kinds  # the restart was a clean stop
