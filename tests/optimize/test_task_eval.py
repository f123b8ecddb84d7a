"""Held-out task scoring in llama.cpp: base vs base + adapter, NLL agreeing with torch, refused adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

import torch

from slmops.errors import RuntimeBackendError
from slmops.optimize._llama import LlamaSession
from slmops.optimize.hf_load import load_hf_model
from slmops.optimize.lora import (
    chat_format,
    completion_loss,
    encode_examples,
    file_sha256,
    load_tokenizer,
    pad_id_of,
    read_chat_jsonl,
)
from slmops.optimize.passes import PassResult, get_pass
from slmops.optimize.task_eval import attach_lora, normalize, score_task
from tests.tiny_hf import write_tiny_hf


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_pass(name: str, input_path: Path, params: dict[str, Any], workdir: Path) -> PassResult:
    step = get_pass(name)
    workdir.mkdir()
    return step.run(input_path, step.parse_params(params), workdir, lambda done, total: None)


def write_jsonl(path: Path, prompts: list[str], completion: str) -> Path:
    lines = [json.dumps({"messages": [{"role": "user", "content": p}], "completion": completion}) for p in prompts]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("task")
    directory = write_tiny_hf(tmp / "m", arch="gemma3", seed=2)
    train = write_jsonl(tmp / "train.jsonl", ["hello world", "small model", "edge device", "the language"], "the edge")
    heldout = write_jsonl(tmp / "heldout.jsonl", ["hello model", "small device", "world runs"], "the edge")
    params = {
        "dataset": str(train),
        "dataset_sha256": file_sha256(train),
        "steps": 40,
        "learning_rate": 0.02,
        "rank": 8,
        "alpha": 16.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
    adapter = run_pass("lora", directory, params, tmp / "lora").output_path
    base = run_pass("export_gguf", directory, {"file_type": "F32"}, tmp / "base").output_path
    lora = run_pass("export_gguf_lora", adapter, {}, tmp / "ad").output_path
    return {"hf": directory, "base": base, "lora": lora, "heldout": heldout}


def test_the_adapter_beats_its_base_on_held_out_items(trained: dict[str, Path]) -> None:
    base = score_task(trained["base"], trained["heldout"], format_regex=r"the \w+", keep_items=True)
    tuned = score_task(trained["base"], trained["heldout"], lora_path=trained["lora"], format_regex=r"the \w+")

    assert base.adapter is False and tuned.adapter is True
    # Well below the base's, not by an exact factor: the tiny model's training numerics differ between CPUs (the
    # ratio was 0.52 on an AMD EPYC host of this kind, lower on an Intel one).
    assert tuned.mean_nll < 0.75 * base.mean_nll, (tuned, base)
    assert tuned.exact_match == 1.0 and tuned.format_score == 1.0
    assert base.exact_match == 0.0
    assert base.n_items == tuned.n_items == 3 and base.completion_tokens == tuned.completion_tokens
    assert len(base.items) == 3 and tuned.items == ()


def test_llama_cpp_nll_matches_the_torch_completion_loss(trained: dict[str, Path]) -> None:
    tokenizer = load_tokenizer(trained["hf"])
    examples = read_chat_jsonl(trained["heldout"])
    encoded, _ = encode_examples(tokenizer, chat_format(trained["hf"], tokenizer), examples, 256)

    expected = completion_loss(torch, load_hf_model(trained["hf"]), encoded, pad_id_of(tokenizer), batch_size=1)
    got = score_task(trained["base"], trained["heldout"], max_new_tokens=1)

    assert got.completion_tokens == sum(e.n_completion for e in encoded)
    assert abs(got.mean_nll - expected) < 1e-3 * expected


def test_an_adapter_for_another_base_is_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    other = write_tiny_hf(tmp_path / "llama", arch="llama", seed=1)
    other_gguf = run_pass("export_gguf", other, {"file_type": "F32"}, tmp_path / "o").output_path

    with LlamaSession(other_gguf, n_ctx=32) as session, pytest.raises(RuntimeBackendError, match="LoRA adapter"):
        attach_lora(session, trained["lora"])
    with pytest.raises(RuntimeBackendError, match="could not load the LoRA"):
        score_task(other_gguf, trained["heldout"], lora_path=trained["lora"])


def test_a_changed_held_out_file_is_refused(trained: dict[str, Path], tmp_path: Path) -> None:
    from slmops.errors import BlueprintError

    with pytest.raises(BlueprintError, match="has sha256"):
        score_task(trained["base"], trained["heldout"], dataset_sha256="0" * 64)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [("The Edge.", "the   edge", True), ("Ｔｈｅ edge", "the edge", True), ("the edges", "the edge", False)],
)
def test_normalize(a: str, b: str, same: bool) -> None:
    assert (normalize(a) == normalize(b)) is same
