"""The ONNX Runtime GenAI directory validator: a real tiny export passes; malformed and hostile directories fail
with an error that says what is wrong."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from slmops.errors import InvalidONNXError, UnsafePathError
from slmops.registry.formats.onnx_genai import (
    OnnxGenAILimits,
    is_onnx_genai_dir,
    onnx_genai_facts,
    read_onnx_genai,
)

pytest.importorskip("torch")
pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_onnx_genai import export_tiny_onnx_genai

    return export_tiny_onnx_genai(tmp_path_factory.mktemp("onnx-genai"))


@pytest.fixture
def model(exported: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(exported, copy)
    return copy


def _edit_config(model: Path, change: dict[str, object]) -> None:
    path = model / "genai_config.json"
    config = json.loads(path.read_text())
    for dotted, value in change.items():
        *parents, key = dotted.split(".")
        section = config
        for name in parents:
            section = section[name]
        section[key] = value
    path.write_text(json.dumps(config))


def test_a_real_export_is_valid_and_its_facts_are_read(model: Path) -> None:
    info = read_onnx_genai(model)
    facts = onnx_genai_facts(info)
    assert is_onnx_genai_dir(model)
    assert info.decoder_file == "model.onnx" and info.tokenizer_file == "tokenizer.json"
    assert info.onnx_files["model.onnx"].external_files == ("model.onnx.data",)
    assert info.weight_bytes == (model / "model.onnx").stat().st_size + (model / "model.onnx.data").stat().st_size
    assert info.eos_token_ids == (1,) and info.bos_token_id == 2
    assert facts.architecture == "gemma3_text" and facts.details["runtime"] == "onnxruntime-genai"
    assert facts.details["block_count"] == 2 and facts.parameter_count == info.parameter_count > 0


@pytest.mark.parametrize("missing", ["genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"])
def test_a_missing_file_is_named(model: Path, missing: str) -> None:
    (model / missing).unlink()
    with pytest.raises(
        InvalidONNXError, match=missing.replace(".", r"\.") if missing != "tokenizer.json" else "tokenizer"
    ):
        read_onnx_genai(model)


@pytest.mark.parametrize(
    "filename",
    ["../outside.onnx", "/etc/passwd", "sub/../../x.onnx", "..\\x.onnx", "C:model.onnx", "./model.onnx", ""],
)
def test_a_decoder_path_that_escapes_is_refused(model: Path, filename: str) -> None:
    (model.parent / "outside.onnx").write_bytes((model / "model.onnx").read_bytes())
    _edit_config(model, {"model.decoder.filename": filename})
    with pytest.raises((UnsafePathError, InvalidONNXError)):
        read_onnx_genai(model)


def test_a_symlinked_file_is_refused(model: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.onnx"
    os.replace(model / "model.onnx", target)
    os.symlink(target, model / "model.onnx")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        read_onnx_genai(model)


def test_a_symlinked_directory_is_refused(model: Path, tmp_path: Path) -> None:
    os.symlink(model, tmp_path / "link")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        read_onnx_genai(tmp_path / "link")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"model": {"type": "x"}, "model": {}}', "twice"),
        ("\xff\xfe", "UTF-8"),
        ('{"search": {}}', "no 'model' object"),
    ],
)
def test_bad_config_json_is_refused(model: Path, text: str, problem: str) -> None:
    (model / "genai_config.json").write_bytes(
        text.encode("utf-8", "surrogateescape") if text != "\xff\xfe" else b"\xff\xfe"
    )
    with pytest.raises(InvalidONNXError, match=problem):
        read_onnx_genai(model)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"model.context_length": -1}, "context_length"),
        ({"model.context_length": 1 << 40}, "context_length"),
        ({"model.vocab_size": "many"}, "vocab_size"),
        ({"model.decoder.num_hidden_layers": True}, "num_hidden_layers"),
        ({"model.decoder.head_size": 0}, "head_size"),
        ({"model.eos_token_id": 10**9}, "eos_token_id"),
        ({"search.max_length": 10**9}, "max_length"),
        ({"model.type": ""}, "model.type"),
        ({"model.decoder.filename": 5}, "filename"),
    ],
)
def test_out_of_range_numbers_are_refused(model: Path, change: dict[str, object], problem: str) -> None:
    _edit_config(model, change)
    with pytest.raises(InvalidONNXError, match=problem):
        read_onnx_genai(model)


def test_oversize_config_and_tokenizer_are_refused(model: Path) -> None:
    with pytest.raises(InvalidONNXError, match="larger than"):
        read_onnx_genai(model, OnnxGenAILimits(max_config_bytes=100))
    with pytest.raises(InvalidONNXError, match="larger than"):
        read_onnx_genai(model, OnnxGenAILimits(max_tokenizer_bytes=100))


def test_a_truncated_onnx_file_is_refused(model: Path) -> None:
    data = (model / "model.onnx").read_bytes()
    (model / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidONNXError):
        read_onnx_genai(model)


def test_truncated_external_data_is_refused(model: Path) -> None:
    data = (model / "model.onnx.data").read_bytes()
    (model / "model.onnx.data").write_bytes(data[:100])
    with pytest.raises(InvalidONNXError):
        read_onnx_genai(model)


def test_a_pickle_under_a_model_name_is_refused(model: Path) -> None:
    import pickle

    from slmops.errors import UnsafeFormatError

    (model / "model.onnx").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises((UnsafeFormatError, InvalidONNXError)):
        read_onnx_genai(model)


def test_a_file_is_not_a_model_directory(model: Path) -> None:
    with pytest.raises(InvalidONNXError, match="directory"):
        read_onnx_genai(model / "model.onnx")
    with pytest.raises(InvalidONNXError, match="does not exist"):
        read_onnx_genai(model / "nothing")
    assert not is_onnx_genai_dir(model / "nothing")
