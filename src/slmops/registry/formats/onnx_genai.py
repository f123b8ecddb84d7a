"""Validate an ONNX Runtime GenAI model directory: ``genai_config.json``, its ONNX files, and the tokenizer.

ONNX Runtime GenAI (``onnxruntime-genai``) loads a *directory*: ``genai_config.json`` says which ONNX files make
the model (``model.decoder.filename``, and ``filename`` of any other component), their inputs and outputs, the
model's shape (layers, heads, context length, vocabulary) and the default search options; the ONNX files keep
their weights as external data (``model.onnx.data``); the tokenizer is ``tokenizer.json`` (+
``tokenizer_config.json``), read by the runtime itself.

:func:`read_onnx_genai` trusts nothing in it:

- the directory and every file it names are reached without symlinks, by plain relative paths that stay inside it
  (no ``..``, no absolute paths, no backslashes), and are regular files;
- ``genai_config.json`` and the tokenizer files are bounded in size, strict UTF-8 JSON objects without duplicate
  keys; the numbers the runtime sizes buffers by (context length, layers, heads, head size, vocabulary) are
  positive integers below fixed bounds;
- every ONNX file is scanned by the bounded protobuf reader :func:`~slmops.registry.formats.onnx.read_onnx`, which
  checks each tensor's inline or external bytes, external data staying inside the directory;
- no file is a pickle (:func:`~slmops.registry.formats.pickle_guard.check_not_pickle`).

Errors are :class:`~slmops.errors.InvalidONNXError` (what is malformed) and
:class:`~slmops.errors.UnsafePathError` (a path that could leave the directory), each saying what to do.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from slmops.core.manifest import ModelFacts
from slmops.errors import InvalidModelError, InvalidONNXError, UnsafePathError
from slmops.registry.formats.hf import read_json_file
from slmops.registry.formats.onnx import ONNXInfo, ONNXLimits, read_onnx
from slmops.registry.formats.pickle_guard import check_not_pickle

__all__ = [
    "GENAI_CONFIG_FILE",
    "OnnxGenAIInfo",
    "OnnxGenAILimits",
    "is_onnx_genai_dir",
    "onnx_genai_facts",
    "read_onnx_genai",
]

GENAI_CONFIG_FILE = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_FIX = (
    "re-export the model with the `export_onnx_genai` pass (or `python -m onnxruntime_genai.models.builder`), "
    "and copy the whole output directory"
)


@dataclass(frozen=True)
class OnnxGenAILimits:
    max_config_bytes: int = 1 << 20  # genai_config.json: a few KB in practice
    max_tokenizer_bytes: int = 128 << 20  # tokenizer.json: 33 MB for Gemma 3's 262k vocabulary
    max_tokenizer_config_bytes: int = 16 << 20
    max_components: int = 16  # ONNX files named by the config (decoder, embedding, vision, ...)
    max_config_depth: int = 16
    max_context_tokens: int = 1 << 24
    max_vocab_size: int = 1 << 24
    max_layers: int = 4096
    max_heads: int = 4096
    max_head_size: int = 65_536
    onnx: ONNXLimits = field(default_factory=ONNXLimits)


@dataclass(frozen=True)
class OnnxGenAIInfo:
    model_type: str  # genai_config.json model.type, e.g. "gemma3_text"
    context_length: int
    vocab_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_size: int
    hidden_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    decoder_file: str  # relative path of the decoder ONNX file
    onnx_files: dict[str, ONNXInfo]  # relative path -> what its scan found
    tokenizer_file: str
    weight_bytes: int  # ONNX files plus their external data

    @property
    def parameter_count(self) -> int:
        return sum(info.parameter_count for info in self.onnx_files.values())


def _fail(directory: Path, problem: str) -> InvalidONNXError:
    return InvalidONNXError(f"ONNX GenAI model {directory}: {problem}; {_FIX}")


def _safe_file(directory: Path, relative: object, what: str) -> Path:
    """``directory / relative`` after checking it is a plain relative path to a regular file, no symlinks on the
    way."""
    if not isinstance(relative, str) or not relative:
        raise _fail(directory, f"{what} must be a non-empty file name string, found {relative!r}"[:300])
    if relative.startswith("/") or "\\" in relative or ":" in relative or "\x00" in relative or len(relative) > 512:
        raise UnsafePathError(
            f"ONNX GenAI model {directory}: {what} {relative[:200]!r} is an absolute path, too long, or uses '\\', "
            "':' or NUL; every file must be named by a relative path inside the model directory"
        )
    parts = tuple(relative.split("/"))
    if any(part in ("..", ".", "") for part in parts):
        raise UnsafePathError(
            f"ONNX GenAI model {directory}: {what} {relative[:200]!r} is not a plain relative path ('.', '..' or "
            "'//') and could escape the model directory; name a file inside it, e.g. model.onnx"
        )
    current = directory
    for index, part in enumerate(parts):
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            raise _fail(directory, f"{what} {relative!r} does not exist in the directory") from None
        except OSError as exc:
            raise _fail(directory, f"cannot inspect {relative!r}: {exc.strerror or exc}") from None
        if stat.S_ISLNK(mode):
            raise UnsafePathError(
                f"ONNX GenAI model {directory}: {what} {relative!r} goes through the symbolic link "
                f"{'/'.join(parts[: index + 1])!r}; links are refused because they can point outside the model "
                "directory. Copy the real files (`cp -rL`)"
            )
        last = index == len(parts) - 1
        if last and not stat.S_ISREG(mode):
            raise UnsafePathError(f"ONNX GenAI model {directory}: {what} {relative!r} is not a regular file")
        if not last and not stat.S_ISDIR(mode):
            raise _fail(directory, f"{what} {relative!r} goes through {part!r}, which is not a directory")
    return current


def _bounded_int(directory: Path, section: dict[str, Any], key: str, where: str, upper: int, *, required: bool) -> int:
    value = section.get(key)
    if value is None and not required:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= upper:
        raise _fail(directory, f"{where}.{key} must be an integer in 1..{upper}, found {value!r}"[:300])
    return value


def _filenames(value: Any, path: str, depth: int, found: list[tuple[str, Any]], directory: Path, limit: int) -> None:
    """Every ``filename`` entry under the ``model`` section, with where it is (``model.decoder.filename``)."""
    if depth > limit:
        raise _fail(directory, f"{GENAI_CONFIG_FILE} is nested deeper than {limit} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}"
            if key == "filename":
                found.append((where, item))
            else:
                _filenames(item, where, depth + 1, found, directory, limit)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _filenames(item, f"{path}[{index}]", depth + 1, found, directory, limit)


def _token_ids(directory: Path, value: object, key: str, vocab_size: int) -> tuple[int, ...]:
    values = value if isinstance(value, list) else [value]
    if value is None:
        return ()
    ids: list[int] = []
    for item in values[:64]:
        if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < vocab_size:
            raise _fail(directory, f"model.{key} must be token ids below the vocabulary size {vocab_size}, "
                        f"found {item!r}"[:300])  # fmt: skip
        ids.append(item)
    return tuple(ids)


def is_onnx_genai_dir(directory: Path) -> bool:
    """Whether ``directory`` looks like an ONNX Runtime GenAI model (holds ``genai_config.json``); not validated."""
    try:
        return stat.S_ISREG(os.lstat(Path(directory) / GENAI_CONFIG_FILE).st_mode)
    except OSError:
        return False


def read_onnx_genai(directory: Path, limits: OnnxGenAILimits = OnnxGenAILimits()) -> OnnxGenAIInfo:
    """Validate the ONNX Runtime GenAI model directory ``directory``; see the module docstring."""
    directory = Path(directory)
    try:
        mode = os.lstat(directory).st_mode
    except FileNotFoundError:
        raise _fail(directory, "the directory does not exist") from None
    if stat.S_ISLNK(mode):
        raise UnsafePathError(f"{directory} is a symbolic link; give the model directory itself")
    if not stat.S_ISDIR(mode):
        raise _fail(directory, "expected a directory holding genai_config.json, found a file")
    config_path = _safe_file(directory, GENAI_CONFIG_FILE, "the configuration")
    try:
        config = read_json_file(config_path, limits.max_config_bytes)
    except InvalidONNXError:
        raise
    except InvalidModelError as exc:
        raise InvalidONNXError(f"ONNX GenAI model {directory}: {exc}") from None
    model = config.get("model")
    if not isinstance(model, dict):
        raise _fail(directory, f"{GENAI_CONFIG_FILE} has no 'model' object")
    model_type = model.get("type")
    if not isinstance(model_type, str) or not model_type or len(model_type) > 64:
        raise _fail(directory, f"model.type must be a short string naming the architecture, found {model_type!r}"[:300])
    decoder = model.get("decoder")
    if not isinstance(decoder, dict):
        raise _fail(directory, f"{GENAI_CONFIG_FILE} has no 'model.decoder' object")
    context = _bounded_int(directory, model, "context_length", "model", limits.max_context_tokens, required=True)
    vocab = _bounded_int(directory, model, "vocab_size", "model", limits.max_vocab_size, required=True)
    layers = _bounded_int(directory, decoder, "num_hidden_layers", "model.decoder", limits.max_layers, required=True)
    heads = _bounded_int(directory, decoder, "num_attention_heads", "model.decoder", limits.max_heads, required=True)
    kv_heads = _bounded_int(
        directory, decoder, "num_key_value_heads", "model.decoder", limits.max_heads, required=False
    )
    head_size = _bounded_int(directory, decoder, "head_size", "model.decoder", limits.max_head_size, required=True)
    hidden = _bounded_int(directory, decoder, "hidden_size", "model.decoder", 1 << 20, required=False)
    search = config.get("search", {})
    if not isinstance(search, dict):
        raise _fail(directory, "'search' must be an object")
    max_length = search.get("max_length")
    if max_length is not None and (
        not isinstance(max_length, int) or isinstance(max_length, bool) or not 0 < max_length <= context
    ):
        raise _fail(directory, f"search.max_length must be an integer in 1..{context} (the context), "
                    f"found {max_length!r}"[:300])  # fmt: skip
    bos = _token_ids(directory, model.get("bos_token_id"), "bos_token_id", vocab)
    eos = _token_ids(directory, model.get("eos_token_id"), "eos_token_id", vocab)

    named: list[tuple[str, Any]] = []
    _filenames(model, "model", 0, named, directory, limits.max_config_depth)
    if "model.decoder.filename" not in dict(named):
        raise _fail(directory, "model.decoder.filename is missing: the config names no decoder ONNX file")
    if len(named) > limits.max_components:
        raise _fail(directory, f"the config names {len(named)} files, more than {limits.max_components}")
    onnx_files: dict[str, ONNXInfo] = {}
    weight_bytes = 0
    for where, relative in named:
        path = _safe_file(directory, relative, where)
        rel = PurePosixPath(str(relative)).as_posix()
        if rel in onnx_files:
            continue
        check_not_pickle(path)
        info = read_onnx(path, directory, limits.onnx)
        onnx_files[rel] = info
        weight_bytes += path.stat().st_size
        weight_bytes += sum((directory / name).stat().st_size for name in info.external_files)
    decoder_file = PurePosixPath(str(dict(named)["model.decoder.filename"])).as_posix()

    tokenizer_file = next((name for name in TOKENIZER_FILES if (directory / name).exists()), None)
    if tokenizer_file is None:
        raise _fail(directory, "there is no tokenizer.json (or tokenizer.model) beside the model")
    tokenizer_path = _safe_file(directory, tokenizer_file, "the tokenizer")
    if tokenizer_file == "tokenizer.json":
        try:
            read_json_file(tokenizer_path, limits.max_tokenizer_bytes)
        except InvalidModelError as exc:
            raise InvalidONNXError(f"ONNX GenAI model {directory}: {exc}") from None
    else:
        check_not_pickle(tokenizer_path)
        if tokenizer_path.stat().st_size > limits.max_tokenizer_bytes:
            raise _fail(directory, f"tokenizer.model is larger than {limits.max_tokenizer_bytes} bytes")
    if (directory / "tokenizer_config.json").exists():
        tokenizer_config = _safe_file(directory, "tokenizer_config.json", "the tokenizer configuration")
        try:
            read_json_file(tokenizer_config, limits.max_tokenizer_config_bytes)
        except InvalidModelError as exc:
            raise InvalidONNXError(f"ONNX GenAI model {directory}: {exc}") from None
    return OnnxGenAIInfo(
        model_type=model_type,
        context_length=context,
        vocab_size=vocab,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        head_size=head_size,
        hidden_size=hidden,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=eos,
        decoder_file=decoder_file,
        onnx_files=onnx_files,
        tokenizer_file=tokenizer_file,
        weight_bytes=weight_bytes,
    )


def onnx_genai_facts(info: OnnxGenAIInfo) -> ModelFacts:
    """What the registry records of an ONNX GenAI model (the ``details`` the memory estimate reads included)."""
    decoder = info.onnx_files[info.decoder_file]
    types: dict[str, int] = {}
    for onnx in info.onnx_files.values():
        for name, count in onnx.tensor_types.items():
            types[name] = types.get(name, 0) + count
    return ModelFacts(
        architecture=info.model_type,
        parameter_count=info.parameter_count,
        vocab_size=info.vocab_size,
        context_length=info.context_length,
        details={
            "runtime": "onnxruntime-genai",
            "onnx_files": sorted(info.onnx_files),
            "ir_version": decoder.ir_version,
            "producer": decoder.producer,
            "opsets": dict(decoder.opsets),
            "node_count": sum(i.node_count for i in info.onnx_files.values()),
            "block_count": info.num_hidden_layers,
            "embedding_length": info.hidden_size,
            "head_count": info.num_attention_heads,
            "head_count_kv": info.num_key_value_heads,
            "key_length": info.head_size,
            "value_length": info.head_size,
            "tensor_types": types,
        },
    )
