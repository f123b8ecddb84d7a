"""The part every pass shares (``Pass.run``): input check, output naming, cache key, result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from slmops.errors import BlueprintError, InvalidModelError
from slmops.optimize.passes import Pass, PassParams, PassProgress, get_pass
from tests.tiny_gguf import write_tiny_gguf


class _CopyParams(PassParams):
    tag: str = "a"


class _Copy(Pass[_CopyParams]):
    """Copies its GGUF input; records where it was asked to write."""

    name = "copy_for_test"
    input_format = "gguf"
    output_format = "gguf"
    params_model = _CopyParams

    def variant_label(self, params: _CopyParams) -> str:
        return f"copy-{params.tag}"

    def apply(self, input_path: Path, params: _CopyParams, output: Path, progress: PassProgress) -> dict[str, Any]:
        output.write_bytes(input_path.read_bytes())
        progress(1, 1)
        return {"tag": params.tag}


def _noop(done: float, total: float) -> None:
    return None


def test_run_names_the_output_after_the_label_and_builds_the_result(tmp_path: Path) -> None:
    source = tmp_path / "in.gguf"
    source.write_bytes(b"GGUF-bytes")
    step = _Copy()

    result = step.run(source, step.parse_params({"tag": "x"}), tmp_path, _noop)

    assert result.output_path == tmp_path / "model-copy-x.gguf"
    assert result.output_path.read_bytes() == b"GGUF-bytes"
    assert result.report == {"tag": "x"}


def test_a_safetensors_pass_writes_a_model_directory(tmp_path: Path) -> None:
    step = get_pass("prune")

    assert step.output_path(tmp_path, step.parse_params({"sparsity": 0.5})) == tmp_path / "model"


def test_quantize_names_its_file_after_the_preset_not_the_label(tmp_path: Path) -> None:
    step = get_pass("quantize")
    params = step.parse_params({"type": "Q4_K_M", "tensor_types": {"attn_v": "Q8_0"}})

    assert step.variant_label(params) == "q4_k_m-mix"
    assert step.output_path(tmp_path, params) == tmp_path / "model-q4_k_m.gguf"


@pytest.mark.parametrize("name", ["dequantize", "quantize", "hf_from_gguf"])
def test_a_gguf_pass_refuses_a_directory_or_nothing_before_doing_any_work(tmp_path: Path, name: str) -> None:
    step = get_pass(name)
    params = step.parse_params({"type": "Q8_0"} if name == "quantize" else {})
    (tmp_path / "a-model").mkdir()
    work = tmp_path / "work"
    work.mkdir()

    with pytest.raises(InvalidModelError, match=rf"pass '{name}' reads a GGUF file, found a directory"):
        step.run(tmp_path / "a-model", params, work, _noop)
    with pytest.raises(InvalidModelError, match="found nothing at"):
        step.run(tmp_path / "missing.gguf", params, work, _noop)
    assert list(work.iterdir()) == []


@pytest.mark.parametrize(("name", "params"), [("prune", {"sparsity": 0.5}), ("int8", {}), ("export_gguf", {})])
def test_a_torch_pass_refuses_a_gguf_file_with_the_way_out(tmp_path: Path, name: str, params: dict[str, Any]) -> None:
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    step = get_pass(name)
    work = tmp_path / "work"
    work.mkdir()

    with pytest.raises(InvalidModelError, match=r"reads a safetensors model directory, found a file.*hf_from_gguf"):
        step.run(source, step.parse_params(params), work, _noop)
    assert list(work.iterdir()) == []


def test_the_cache_key_covers_input_params_and_version_and_writes_defaults_out() -> None:
    step = _Copy()
    default = step.cache_key("sha256:aa", step.parse_params({}))

    assert step.cache_key("sha256:aa", step.parse_params({"tag": "a"})) == default  # the default, written out
    assert step.cache_key("sha256:bb", step.parse_params({})) != default
    assert step.cache_key("sha256:aa", step.parse_params({"tag": "b"})) != default

    class _Copy2(_Copy):
        version = 2

    assert _Copy2().cache_key("sha256:aa", _Copy2().parse_params({})) != default
    assert len(default) == 64 and int(default, 16) >= 0


def test_sparse_2_4_needs_fewer_kept_than_grouped_when_the_recipe_is_read() -> None:
    with pytest.raises(BlueprintError, match=r"sparse_2_4.*n < m, got n=4, m=4"):
        get_pass("sparse_2_4").parse_params({"n": 4, "m": 4})
