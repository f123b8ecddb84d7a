"""GGUF LoRA adapters: llama.cpp runs base + adapter exactly as the merged model, for every exporter architecture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("llama_cpp")

import gguf
import llama_cpp
import numpy as np

from slmops.errors import InvalidModelError, RuntimeBackendError
from slmops.optimize._llama import LlamaSession
from slmops.optimize.gguf_lora import export_lora_gguf
from slmops.optimize.lora import ADAPTER_CONFIG_FILE, file_sha256
from slmops.optimize.passes import PassResult, get_pass
from slmops.optimize.task_eval import attach_lora
from tests.tiny_hf import TINY_ARCHS, write_tiny_hf

IDS = [5, 100, 200, 270, 30, 7, 8, 9, 280, 12]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run_pass(name: str, input_path: Path, params: dict[str, Any], workdir: Path) -> PassResult:
    step = get_pass(name)
    workdir.mkdir()
    return step.run(input_path, step.parse_params(params), workdir, lambda done, total: None)


def train(directory: Path, tmp_path: Path, targets: list[str]) -> Path:
    dataset = tmp_path / "train.jsonl"
    line = {"messages": [{"role": "user", "content": "hello world"}], "completion": "small edge model"}
    dataset.write_text(json.dumps(line) + "\n", encoding="utf-8")
    params = {
        "dataset": str(dataset),
        "dataset_sha256": file_sha256(dataset),
        "steps": 6,
        "learning_rate": 0.05,
        "rank": 4,
        "alpha": 12.0,
        "target_modules": targets,
    }
    return run_pass("lora", directory, params, tmp_path / "lora").output_path


def session_logits(path: Path) -> np.ndarray:
    with LlamaSession(path, n_ctx=64, max_outputs=16) as session:
        logits = session.decode(IDS, 0, [True] * len(IDS))
    assert logits is not None
    return logits  # (tokens, vocab)


def adapter_logits(base: Path, adapter: Path) -> np.ndarray:
    llama = llama_cpp.Llama(str(base), lora_path=str(adapter), n_ctx=64, logits_all=True, verbose=False)
    try:
        llama.eval(IDS)
        return np.array(llama.scores[: len(IDS)], dtype=np.float32)  # (tokens, vocab)
    finally:
        llama.close()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_base_plus_gguf_adapter_equals_the_merged_model_in_llama_cpp(arch: str, tmp_path: Path) -> None:
    directory = write_tiny_hf(tmp_path / "m", arch=arch, seed=4)
    adapter = train(directory, tmp_path, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    base_gguf = run_pass("export_gguf", directory, {"file_type": "F32"}, tmp_path / "base").output_path
    merged = run_pass("lora_merge", adapter, {}, tmp_path / "merged").output_path
    merged_gguf = run_pass("export_gguf", merged, {"file_type": "F32"}, tmp_path / "mg").output_path

    exported = run_pass("export_gguf_lora", adapter, {}, tmp_path / "ad")

    with_adapter = adapter_logits(base_gguf, exported.output_path)
    expected = session_logits(merged_gguf)
    base = session_logits(base_gguf)
    # llama.cpp keeps its KV cache in F16 (as in test_export_gguf): agreement to ~1e-2 of logits of size ~2,
    # while the adapter moves them by ~1
    assert np.abs(with_adapter - expected).max() < 0.02
    assert np.abs(expected - base).max() > 0.5
    assert (with_adapter.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert exported.report["tensor_pairs"] == 2 * 5 and exported.report["rank"] == 4
    assert exported.report["arch"] == {"gemma3": "gemma3", "llama": "llama", "qwen2": "qwen2"}[arch]


def test_adapter_gguf_metadata_and_shapes_follow_llama_cpp(tmp_path: Path) -> None:
    directory = write_tiny_hf(tmp_path / "m", arch="gemma3", seed=4)
    adapter = train(directory, tmp_path, ["q_proj", "v_proj"])

    report = export_lora_gguf(adapter, tmp_path / "a.gguf", file_type="F16")

    reader = gguf.GGUFReader(str(report.output_path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "gemma3" and fields["adapter.lora.alpha"] == 12.0
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # ggml ne order
    assert shapes["blk.0.attn_q.weight.lora_a"] == [64, 4]  # ne = [in, rank]
    assert shapes["blk.0.attn_q.weight.lora_b"] == [4, 64]  # ne = [rank, out]
    assert shapes["blk.1.attn_v.weight.lora_b"] == [4, 32]
    assert {t.tensor_type.name for t in reader.tensors} == {"F16"}
    assert len(shapes) == 2 * 2 * 2


def test_a_wrong_base_or_a_foreign_adapter_is_refused(tmp_path: Path) -> None:
    directory = write_tiny_hf(tmp_path / "m", arch="llama", seed=4)
    adapter = train(directory, tmp_path, ["q_proj"])
    out = run_pass("export_gguf_lora", adapter, {}, tmp_path / "ad").output_path
    other = write_tiny_hf(tmp_path / "g", arch="gemma3", seed=4)
    other_gguf = run_pass("export_gguf", other, {"file_type": "F32"}, tmp_path / "og").output_path

    # llama.cpp refuses it ("model arch and LoRA arch mismatch"); Llama(lora_path=...) of llama-cpp-python 0.3.36
    # would not notice, attach_lora does
    with LlamaSession(other_gguf, n_ctx=32) as session, pytest.raises(RuntimeBackendError, match="LoRA adapter"):
        attach_lora(session, out)

    config = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    (adapter / ADAPTER_CONFIG_FILE).write_text(json.dumps({**config, "use_dora": True}), encoding="utf-8")
    with pytest.raises(InvalidModelError, match="DoRA"):
        export_lora_gguf(adapter, tmp_path / "x.gguf")
