"""Importing each supported format into a registry, and refusing hostile ones without leaving anything behind."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from slmops.errors import InvalidModelError, InvalidSafetensorsError
from slmops.registry import Registry


def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], header_len: int | None = None) -> Path:
    sizes = {"F32": 4, "F16": 2, "BF16": 2}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", header_len if header_len is not None else len(raw)) + raw + b"\0" * offset)
    return path


def _hf_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 32,
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "intermediate_size": 16,
                "max_position_embeddings": 128,
                "torch_dtype": "bfloat16",
            }
        )
    )
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    (root / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}", "eos_token": "</s>"})
    )
    _safetensors(
        root / "model.safetensors",
        {"model.embed_tokens.weight": ("BF16", [32, 8]), "model.norm.weight": ("BF16", [8])},
    )
    return root


def test_a_hugging_face_directory_is_imported_with_its_facts(registry: Registry, tmp_path: Path) -> None:
    result = registry.import_model(_hf_dir(tmp_path / "hf"), "tiny-hf")

    m = result.manifest
    assert m.format == "safetensors"
    assert [f.path for f in m.files] == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert m.facts.architecture == "llama"
    assert m.facts.parameter_count == 32 * 8 + 8
    assert m.facts.quantization == "BF16"
    assert m.facts.context_length == 128
    assert m.runtime.chat_template is not None and m.runtime.eos_token == "</s>"
    assert registry.verify("tiny-hf").ok


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("header length 2^63", "header"),
        ("overlapping offsets", "overlap"),
        ("no config", "no config.json"),
        ("no tokenizer", "no tokenizer"),
    ],
)
def test_hostile_hugging_face_directories_register_nothing(
    registry: Registry, tmp_path: Path, case: str, message: str
) -> None:
    root = _hf_dir(tmp_path / "hf")
    weights = root / "model.safetensors"
    if case == "header length 2^63":
        _safetensors(weights, {"w": ("F32", [4])}, header_len=2**63)
    elif case == "overlapping offsets":
        header = {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
        }
        raw = json.dumps(header).encode()
        weights.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 24)
    elif case == "no config":
        (root / "config.json").unlink()
    elif case == "no tokenizer":
        (root / "tokenizer.json").unlink()

    with pytest.raises(InvalidModelError, match=message) as info:
        registry.import_model(root, "bad")

    if case.startswith(("header", "overlap")):
        assert isinstance(info.value, InvalidSafetensorsError)
    assert registry.models() == []
    assert list(registry.blobs.digests()) == []


def test_an_onnx_directory_is_imported_with_its_facts(registry: Registry, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    np = pytest.importorskip("numpy")
    root = tmp_path / "onnx"
    root.mkdir()
    weight = numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), name="W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3])],
        initializer=[weight],
    )
    onnx.save(helper.make_model(graph, producer_name="slmops-test"), str(root / "model.onnx"))

    m = registry.import_model(root, "tiny-onnx").manifest

    assert m.format == "onnx"
    assert m.facts.parameter_count == 12
    assert m.facts.details["producer"] == "slmops-test"
