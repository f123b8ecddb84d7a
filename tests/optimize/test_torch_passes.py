"""Torch passes on tiny gemma3/llama/qwen2 models: int8, magnitude, structured and 2:4 pruning, GGUF round trips;
and on the real gemma3-270m (integration): the exporter's cross-check against llama.cpp and the cost of pruning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llama_cpp")

import numpy as np
import torch
from safetensors import safe_open

import slmops.optimize.torch_passes  # noqa: F401  (registers the torch passes)
from slmops.errors import BlueprintError, InvalidModelError
from slmops.optimize._llama import LlamaSession
from slmops.optimize.gguf_metadata import GGUF_METADATA_FILE
from slmops.optimize.hf_load import INT8_SCALE_SUFFIX, load_hf_model
from slmops.optimize.passes import PassResult, get_pass
from slmops.optimize.torch_ops import (
    magnitude_prune,
    prunable_linears,
    quantize_int8_weight_only,
    semi_structured_prune,
    structured_prune,
    torch_perplexity,
)
from tests.tiny_gguf import write_tiny_gguf
from tests.tiny_hf import TINY_ARCHS, write_tiny_hf

IDS = [5, 100, 200, 270, 30, 7, 8, 9, 280, 2]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    arch = str(request.param)
    return arch, write_tiny_hf(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch)


def logits(model: Any, ids: list[int] = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # (tokens, vocab)


def run_pass(name: str, input_path: Path, params: dict[str, Any], workdir: Path) -> PassResult:
    step = get_pass(name)
    workdir.mkdir()
    calls: list[tuple[float, float]] = []
    result = step.run(input_path, step.parse_params(params), workdir, lambda done, total: calls.append((done, total)))
    assert result.output_path.parent == workdir
    assert calls and calls[-1][0] == calls[-1][1]  # progress reached its total
    return result


# ---------------------------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_magnitude_prune_hits_the_target_and_drops_the_smallest(tiny: tuple[str, Path], scope: str) -> None:
    _, directory = tiny
    model = load_hf_model(directory)
    before = {name: w.detach().clone() for name, w in prunable_linears(model)}

    report = magnitude_prune(model, 0.6, scope=scope)  # type: ignore[arg-type]

    if scope == "global":
        assert report.zeros == round(0.6 * sum(w.numel() for w in before.values()))
    for name, weight in prunable_linears(model):
        pruned = weight == 0
        if scope == "per_layer":
            assert int(pruned.sum()) == round(0.6 * weight.numel()), name
            # within a tensor every dropped weight is no larger than every kept one
            assert before[name].abs()[pruned].max() <= before[name].abs()[~pruned].min()
        torch.testing.assert_close(weight[~pruned], before[name][~pruned])
    if scope == "global":  # one threshold for all tensors
        dropped = torch.cat([before[n].abs()[w == 0] for n, w in prunable_linears(model)])
        kept = torch.cat([before[n].abs()[w != 0] for n, w in prunable_linears(model)])
        assert dropped.max() <= kept.min()
        assert len({round(t.sparsity, 3) for t in report.tensors}) > 1  # layers end up different
    assert abs(report.overall - 0.6) < 1e-4


def test_global_prune_breaks_ties_to_hit_the_exact_count(tiny: tuple[str, Path]) -> None:
    _, directory = tiny
    model = load_hf_model(directory)
    with torch.no_grad():  # a quantized-looking model: only 5 distinct magnitudes
        for _, weight in prunable_linears(model):
            weight.copy_(torch.round(weight * 40).clamp(-2, 2) / 40)
    total = sum(w.numel() for _, w in prunable_linears(model))

    report = magnitude_prune(model, 0.5, scope="global")

    assert report.zeros == round(0.5 * total)


def test_semi_structured_keeps_the_two_largest_of_every_four(tiny: tuple[str, Path]) -> None:
    _, directory = tiny
    model = load_hf_model(directory)
    before = {name: w.detach().clone() for name, w in prunable_linears(model)}

    report = semi_structured_prune(model)

    for name, weight in prunable_linears(model):
        groups = weight.view(weight.shape[0], -1, 4)  # (out, in/4, 4)
        assert ((groups != 0).sum(-1) == 2).all(), name
        original = before[name].abs().view(weight.shape[0], -1, 4)
        kept_min = original.masked_fill(groups == 0, float("inf")).amin(-1)
        dropped_max = original.masked_fill(groups != 0, -1.0).amax(-1)
        assert (dropped_max <= kept_min).all(), name
    assert report.overall == 0.5


# ---------------------------------------------------------------------------------------------- structured


@pytest.mark.parametrize("target", ["heads", "mlp"])
def test_structured_remove_equals_mask_and_shrinks_the_model(tiny: tuple[str, Path], target: str) -> None:
    _, directory = tiny
    parent = load_hf_model(directory)
    expected_parent = logits(parent)

    masked, mask_report = structured_prune(load_hf_model(directory), 0.5, target=target, mode="mask")  # type: ignore[arg-type]
    removed, remove_report = structured_prune(parent, 0.5, target=target, mode="remove")  # type: ignore[arg-type]

    torch.testing.assert_close(logits(removed), logits(masked), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(removed), expected_parent, atol=1e-3)
    assert remove_report.params_after < remove_report.params_before
    assert mask_report.removed == remove_report.removed
    for layer, units in mask_report.removed.items():
        attn = masked.model.layers[layer].self_attn
        mlp = masked.model.layers[layer].mlp
        if target == "heads":
            assert remove_report.units_after == 2 and removed.config.num_attention_heads == 2
            assert len([u for u in units if u < 2]) == 1 and len(units) == 2  # one head from each KV group
            o = attn.o_proj.weight.view(attn.o_proj.weight.shape[0], 4, -1)  # (hidden, heads, head_dim)
            assert all((o[:, u] == 0).all() and (o[:, v] != 0).any() for u in units for v in set(range(4)) - set(units))
        else:
            assert removed.config.intermediate_size == 64 and len(units) == 64
            assert (mlp.down_proj.weight[:, list(units)] == 0).all()
            assert (mlp.gate_proj.weight[list(units)] == 0).all()


def test_structured_prune_refuses_to_remove_every_head(tiny: tuple[str, Path]) -> None:
    _, directory = tiny

    with pytest.raises(InvalidModelError, match="leaves no unit"):
        structured_prune(load_hf_model(directory), 0.9, target="heads")


# ---------------------------------------------------------------------------------------------- int8


def test_int8_stores_int8_with_scales_and_reloads_the_measured_weights(tiny: tuple[str, Path], tmp_path: Path) -> None:
    _, directory = tiny
    parent = logits(load_hf_model(directory))

    result = run_pass("int8", directory, {}, tmp_path / "w")

    reloaded = load_hf_model(result.output_path)
    in_memory = load_hf_model(directory)
    quantize_int8_weight_only(in_memory)
    with safe_open(str(result.output_path / "model.safetensors"), framework="pt") as handle:
        name = prunable_linears(reloaded)[0][0]
        q, scale = handle.get_tensor(name), handle.get_tensor(name + INT8_SCALE_SUFFIX)
    assert q.dtype == torch.int8 and scale.shape == (q.shape[0], 1)
    assert q.abs().amax(dim=1).eq(127).all()  # symmetric per channel: each row's largest weight maps to ±127
    torch.testing.assert_close(logits(reloaded), logits(in_memory))
    assert 0 < (logits(reloaded) - parent).abs().max() < 0.05
    assert result.report["bytes_int8_with_scales"] < result.report["bytes_float32"] / 3.5
    assert result.report["max_relative_rms_error"] < 0.01


# ---------------------------------------------------------------------------------------------- passes


def test_prune_pass_reports_per_tensor_and_keeps_the_tokenizer(tiny: tuple[str, Path], tmp_path: Path) -> None:
    _, directory = tiny

    result = run_pass("prune", directory, {"sparsity": 0.3, "scope": "per_layer"}, tmp_path / "w")

    assert (result.output_path / "tokenizer.json").is_file()
    assert result.report["scope"] == "per_layer"
    assert set(result.report["per_tensor"]) == {n for n, _ in prunable_linears(load_hf_model(directory))}
    assert all(abs(s - 0.3) < 1e-3 for s in result.report["per_tensor"].values())
    zeros = sum(int((w == 0).sum()) for _, w in prunable_linears(load_hf_model(result.output_path)))
    assert abs(zeros / result.report["targeted_params"] - 0.3) < 1e-4


def test_pass_chain_structured_then_2_4_then_export_runs_in_llama_cpp(tiny: tuple[str, Path], tmp_path: Path) -> None:
    _, directory = tiny

    pruned = run_pass("prune_struct", directory, {"sparsity": 0.25, "target": "mlp"}, tmp_path / "a")
    sparse = run_pass("sparse_2_4", pruned.output_path, {}, tmp_path / "b")
    exported = run_pass("export_gguf", sparse.output_path, {"file_type": "F32"}, tmp_path / "c")

    model = load_hf_model(sparse.output_path)
    with LlamaSession(exported.output_path, n_ctx=64, max_outputs=16) as session:
        got = session.decode(IDS, 0, [True] * len(IDS))
    assert pruned.report["units_per_layer_after"] == 96 and sparse.report["overall_sparsity"] == 0.5
    assert got is not None and np.abs(got - logits(model).numpy()).max() < 0.01


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("prune", {"sparsity": 1.5}, "sparsity"),
        ("prune", {"sparsity": 0.5, "scop": "x"}, "scop"),
        ("prune_struct", {"sparsity": 0.5, "target": "experts"}, "target"),
        ("export_gguf", {"file_type": "Q4"}, "file_type"),
    ],
)
def test_bad_parameters_are_recipe_errors(name: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(BlueprintError, match=message):
        get_pass(name).parse_params(params)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gguf_round_trip_through_transformers_keeps_llama_cpp_logits(arch: str, tmp_path: Path) -> None:
    """GGUF → transformers (hf_from_gguf) → our exporter → GGUF: llama.cpp computes the same logits, and the
    tokenizer metadata is copied key for key."""
    import gguf

    source = write_tiny_gguf(tmp_path / "src" / "tiny.gguf", arch=arch, vocab_size=300, file_type="F32", seed=3)

    hf = run_pass("hf_from_gguf", source, {}, tmp_path / "a")
    back = run_pass("export_gguf", hf.output_path, {"file_type": "F32"}, tmp_path / "b")

    assert (hf.output_path / GGUF_METADATA_FILE).is_file()
    with LlamaSession(source, n_ctx=64, max_outputs=16) as session:
        expected = session.decode(IDS, 0, [True] * len(IDS))
    with LlamaSession(back.output_path, n_ctx=64, max_outputs=16) as session:
        got = session.decode(IDS, 0, [True] * len(IDS))
    assert expected is not None and got is not None
    assert np.abs(got - expected).max() < 1e-3
    readers = [gguf.GGUFReader(str(p)) for p in (source, back.output_path)]
    keys = [{k: f.contents() for k, f in r.fields.items() if k.startswith("tokenizer.")} for r in readers]
    del readers
    assert keys[0] == keys[1] and len(keys[0]) >= 8


def test_torch_perplexity_agrees_with_llama_cpp_on_a_tiny_model(tmp_path: Path) -> None:
    from slmops.optimize.evaluate import perplexity

    directory = write_tiny_hf(tmp_path / "m", arch="gemma3", seed=5)
    out = run_pass("export_gguf", directory, {"file_type": "F32"}, tmp_path / "w").output_path
    tokens = [int(t) for t in torch.randint(4, 300, (128,), generator=torch.Generator().manual_seed(0))]

    expected, n = perplexity(out, tokens, context_tokens=64, max_outputs=16)
    got, m = torch_perplexity(load_hf_model(directory), tokens, context_tokens=64, bos=2, max_outputs=16)

    assert n == m == 2 * 32
    assert abs(got / expected - 1) < 1e-3


# ---------------------------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def gemma_hf(gemma_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gemma3-270m dequantized into transformers once for this module (~1 GB, about a minute)."""
    workdir = tmp_path_factory.mktemp("gemma-hf")
    step = get_pass("hf_from_gguf")
    return step.run(gemma_gguf, step.parse_params({}), workdir, lambda d, t: None).output_path


