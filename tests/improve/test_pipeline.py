"""The improve loop on a tiny model: dataset → LoRA → gates → registered adapter version, resumable and cached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

from slmops.config import Settings
from slmops.core.adapters import adapter_base
from slmops.improve import parse_improve, run_improve
from slmops.optimize.passes import get_pass
from slmops.registry import Registry
from slmops.registry.datasets import DatasetRegistry
from tests.tiny_hf import write_tiny_hf

TRAIN = ["hello world", "small model", "edge device", "the language", "world model", "device edge"]
HELDOUT = ["hello model", "small device", "world runs"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _jsonl(prompts: list[str], completion: str) -> bytes:
    lines = [json.dumps({"messages": [{"role": "user", "content": p}], "completion": completion}) for p in prompts]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def home(tmp_path: Path) -> tuple[Settings, Registry, str]:
    settings = Settings(home=tmp_path / "home")
    registry = Registry.open(settings)
    directory = write_tiny_hf(tmp_path / "hf", arch="gemma3", seed=2)
    step = get_pass("export_gguf")
    (tmp_path / "gguf").mkdir()
    gguf = step.run(directory, step.parse_params({"file_type": "F32"}), tmp_path / "gguf", lambda d, t: None)
    base = registry.import_model(gguf.output_path, "tiny").envelope
    datasets = DatasetRegistry.of(registry)
    datasets.register(
        "tiny-feedback",
        {"train.jsonl": _jsonl(TRAIN, "the edge"), "heldout.jsonl": _jsonl(HELDOUT, "the edge")},
        records={"train.jsonl": len(TRAIN), "heldout.jsonl": len(HELDOUT)},
    )
    return settings, registry, base.digest


def _spec(**gates: Any) -> Any:
    return parse_improve(
        {
            "name": "tiny-edge",
            "model": "tiny@v1",
            "dataset": "tiny-feedback@latest",
            "lora": {
                "steps": 30,
                "learning_rate": 0.02,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            },
            "evaluation": {"format_regex": r"the \w+", "tasks": None, "max_tokens": 64, "context_tokens": 32},
            "gates": {"task_metric": "exact", "min_gain": 0.5, "max_adapter_fraction": None, **gates},
        }
    )


def test_a_better_adapter_is_registered_as_a_variant_of_its_base_and_a_rerun_does_no_work(
    home: tuple[Settings, Registry, str],
) -> None:
    settings, registry, base_digest = home

    report = run_improve(_spec(max_perplexity_increase_pct=1000), registry=registry, settings=settings)

    assert report.outcome == "registered", report.to_json()
    assert report.candidate["task_exact"] > report.parent["task_exact"]
    assert report.candidate["task_nll"] < report.parent["task_nll"]
    assert report.adapter is not None
    manifest = report.adapter.manifest
    assert adapter_base(manifest) == base_digest and manifest.lineage.parents == [base_digest]
    assert manifest.variant == "lora-tiny-edge" and [f.path for f in manifest.files] == ["adapter.gguf"]
    assert registry.verify(report.adapter.digest).ok

    again = run_improve(_spec(max_perplexity_increase_pct=1000), registry=registry, settings=settings)

    ran = {s.name: s.cached for s in again.steps}
    assert all(ran[name] for name in ("dataset", "dequantize", "train", "export", "evaluate parent", "register"))
    assert again.adapter is not None and again.adapter.digest == report.adapter.digest


def test_a_candidate_that_fails_a_gate_is_neither_registered_nor_released(
    home: tuple[Settings, Registry, str],
) -> None:
    settings, registry, _ = home
    before = [v.digest for v in registry.versions("tiny")]

    report = run_improve(_spec(min_gain=2.0), registry=registry, settings=settings)  # an exact-match gain above 1

    assert report.outcome == "gates_failed" and report.adapter is None
    assert [g.status for g in report.gates if g.name.startswith("held-out")] == ["fail"]
    assert [v.digest for v in registry.versions("tiny")] == before
