"""A whole pipeline on a tiny GGUF model: real control plane, real agents under OS-enforced limits, a staged release.

Two classes: one with room, one whose memory cap (64 MiB) the agent cannot live under. The second is excluded from
the release and the report says why; a rerun does no work; exit codes follow the CI contract.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("llama_cpp")

from slmops.cli import run as cli
from slmops.config import Settings
from slmops.control import ControlPlane
from slmops.control.client import OperatorClient
from slmops.control.credentials import create_api_token
from slmops.control.settings import ServerSettings
from slmops.pipeline import detect
from slmops.registry import Registry
from tests.servers import free_port, running_server
from tests.tiny_gguf import write_tiny_gguf

_BLUEPRINT = """\
apiVersion: slmops/v1
kind: Blueprint
metadata: {{name: {name}}}
spec:
  selector: {{labels: {{fleet: {name}}}}}
  model: {{name: tiny, ref: v1}}
"""


def _pipeline(tmp_path: Path, **changes: Any) -> Path:
    value: dict[str, Any] = {
        "name": "tiny-ci",
        "source": {"gguf": "tiny.gguf", "name": "tiny"},
        "optimize": {
            "evaluation": {
                "max_tokens": 64, "context_tokens": 32, "tasks": None, "device_profiles": [],
                "speed_prompt_tokens": 16, "speed_decode_tokens": 8,
            },
            "variants": [{"name": "q8_0", "passes": [{"quantize": {"type": "Q8_0"}}]}],
        },
        "gates": {"max_perplexity_increase_pct": 50, "ram_share": 0.5, "min_decode_tokens_per_s": 1},
        "classes": [
            {"name": "x86_64-2gb", "memory_mib": 2048, "cores": 1, "disk_mib": 64, "blueprint": "tiny-big"},
            {"name": "x86_64-sub1gb", "memory_mib": 64, "cores": 1, "disk_mib": 64, "blueprint": "tiny-small",
             "gates": {"ram_share": 1.0}},
        ],
        "matrix": {"prompts": ["hello", "the shop"], "max_tokens": 8, "timeout_s": 90},
        "release": {"tag": "candidate", "policy": {"stages": [1.0], "soak_s": 0}},
    }  # fmt: skip
    value.update(changes)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(value, sort_keys=False))
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf", seed=1)


def test_a_class_that_cannot_hold_the_variant_is_excluded_from_the_release_and_a_rerun_does_no_work(
    tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    limits = detect()
    if limits.memory not in ("cgroup1", "cgroup2"):
        pytest.skip(f"this host cannot enforce a memory cap with a cgroup ({limits.memory})")
    settings = Settings()
    registry = Registry.open(settings)
    registry.keys.init()
    registry.import_model(tiny, "tiny")
    registry.close()
    plane = ControlPlane.open(ServerSettings())
    token = create_api_token(plane, "ci", "admin", "test").token
    plane.close()
    junit, summary = tmp_path / "junit.xml", tmp_path / "summary.md"
    with running_server(tmp_path / "server.log") as url, OperatorClient(url, token) as operator:
        operator.apply(_BLUEPRINT.format(name="tiny-big"))
        operator.apply(_BLUEPRINT.format(name="tiny-small"))
        argv = ["pipeline", "run", str(_pipeline(tmp_path)), "--server", url, "--token", token]

        code = cli([*argv, "--junit", str(junit), "--summary", str(summary), "--json"])

        report = json.loads(capsys.readouterr().out)
        assert code == 1 and report["outcome"] == "partial", report
        decisions = {d["device_class"]: d for d in report["decisions"]}
        assert decisions["x86_64-2gb"]["released"] is True and decisions["x86_64-2gb"]["variant"] == "q8_0"
        small = decisions["x86_64-sub1gb"]
        assert small["released"] is False and small["variant"] is None
        assert "memory cap" in small["reason"] and "not released" in small["reason"]
        runs = {r["device_class"]: r for r in report["matrix"]}
        big = runs["x86_64-2gb"]
        assert big["ok"] and big["prompts"] == 2 and big["tokens_per_s"] > 0
        assert 0 < big["peak_memory_bytes"] < 1 << 30 and big["limits"]["cpu"] == "taskset -c 0-0"
        assert not runs["x86_64-sub1gb"]["ok"] and runs["x86_64-sub1gb"]["memory_cap_hit"]
        variant = report["variants"][0]["digest"]
        releases = operator.rollouts()
        assert [(r.blueprint, r.to_digest) for r in releases] == [("tiny-big", variant)]
        registry = Registry.open(settings)
        assert registry.alias_digests("tiny").get("candidate-x86_64-2gb") == variant
        assert "candidate-x86_64-sub1gb" not in registry.alias_digests("tiny")
        registry.close()

        suites = {s.get("name"): s for s in ET.parse(junit).getroot()}
        assert set(suites) == {"tiny-ci.x86_64-2gb", "tiny-ci.x86_64-sub1gb"}
        big_suite, small_suite = suites["tiny-ci.x86_64-2gb"], suites["tiny-ci.x86_64-sub1gb"]
        names = [c.get("name") for c in big_suite]
        assert names == [f"q8_0: {g}" for g in ("perplexity", "task accuracy", "memory estimate", "test matrix",
                                                  "memory", "decode tokens/s")] + ["matrix q8_0"]  # fmt: skip
        assert big_suite.get("failures") == "0" and big_suite.get("tests") == "7"
        failed = [c.get("name") for c in small_suite if c.find("failure") is not None]
        assert "matrix q8_0" in failed and "q8_0: test matrix" in failed
        assert small_suite.get("failures") == str(len(failed))
        assert "⚠️ partial" in summary.read_text() and "| x86_64-sub1gb | - | no |" in summary.read_text()

        agent_logs = sorted((tmp_path / "home" / "pipeline" / "work" / "tiny-ci").glob("agent-*.log"))
        sizes = [p.stat().st_size for p in agent_logs]
        again = cli([*argv, "--json"])
        cached = json.loads(capsys.readouterr().out)
        assert again == 1 and cached["cached"] is True
        assert all(s["cached"] for s in cached["steps"])
        assert [p.stat().st_size for p in agent_logs] == sizes  # no agent ran again
        assert len(operator.rollouts()) == 1
        assert cli([*argv, "--allow-partial"]) == 0


def test_an_unreachable_control_plane_exits_3_and_the_rerun_resumes_from_the_cache(
    tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    baseline_from_blueprint = _pipeline(tmp_path, baseline={"blueprint": "tiny-big"}, release=None)

    code = cli(["pipeline", "run", str(baseline_from_blueprint), "--server", dead, "--token", "t"])

    assert code == 3
    assert "cannot reach the control plane" in capsys.readouterr().err
    no_matrix = _pipeline(tmp_path, release=None, matrix={"enabled": False})
    assert cli(["pipeline", "run", str(no_matrix), "--json"]) == 1  # one class fails its memory estimate
    report = json.loads(capsys.readouterr().out)
    steps = {s["name"]: s["cached"] for s in report["steps"]}
    assert steps["build"] is True and steps["baseline"] is True  # the variant was made and measured before
    assert report["outcome"] == "partial" and not report["matrix"]
    gates = {(g["class"], g["name"]): g["status"] for g in report["gates"]}
    assert gates[("x86_64-2gb", "test matrix")] == "skipped"
    assert gates[("x86_64-sub1gb", "memory estimate")] == "fail"  # 97 MiB estimated, 64 MiB of RAM
