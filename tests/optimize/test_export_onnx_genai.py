"""The export_onnx_genai pass on a tiny random gemma3 (real builder, real runtime), and on gemma3-270m
(integration: dequantized from the default GGUF, exported to int4, scored against the GGUF on the same tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slmops.errors import InvalidModelError
from slmops.optimize.export_onnx_genai import legacy_rope_config
from slmops.optimize.passes import get_pass, pass_names
from slmops.optimize.runner import StepCache
from tests.tiny_hf import write_tiny_hf

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime_genai")


def _run(source: Path, workdir: Path, **params: object) -> tuple[Path, dict[str, object]]:
    workdir.mkdir(parents=True)
    the_pass = get_pass("export_onnx_genai")
    result = the_pass.run(source, the_pass.parse_params(params), workdir, lambda done, total: None)
    return result.output_path, result.report


def test_the_pass_is_registered_with_its_formats() -> None:
    assert "export_onnx_genai" in pass_names()
    the_pass = get_pass("export_onnx_genai")
    assert (the_pass.input_format, the_pass.output_format) == ("safetensors", "onnx")
    assert the_pass.variant_label(the_pass.parse_params({})) == "ortgenai-int4"


def test_export_writes_a_valid_directory_and_nothing_else(tmp_path: Path) -> None:
    from slmops.registry.formats.onnx_genai import read_onnx_genai

    source = write_tiny_hf(tmp_path / "hf", arch="gemma3")
    before = {p.name: p.read_bytes() for p in source.iterdir()}

    output, report = _run(source, tmp_path / "work")

    assert output == tmp_path / "work" / "model"
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["model"]  # staging and cache removed
    assert sorted(p.name for p in output.iterdir()) == [
        "genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    info = read_onnx_genai(output)
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    assert (info.model_type, info.num_hidden_layers, info.vocab_size) == ("gemma3_text", 2, vocab)
    assert report["precision"] == "int4" and report["model_type"] == "gemma3_text"
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # the input is untouched


def test_export_is_deterministic(tmp_path: Path) -> None:
    source = write_tiny_hf(tmp_path / "hf", arch="gemma3")
    first, _ = _run(source, tmp_path / "a")
    second, _ = _run(source, tmp_path / "b")
    assert {p.name: p.read_bytes() for p in first.iterdir()} == {p.name: p.read_bytes() for p in second.iterdir()}


def test_the_step_cache_keeps_the_directory(tmp_path: Path) -> None:
    source = write_tiny_hf(tmp_path / "hf", arch="gemma3")
    cache = StepCache(tmp_path / "cache")
    path, digest, outcome = cache.run(source, "sha256:" + "0" * 64, "export_onnx_genai", {}, lambda d, t: None)
    again, digest_again, outcome_again = cache.run(
        source, "sha256:" + "0" * 64, "export_onnx_genai", {}, lambda d, t: None
    )
    assert path.is_dir() and (path / "genai_config.json").is_file()
    assert (again, digest_again) == (path, digest)
    assert not outcome.cached and outcome_again.cached


def test_a_directory_without_tokenizer_or_config_is_refused(tmp_path: Path) -> None:
    source = write_tiny_hf(tmp_path / "hf", arch="gemma3")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).unlink()
    with pytest.raises(InvalidModelError, match="no tokenizer"):
        _run(source, tmp_path / "work")
    (source / "config.json").unlink()
    with pytest.raises(InvalidModelError, match=r"config\.json"):
        _run(source, tmp_path / "work2")


def test_legacy_rope_config_flattens_gemma3_rope_parameters() -> None:
    config = {
        "model_type": "gemma3_text",
        "rope_parameters": {
            "full_attention": {"rope_theta": 1_000_000.0, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 10_000.0, "rope_type": "default"},
        },
    }
    flat = legacy_rope_config(config)
    assert flat["rope_theta"] == 1_000_000.0 and flat["rope_local_base_freq"] == 10_000.0
    assert flat["rope_parameters"] == {"rope_theta": 1_000_000.0, "rope_type": "default"}
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0  # not modified
    plain = {"rope_parameters": {"rope_theta": 5.0, "rope_type": "default"}}
    assert legacy_rope_config(plain) is plain


def test_evaluation_scores_and_measures_the_tiny_export(tmp_path: Path) -> None:
    from slmops.core.device_profiles import DEVICE_PROFILES
    from slmops.optimize.evaluate import EvalTokens, evaluate_onnx_genai_dir

    source = write_tiny_hf(tmp_path / "hf", arch="gemma3")
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    output, _ = _run(source, tmp_path / "work")
    tokens = EvalTokens(tuple((7 * i) % (vocab - 4) + 4 for i in range(128)))
    profile = sorted(DEVICE_PROFILES.values(), key=lambda p: p.memory_bytes)[-1]

    metrics = evaluate_onnx_genai_dir(
        output, tokens, bos=2, context_tokens=64, threads=1, profiles=[profile],
        speed_prompt_tokens=16, speed_decode_tokens=8,
    )  # fmt: skip

    assert metrics["perplexity_tokens"] == 64.0  # 2 chunks of 64, second half of each scored
    assert 1.0 < metrics["perplexity"] < 10 * vocab  # a random model: roughly uniform over the vocabulary
    assert metrics["decode_tokens_per_s"] > 0 and metrics["peak_rss_bytes"] > 10 << 20
    assert metrics[f"decode_tokens_per_s@{profile.name}"] > 0
    assert metrics["size_bytes"] == sum(p.stat().st_size for p in output.iterdir())


@pytest.mark.integration
def test_gemma_exports_to_int4_and_stays_close_to_the_gguf(gemma_gguf: Path, tmp_path: Path) -> None:
    from slmops.optimize._data import read_text
    from slmops.optimize.evaluate import perplexity, perplexity_onnx_genai, tokenize_for_eval

    hf_pass = get_pass("hf_from_gguf")
    (tmp_path / "hf").mkdir()
    hf = hf_pass.run(gemma_gguf, hf_pass.parse_params({}), tmp_path / "hf", lambda d, t: None).output_path
    output, report = _run(hf, tmp_path / "work")
    assert report["notes"] == ["tokenizer converted from the GGUF's tokenizer metadata"]
    assert json.loads((output / "genai_config.json").read_text())["model"]["type"] == "gemma3_text"
    tokens = tokenize_for_eval(gemma_gguf, read_text("builtin:eval.txt", Path(".")), 512, [])
    gguf_ppl, _ = perplexity(gemma_gguf, tokens.text, context_tokens=256, threads=2)
    onnx_ppl, scored = perplexity_onnx_genai(output, tokens.text, bos=2, context_tokens=256, threads=2)
    assert scored == 256
    # int4 round-to-nearest over already Q4_K_M weights: worse, but the same model (a broken export is >1000)
    assert gguf_ppl < onnx_ppl < 3 * gguf_ppl
