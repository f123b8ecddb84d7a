"""The HF→GGUF exporter: tiny gemma3/llama/qwen2 models run in llama.cpp with the logits torch computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llama_cpp")

import gguf
import numpy as np
import torch

from slmops.errors import InvalidModelError
from slmops.optimize._llama import LlamaSession
from slmops.optimize.export_gguf import export_gguf, export_gguf_dir
from slmops.optimize.hf_load import load_hf_model
from slmops.optimize.torch_ops import structured_prune
from tests.tiny_hf import TINY_ARCHS, write_tiny_hf

IDS = [5, 100, 200, 270, 30, 7, 8, 9, 280, 2]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    arch = str(request.param)
    return arch, write_tiny_hf(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch)


def torch_logits(model: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()  # (tokens, vocab)


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    with LlamaSession(path, n_ctx=64, max_outputs=16) as session:
        logits = session.decode(ids, 0, [True] * len(ids))
    assert logits is not None
    return logits  # (tokens, vocab)


@pytest.mark.parametrize("file_type", ["F32", "F16"])
def test_exported_model_gives_torch_logits_in_llama_cpp(tiny: tuple[str, Path], tmp_path: Path, file_type: str) -> None:
    arch, directory = tiny
    out = tmp_path / "model.gguf"

    report = export_gguf_dir(directory, out, file_type=file_type)  # type: ignore[arg-type]

    expected = torch_logits(load_hf_model(directory), IDS)
    got = llama_logits(out, IDS)
    assert report.arch == arch
    assert got.shape == expected.shape
    # llama.cpp keeps its KV cache in F16: agreement is to about 1e-3 of logits of size ~1.5
    assert np.abs(got - expected).max() < 0.01
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_export_writes_llama_cpp_conventions(tiny: tuple[str, Path], tmp_path: Path) -> None:
    arch, directory = tiny
    out = tmp_path / "model.gguf"

    export_gguf_dir(directory, out, file_type="F16")

    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in reader.tensors}
    arch_key = reader.fields["general.architecture"].contents()
    del reader
    assert arch_key == arch
    for name, ggml_type in types.items():
        one_d = "norm" in name or name.endswith(".bias")
        assert ggml_type == (gguf.GGMLQuantizationType.F32 if one_d else gguf.GGMLQuantizationType.F16), name
    assert ("output.weight" in types) == (arch == "llama")  # tied heads are not written
    assert ("blk.0.attn_q.bias" in types) == (arch == "qwen2")
    if arch == "gemma3":  # stored as 1 + w
        model = load_hf_model(directory)
        reader = gguf.GGUFReader(str(out))
        stored = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight").data
        np.testing.assert_allclose(stored, model.model.layers[0].input_layernorm.weight.detach().numpy() + 1, rtol=1e-6)
        del reader


def test_exported_tokenizer_matches_hf_and_generates(tiny: tuple[str, Path], tmp_path: Path) -> None:
    import llama_cpp
    from transformers import AutoTokenizer

    _, directory = tiny
    out = tmp_path / "model.gguf"
    export_gguf_dir(directory, out, file_type="F16")
    text = "hello the small world of edge device"

    expected = AutoTokenizer.from_pretrained(directory)(text)["input_ids"]
    with LlamaSession(out, vocab_only=True) as session:
        got = session.tokenize(text, add_special=True)
    llm = llama_cpp.Llama(model_path=str(out), verbose=False, n_ctx=64, n_threads=2)
    try:
        completion = llm.create_completion("hello the", max_tokens=6, temperature=0.0)
    finally:
        llm.close()

    assert got == expected
    assert completion["usage"]["completion_tokens"] >= 1


def test_pruned_mlp_export_matches_torch(tiny: tuple[str, Path], tmp_path: Path) -> None:
    _, directory = tiny
    model, report = structured_prune(load_hf_model(directory), 0.25, target="mlp", mode="remove")
    out = tmp_path / "pruned.gguf"

    export_gguf(model, out, tokenizer_dir=directory, file_type="F32")

    assert report.units_after == 96
    assert np.abs(llama_logits(out, IDS) - torch_logits(model, IDS)).max() < 0.01


def test_pruned_heads_export_matches_torch(tiny: tuple[str, Path], tmp_path: Path) -> None:
    """Fewer heads than hidden/head_dim: the exporter must write key_length and permute with the new head count."""
    arch, directory = tiny
    model, report = structured_prune(load_hf_model(directory), 0.5, target="heads", mode="remove")
    out = tmp_path / "pruned.gguf"
    if arch == "qwen2":  # llama.cpp's qwen2 sizes attn_q as hidden × hidden
        with pytest.raises(InvalidModelError, match="mode 'mask'"):
            export_gguf(model, out, tokenizer_dir=directory, file_type="F32")
        return

    export_gguf(model, out, tokenizer_dir=directory, file_type="F32")

    assert report.units_after == 2
    assert np.abs(llama_logits(out, IDS) - torch_logits(model, IDS)).max() < 0.01


def test_unsupported_model_type_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))

    with pytest.raises(InvalidModelError, match="supports model types"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer_dir=tmp_path)
    assert not (tmp_path / "x.gguf").exists()


def test_missing_tokenizer_is_refused_and_nothing_is_left(tiny: tuple[str, Path], tmp_path: Path) -> None:
    _, directory = tiny
    model = load_hf_model(directory)

    with pytest.raises(InvalidModelError, match="needs a tokenizer"):
        export_gguf(model, tmp_path / "x.gguf", tokenizer_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
