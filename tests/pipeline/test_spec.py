"""The pipeline file: strict validation with field paths, the dry-run plan, and the shipped CI examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from slmops.cli import run as cli
from slmops.errors import BlueprintError
from slmops.pipeline import load_pipeline, parse_pipeline, plan_pipeline
from slmops.pipeline.limits import Enforcement

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ci"


def _valid(**changes: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "name": "tiny-ci",
        "source": "tiny@v1",
        "optimize": {"variants": [{"name": "q8_0", "passes": [{"quantize": {"type": "Q8_0"}}]}]},
        "classes": [{"name": "x86_64-2gb", "profile": "gateway-2gb"}],
    }
    value.update(changes)
    return value


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"classes": [{"name": "x86_64-2gb", "profile": "gateway-2gb", "gates": {"ram_share": 2}}]},
         "classes[0].gates.ram_share"),
        ({"classes": [{"name": "x86_64-2gb", "profile": "nope"}]}, "unknown device profile 'nope'"),
        ({"classes": [{"name": "x86_64-2gb"}]}, "give a profile"),
        ({"classes": [{"name": "a", "memory_mib": 64}, {"name": "a", "memory_mib": 64}]}, "repeated: a"),
        ({"classes": []}, "classes"),
        ({"optimize": {"name": "x", "variants": []}}, "optimize"),
        ({"baseline": {"ref": "tiny@v1", "blueprint": "b"}}, "exactly one of ref"),
        ({"release": {"tag": "candidate"}}, "set release.blueprint or classes[].blueprint"),
        ({"matrix": {"max_tokens": 0}}, "matrix.max_tokens"),
        ({"surprise": 1}, "surprise"),
    ],
)  # fmt: skip
def test_an_invalid_pipeline_file_names_the_field_path(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(BlueprintError) as caught:
        parse_pipeline(_valid(**changes), "p.yaml")

    assert expected in str(caught.value) and "p.yaml" in str(caught.value)


def test_class_gates_fall_back_to_the_pipeline_defaults_and_profiles_give_the_limits() -> None:
    spec = parse_pipeline(
        _valid(
            gates={"ram_share": 0.25, "min_decode_tokens_per_s": 5},
            classes=[
                {"name": "x86_64-2gb", "profile": "gateway-2gb", "gates": {"min_decode_tokens_per_s": 9}},
                {"name": "x86_64-sub1gb", "memory_mib": 512, "cores": 1, "disk_mib": 64},
            ],
        )
    )
    gateway, small = spec.classes

    assert spec.class_gates(gateway).min_decode_tokens_per_s == 9 and spec.class_gates(gateway).ram_share == 0.25
    assert spec.class_gates(small).min_decode_tokens_per_s == 5
    assert (gateway.memory_bytes, gateway.thread_count) == (2 << 30, 2)
    assert (small.memory_bytes, small.core_count, small.thread_count) == (512 << 20, 1, 1)


def test_the_dry_run_plan_names_every_step_and_runs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = parse_pipeline(
        _valid(
            release={"blueprint": "shop"}, classes=[{"name": "a", "memory_mib": 64}, {"name": "b", "memory_mib": 99}]
        )
    )
    limits = Enforcement("prlimit-as", "taskset", "none")

    lines = plan_pipeline(spec, limits)

    text = "\n".join(lines)
    assert "build variant q8_0: quantize" in text
    assert "1 variant(s) × 2 class(es)" in text and "memory prlimit-as" in text
    assert "release blueprint shop (classes a, b)" in text
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_valid()))
    assert cli(["pipeline", "run", str(path), "--dry-run"]) == 0
    assert "plan (nothing runs)" in capsys.readouterr().out
    assert not (tmp_path / "home" / "pipeline").exists() and not (tmp_path / "home" / "registry.db").exists()


def test_usage_and_configuration_errors_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsource: y\n")
    missing_source = tmp_path / "missing.yaml"
    missing_source.write_text(yaml.safe_dump(_valid(source="nothing@v1")))

    assert cli(["pipeline", "run", str(bad)]) == 2
    assert cli(["pipeline", "run", str(tmp_path / "absent.yaml")]) == 2
    assert cli(["pipeline", "run", str(missing_source)]) == 2  # a reference to no model
    assert cli(["pipeline", "run", str(bad), "--no-such-option"]) == 2


def test_the_shipped_pipeline_example_is_valid() -> None:
    spec = load_pipeline(EXAMPLES / "pipeline.yaml")

    assert {c.name for c in spec.classes} == {"x86_64-2gb", "aarch64-8gb"}
    assert plan_pipeline(spec, Enforcement("none", "none", "none"))


@pytest.mark.parametrize("name", ["github-actions.yml", ".gitlab-ci.yml"])
def test_the_ci_examples_parse_and_run_the_pipeline_with_junit_and_a_summary(name: str) -> None:
    document = yaml.safe_load((EXAMPLES / name).read_text())

    if name == "github-actions.yml":
        scripts = [s.get("run", "") for s in document["jobs"]["pipeline"]["steps"]]
    else:
        scripts = [line for job in ("plan", "pipeline") for line in document[job]["script"]]
        assert document["pipeline"]["artifacts"]["reports"]["junit"] == "pipeline-junit.xml"
    runs = [s for s in scripts if "slmops pipeline run" in s and "--dry-run" not in s]
    assert len(runs) == 1
    assert "--junit pipeline-junit.xml" in runs[0] and "--summary" in runs[0]
    assert "examples/ci/pipeline.yaml" in runs[0]
