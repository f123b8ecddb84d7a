"""The simulated fleet against a real `slmops server` process: enrollment, variant per class, convergence."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from slmops.cli import run
from slmops.config import Settings
from slmops.core.manifest import Lineage, Recipe, RecipeStep, Source
from slmops.registry import Registry
from slmops.sim import BackgroundFleet, FleetRun, parse_fleet
from tests.servers import running_server
from tests.tiny_gguf import write_tiny_gguf

GiB = 1 << 30
DEVICES = int(os.environ.get("SLMOPS_SIM_TEST_DEVICES", "300"))
FLEET = f"""\
seed: 11
profiles:  # no activation failures, so every device must reach the blueprint's choice; the network stays flaky
  small: {{memory_bytes: {2 * GiB}, flaky_network_probability: 0.05, offline_every_s: 60, offline_duration_s: 2}}
  medium: {{memory_bytes: {8 * GiB}, flaky_network_probability: 0.02}}
  large: {{memory_bytes: {16 * GiB}, cpu_cores: 8}}
devices:
  - {{profile: small, count: {DEVICES * 3 // 10}, labels: {{site: sim}}}}
  - {{profile: medium, count: {DEVICES * 4 // 10}, labels: {{site: sim}}}}
  - {{profile: large, count: {DEVICES - DEVICES * 3 // 10 - DEVICES * 4 // 10}, labels: {{site: sim}}}}
"""
BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata: {{name: sim}}
spec:
  selector: {{labels: {{site: sim}}}}
  model: {{name: tiny, ref: {ref}}}
  variant:
    policy: {{objective: best_quality, max_memory_fraction: 0.5}}
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    with running_server(tmp_path / "server.log") as url:
        yield url


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    capsys.readouterr()
    code = run(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _register(registry: Registry, tmp_path: Path) -> dict[str, str]:
    """A base and two variants whose metrics make 2 GiB devices take q4_0 and 8/16 GiB devices take q8_0."""
    base = registry.import_model(write_tiny_gguf(tmp_path / "models" / "base.gguf", seed=1), "tiny").envelope
    digests = {"base": base.digest}
    for variant, seed, ppl, rss in (("q8_0", 2, 10.1, 3 * GiB), ("q4_0", 3, 11.0, int(0.9 * GiB))):
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
                parents=[base.digest], recipe=Recipe(name="sim", steps=[RecipeStep(pass_name="quantize", params={})])
            ),
            variant=variant,
            metrics={"perplexity": ppl, "peak_rss_bytes": float(rss)},
        )
        digests[variant] = result.envelope.digest
    return digests


def _wait(what: str, check: Callable[[], bool], timeout_s: float, diagnose: Callable[[], str]) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{diagnose()}")
        time.sleep(0.5)
    return time.monotonic() - started


def test_a_simulated_fleet_gets_its_variant_per_class_and_converges_on_a_new_version(
    server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: registry, admin and enrollment tokens, the simulated fleet running in the background.
    registry = Registry.open(Settings())
    digests = _register(registry, tmp_path)
    admin = _json(capsys, ["token", "create", "--role", "admin", "--name", "root", "--json"])["token"]
    monkeypatch.setenv("SLMOPS_SERVER_URL", server)
    monkeypatch.setenv("SLMOPS_TOKEN", admin)
    enroll = _json(capsys, ["enroll-token", "create", "--uses", str(DEVICES), "--auto-approve", "--json"])["token"]
    fleet = BackgroundFleet(FleetRun(parse_fleet(FLEET), server, enroll, poll_interval_s=1.0, max_connections=32))
    operator = httpx.Client(base_url=server, headers={"Authorization": f"Bearer {admin}"}, timeout=60)

    def devices() -> list[dict[str, Any]]:
        answer = operator.get("/api/v1/devices")
        answer.raise_for_status()
        result: list[dict[str, Any]] = answer.json()
        return result

    def by_memory() -> dict[int, Counter[str | None]]:
        seen: dict[int, Counter[str | None]] = {}
        for d in devices():
            seen.setdefault(d["capabilities"]["memory_bytes"] // GiB, Counter())[d["active_digest"]] += 1
        return seen

    def diagnose() -> str:
        return f"server view: {by_memory()}\nsimulator view: {fleet.summary().to_json()}"

    fleet.start()
    try:
        enroll_s = _wait("every device to enroll", lambda: fleet.summary().enrolled == DEVICES, 120, diagnose)
        assert len(devices()) == DEVICES

        # Execute: apply the blueprint.
        _apply(tmp_path, "v1", capsys)
        first_s = _wait(
            "each class on its variant",
            lambda: (
                by_memory()
                == {
                    2: {digests["q4_0"]: DEVICES * 3 // 10},
                    8: {digests["q8_0"]: DEVICES * 4 // 10},
                    16: {digests["q8_0"]: DEVICES - DEVICES * 7 // 10},
                }
            ),
            120,
            diagnose,
        )
        # Execute: a new version, the blueprint moved to it.
        new = registry.import_model(write_tiny_gguf(tmp_path / "models" / "v2.gguf", seed=7), "tiny").envelope
        _apply(tmp_path, new.manifest.version, capsys)
        second_s = _wait(
            "every device on the new version",
            lambda: all(d["active_digest"] == new.digest for d in devices()),
            120,
            diagnose,
        )
    finally:
        summary = fleet.stop()
        operator.close()
        registry.close()

    # Assert: the simulator saw the same, with no device task failing, mostly through the 304 fast path.
    assert summary.errors == {}
    assert summary.by_version["small"] == {f"tiny@{new.manifest.version}": DEVICES * 3 // 10}
    # The 304 fast path: a device gets a 200 only when its desired state changed (none, v1's variant, the new
    # version: at most three per device), every other poll is a 304.
    assert summary.requests["desired_304"] > 0 and summary.requests["desired_200"] <= 3 * DEVICES
    print(
        f"\nsim: {DEVICES} devices enrolled in {enroll_s:.1f} s ({DEVICES / max(enroll_s, 1e-9):.0f}/s); "
        f"variant per class in {first_s:.1f} s; new version in {second_s:.1f} s; "
        f"{summary.requests_per_s:.0f} requests/s over {summary.elapsed_s:.1f} s; requests {summary.requests}"
    )


def _apply(tmp_path: Path, ref: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"blueprint-{ref}.yaml"
    path.write_text(BLUEPRINT.format(ref=ref))
    capsys.readouterr()
    assert run(["apply", "-f", str(path)]) == 0, capsys.readouterr().err
