"""Real agent processes, SIGKILLed at chosen points (SLMOPS_AGENT_TEST_PAUSE_AT), restarted, and checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slmops.agent import PAUSE_ENV
from slmops.agent.slots import Slots
from slmops.core.manifest import SignedManifest
from slmops.registry.blobstore import DirectoryBlobStore
from tests.agent.conftest import Models
from tests.agent.simulator import RunningSim, free_port


def _argv(sim: RunningSim, data: Path, probation_s: float) -> list[str]:
    return [
        sys.executable, "-m", "slmops", "agent", "--server", sim.url, "--enroll-token", "tok", "--data-dir", str(data),
        "--poll-interval-s", "0.1", "--probation-s", str(probation_s), "--once",
    ]  # fmt: skip


def _run_once(sim: RunningSim, data: Path, probation_s: float = 3600.0) -> None:
    result = subprocess.run(_argv(sim, data, probation_s), capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr


def _kill_at(sim: RunningSim, data: Path, point: str, probation_s: float = 3600.0) -> None:
    env = {**os.environ, PAUSE_ENV: point}
    with subprocess.Popen(
        _argv(sim, data, probation_s), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if line.strip() == f"SLMOPS_AGENT_PAUSED {point}":
                    break
            else:
                raise AssertionError(f"the agent exited before {point}: {proc.wait()} {proc.communicate()[1]}")
            _assert_current_is_whole_and_probed(data)  # the invariant, at the moment of the kill
        finally:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == -9


def _assert_current_is_whole_and_probed(data: Path) -> str | None:
    slots = Slots(data / "slots", DirectoryBlobStore(data / "blobs"))
    current = slots.current()
    if current is None:
        return None
    slots.verify(current)  # every file of the slot hashes to its signed manifest
    state = json.loads((data / "state.json").read_text())
    assert state["probes"][current]["ok"] is True
    return current


def _events(sim: RunningSim, kind: str, digest: str | None = None) -> list[dict[str, object]]:
    with sim.sim.lock:
        return [e.detail for e in sim.sim.events if e.kind == kind and (digest is None or e.version_digest == digest)]


def _start_with(sim: RunningSim, data: Path, envelope: SignedManifest, port: int) -> None:
    sim.sim.set_desired(envelope, port)
    _run_once(sim, data, probation_s=0.0)  # active and committed
    assert _assert_current_is_whole_and_probed(data) == envelope.digest


def test_sigkill_mid_download_resumes_from_the_partial_file(sim: RunningSim, models: Models, tmp_path: Path) -> None:
    data = tmp_path / "agent"
    sim.sim.set_desired(models.v1, free_port())
    sim.sim.chunk_bytes = 8 << 10
    blob = models.v1.manifest.files[0]

    _kill_at(sim, data, "download_chunk")
    partial = data / "downloads" / (blob.digest.removeprefix("sha256:") + ".partial")
    have = partial.stat().st_size
    assert 0 < have < blob.size
    _run_once(sim, data)

    assert _assert_current_is_whole_and_probed(data) == models.v1.digest
    ranges = [r.headers.get("range") for r in sim.sim.requests_to("/blobs/")]
    assert ranges == [None, f"bytes={have}-"]
    assert not partial.exists()


@pytest.mark.parametrize(
    ("point", "crashed"),
    [
        ("before_switch", False),
        ("after_previous_link", False),
        ("after_switch", False),
        ("before_serve", True),
        ("after_serve", True),
    ],
)
def test_sigkill_during_the_switch_converges_and_current_is_always_whole(
    sim: RunningSim, models: Models, tmp_path: Path, point: str, crashed: bool
) -> None:
    data, port = tmp_path / "agent", free_port()
    _start_with(sim, data, models.v1, port)
    sim.sim.set_desired(models.v2, port)

    _kill_at(sim, data, point)
    assert _assert_current_is_whole_and_probed(data) in (models.v1.digest, models.v2.digest)
    _run_once(sim, data)

    assert _assert_current_is_whole_and_probed(data) == models.v2.digest
    state = json.loads((data / "state.json").read_text())
    assert state["failed"] == {} and state["active"] == models.v2.digest and state["committed"] is False
    rolled = _events(sim, "rolled_back", models.v2.digest)
    if crashed:  # died while serving the new version on probation: one crash, rolled back, retried
        assert state["crash_counts"] == {models.v2.digest: 1}
        assert len(rolled) == 1 and rolled[0]["marked_failed"] is False and rolled[0]["to"] == models.v1.digest
    else:
        assert rolled == [] and state["crash_counts"] == {}
    assert len(sim.sim.requests_to("/blobs/")) == 2  # one blob per version, never fetched again


def test_a_version_that_crashes_twice_in_probation_is_rolled_back_and_marked_failed(
    sim: RunningSim, models: Models, tmp_path: Path
) -> None:
    data, port = tmp_path / "agent", free_port()
    _start_with(sim, data, models.v1, port)
    sim.sim.set_desired(models.v2, port)

    _kill_at(sim, data, "after_serve")  # the process dies while serving v2
    _kill_at(sim, data, "after_serve")  # rolled back, retried, dies again
    _run_once(sim, data)

    assert _assert_current_is_whole_and_probed(data) == models.v1.digest
    state = json.loads((data / "state.json").read_text())
    assert state["crash_counts"] == {models.v2.digest: 2}
    assert "2 of 2" in state["failed"][models.v2.digest]
    rolled = _events(sim, "rolled_back", models.v2.digest)
    assert [r["marked_failed"] for r in rolled] == [False, True]
    assert len(_events(sim, "crash", models.v2.digest)) == 2
    _run_once(sim, data)  # a failed version is not retried until the desired version changes
    assert _assert_current_is_whole_and_probed(data) == models.v1.digest
    assert len(_events(sim, "activated", models.v2.digest)) == 2
