"""The distill pass on tiny real models: a smaller student that moves toward its teacher, exportable to GGUF."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch

from slmops.errors import BlueprintError
from slmops.optimize.distill import drop_layers, kept_layers
from slmops.optimize.hf_load import load_hf_model
from slmops.optimize.lora import file_sha256
from slmops.optimize.passes import PassResult, get_pass
from tests.tiny_hf import write_tiny_hf

IDS = [2, 300, 301, 302, 5, 6, 310, 320, 9, 12, 40, 41]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_pass(name: str, input_path: Path, params: dict[str, Any], workdir: Path) -> PassResult:
    step = get_pass(name)
    workdir.mkdir()
    return step.run(input_path, step.parse_params(params), workdir, lambda done, total: None)


def kl_to_teacher(teacher: Any, student: Any) -> float:
    ids = torch.tensor([IDS])
    with torch.no_grad():
        p = torch.log_softmax(teacher(ids).logits[0], -1)  # (tokens, vocab)
        q = torch.log_softmax(student(ids).logits[0], -1)  # (tokens, vocab)
    return float((p.exp() * (p - q)).sum(-1).mean())


COMMON = {"steps": 30, "learning_rate": 3e-3, "eval_max_tokens": 256, "eval_context_tokens": 64, "batch_size": 4}


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_depth_pruned_student_moves_toward_the_teacher(arch: str, tmp_path: Path) -> None:
    teacher_dir = write_tiny_hf(tmp_path / "t", arch=arch, n_layers=4, seed=1)
    teacher = load_hf_model(teacher_dir)
    pruned, _ = drop_layers(teacher, [0, 3])

    result = run_pass("distill", teacher_dir, {"drop_layers": [1, 2], **COMMON}, tmp_path / "d")

    report = result.report
    student = load_hf_model(result.output_path)
    assert student.config.num_hidden_layers == 2 and report["kept_layers"] == [0, 3]
    assert report["student_params"] < report["teacher_params"]
    assert kl_to_teacher(teacher, student) < 0.9 * kl_to_teacher(teacher, pruned)  # on tokens it never saw
    assert report["loss_last"] < report["loss_first"]
    gap = report["ppl_pruned"] - report["ppl_teacher"]
    if gap > 0:
        assert report["recovery"] == pytest.approx((report["ppl_pruned"] - report["ppl_distilled"]) / gap)
    gguf = run_pass("export_gguf", result.output_path, {"file_type": "F32"}, tmp_path / "g")
    assert gguf.report["tensors"] > 0


def test_width_pruned_student_from_a_dataset_is_deterministic(tmp_path: Path) -> None:
    teacher_dir = write_tiny_hf(tmp_path / "t", arch="gemma3", seed=1)
    dataset = tmp_path / "d.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": w}], "completion": "the model"} for w in ("hello", "edge", "world")
    ]
    dataset.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    params = {"width_sparsity": 0.5, "dataset": str(dataset), "dataset_sha256": file_sha256(dataset), **COMMON}
    params["steps"] = 5

    one = run_pass("distill", teacher_dir, params, tmp_path / "a")
    two = run_pass("distill", teacher_dir, params, tmp_path / "b")

    assert one.report["width"]["target"] == "mlp" and one.report["student_params"] < one.report["teacher_params"]
    assert one.report["training_data"].startswith("dataset sha256:")
    weights = [(r.output_path / "model.safetensors").read_bytes() for r in (one, two)]
    assert weights[0] == weights[1]


def test_gemma3_layer_types_are_reset_to_llama_cpps_pattern(tmp_path: Path) -> None:
    teacher = load_hf_model(write_tiny_hf(tmp_path / "t", arch="gemma3", n_layers=7, seed=1))
    assert teacher.config.layer_types[5] == "full_attention"

    student, reset = drop_layers(teacher, [0, 1, 2, 3, 4, 6])

    assert reset and student.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "nothing to prune"),
        ({"drop_layers": [0], "keep_every": 2}, "not both"),
        ({"drop_layers": [0], "dataset": "x.jsonl"}, "go together"),
    ],
)
def test_bad_distill_parameters_are_recipe_errors(params: dict[str, Any], message: str) -> None:
    with pytest.raises(BlueprintError, match=message):
        get_pass("distill").parse_params(params)


def test_kept_layers() -> None:
    step = get_pass("distill")
    assert kept_layers(7, step.parse_params({"keep_every": 3})) == [0, 3, 6]
    assert kept_layers(4, step.parse_params({"drop_layers": [1, 3]})) == [0, 2]
    with pytest.raises(BlueprintError, match="not layers"):
        kept_layers(4, step.parse_params({"drop_layers": [4]}))
