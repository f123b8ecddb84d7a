from __future__ import annotations

from pathlib import Path

import pytest

from slmops.errors import BlueprintError, InvalidModelError
from slmops.optimize.passes import get_pass, pass_names
from slmops.registry.formats.gguf import read_gguf
from tests.tiny_gguf import write_tiny_gguf

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")


def _noop(done: float, total: float) -> None:
    return None


def _run(name: str, params: dict[str, object], source: Path, workdir: Path) -> tuple[Path, dict[str, object]]:
    the_pass = get_pass(name)
    workdir.mkdir()
    result = the_pass.run(source, the_pass.parse_params(params), workdir, _noop)
    assert result.output_path.is_relative_to(workdir)
    return result.output_path, result.report


def test_the_gguf_passes_are_registered() -> None:
    assert {"dequantize", "quantize"} <= set(pass_names())
    with pytest.raises(BlueprintError, match="unknown pass 'nope'"):
        get_pass("nope")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_dequantize_keeps_every_metadata_key_and_the_values(tmp_path: Path, arch: str) -> None:
    source = write_tiny_gguf(
        tmp_path / "q8.gguf", arch=arch, file_type="Q8_0", chat_template="{{ messages }}", n_embd=64, n_ff=128
    )

    output, report = _run("dequantize", {"chunk_rows": 7}, source, tmp_path / "work")

    before, after = read_gguf(source), read_gguf(output)
    assert set(after.metadata) == set(before.metadata)
    for key, value in before.metadata.items():
        assert after.metadata[key] == (1 if key == "general.file_type" else value), key
    assert {t.name: t.shape for t in after.tensors} == {t.name: t.shape for t in before.tensors}
    assert {t.type_name for t in after.tensors if len(t.shape) > 1} == {"F16"}
    assert {t.type_name for t in after.tensors if len(t.shape) == 1} == {"F32"}
    assert report["converted_tensors"] == {"Q8_0": sum(1 for t in before.tensors if len(t.shape) > 1)}
    src, out = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(output))
    for a, b in zip(src.tensors, out.tensors, strict=True):
        expected = gguf.quants.dequantize(np.asarray(a.data), a.tensor_type).reshape(-1)
        np.testing.assert_allclose(np.asarray(b.data, dtype=np.float32).reshape(-1), expected, rtol=1e-3, atol=1e-4)


def test_quantize_reports_the_types_and_the_tensors_that_fell_back(tmp_path: Path) -> None:
    source = write_tiny_gguf(tmp_path / "f32.gguf", arch="gemma3", n_embd=64, n_ff=128)  # rows of 64: no K-quants

    output, report = _run("quantize", {"type": "Q4_K_M"}, source, tmp_path / "work")

    info = read_gguf(output)
    assert report["default_type"] == "Q4_K" and "requantized_from" not in report
    assert report["tensor_types"] == {k: v for k, v in sorted(_count(info).items())}
    fallbacks = report["fallbacks"]
    assert isinstance(fallbacks, list) and fallbacks
    assert {f["requested"] for f in fallbacks} >= {"Q4_K"}
    assert all("not a multiple of the" in f["reason"] for f in fallbacks)
    assert all(t.type_name != "Q4_K" for t in info.tensors)


@pytest.mark.parametrize("preset", ["Q8_0", "Q4_0"])
def test_quantize_to_a_block_32_type_has_no_fallbacks(tmp_path: Path, preset: str) -> None:
    source = write_tiny_gguf(tmp_path / "f32.gguf", n_embd=64, n_ff=128)

    output, report = _run("quantize", {"type": preset, "pure": True}, source, tmp_path / "work")

    assert report["fallbacks"] == [] and read_gguf(output).metadata["general.file_type"] in (2, 7)
    assert {t.type_name for t in read_gguf(output).tensors if len(t.shape) > 1} == {preset}


def test_tensor_type_overrides_and_requantization_are_reported(tmp_path: Path) -> None:
    source = write_tiny_gguf(tmp_path / "q8.gguf", file_type="Q8_0", n_embd=64, n_ff=128)
    params = {"type": "Q4_0", "tensor_types": {r"attn_v\.weight": "Q8_0"}, "pure": True}

    output, report = _run("quantize", params, source, tmp_path / "work")

    types = {t.name: t.type_name for t in read_gguf(output).tensors}
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_0"
    assert report["requantized_from"] == ["Q8_0"] and report["allow_requantize"] is True
    assert report["fallbacks"] == []


def test_requantizing_without_permission_is_refused(tmp_path: Path) -> None:
    source = write_tiny_gguf(tmp_path / "q8.gguf", file_type="Q8_0", n_embd=64, n_ff=128)

    with pytest.raises(InvalidModelError, match=r"already quantized \(Q8_0\).*Dequantize it first"):
        _run("quantize", {"type": "Q4_0", "allow_requantize": False}, source, tmp_path / "work")


def test_an_importance_matrix_is_computed_and_used(tmp_path: Path) -> None:
    source = write_tiny_gguf(tmp_path / "f32.gguf", arch="gemma3", n_embd=256, n_head=4, n_head_kv=2, n_ff=256)
    params = {"type": "Q4_K_M", "imatrix": {"max_tokens": 96, "context_tokens": 48}}

    output, report = _run("quantize", params, source, tmp_path / "work")

    imatrix = report["imatrix"]
    assert isinstance(imatrix, dict)
    # 2 layers x 7 weight matrices, plus token_embd as the tied output projection
    assert imatrix["tensors"] == 15 and imatrix["chunks"] == 2 and imatrix["tokens"] == 96
    assert "Q4_K" in {t.type_name for t in read_gguf(output).tensors}


def _count(info: object) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in info.tensors:  # type: ignore[attr-defined]
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
    return counts