@pytest.mark.integration
def test_gemma_export_cross_check_and_pruning_cost(gemma_gguf: Path, gemma_hf: Path, tmp_path: Path) -> None:
    """The exported F16 GGUF's perplexity in llama.cpp equals the torch model's within 0.5% on the same tokens;
    a 50%-pruned model is clearly worse than its parent."""
    from slmops.optimize._data import read_text
    from slmops.optimize.evaluate import perplexity, tokenize_for_eval

    torch.set_num_threads(2)
    tokens = list(tokenize_for_eval(gemma_gguf, read_text("builtin:eval.txt"), 512, []).text)
    f16 = run_pass("export_gguf", gemma_hf, {"file_type": "F16"}, tmp_path / "f16").output_path

    llama_ppl, scored = perplexity(f16, tokens, context_tokens=256)
    torch_ppl, torch_scored = torch_perplexity(load_hf_model(gemma_hf), tokens, context_tokens=256, bos=2)

    assert scored == torch_scored == 256
    assert abs(llama_ppl / torch_ppl - 1) < 0.005, (llama_ppl, torch_ppl)

    pruned = run_pass("prune", gemma_hf, {"sparsity": 0.5}, tmp_path / "p")
    pruned_f16 = run_pass("export_gguf", pruned.output_path, {"file_type": "F16"}, tmp_path / "pf16").output_path
    pruned_ppl, _ = perplexity(pruned_f16, tokens, context_tokens=256)

    assert abs(pruned.report["overall_sparsity"] - 0.5) < 1e-6
    assert pruned_ppl > 1.2 * llama_ppl, (pruned_ppl, llama_ppl)
