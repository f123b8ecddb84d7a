"""Validate a safetensors file by reading only its header.

The format is an 8-byte little-endian header length ``N``, then ``N`` bytes of a UTF-8 JSON object, then the tensor
data. Every tensor names its dtype, shape and ``[begin, end)`` byte range relative to the start of the data. Nothing
here reads the data: we check that the header is well formed, that every range has exactly the size its dtype and
shape need, and that the ranges, sorted, tile the data with no overlap and no hole (as the safetensors library does).

Memory is bounded by ``SafetensorsLimits.max_header_bytes`` and time by the header size; the only errors raised are
:class:`~slmops.errors.InvalidSafetensorsError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.errors import InvalidSafetensorsError
from slmops.registry.formats._io import open_regular

__all__ = [
    "DTYPE_SIZES",
    "SafetensorsInfo",
    "SafetensorsLimits",
    "SafetensorsTensor",
    "read_safetensors",
]

# Bytes per element, as in the safetensors library's Dtype enum.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}

_HEADER_LENGTH_BYTES = 8
_METADATA_KEY = "__metadata__"
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_Fail = Callable[[str], InvalidSafetensorsError]
_MAX_BYTES_SHOWN = 1 << 64  # no file is this large; stop multiplying a hostile shape here
_FIX = "re-export it with `safetensors.torch.save_file` or check that the file was copied completely"


@dataclass(frozen=True)
class SafetensorsLimits:
    max_header_bytes: int = 100 * 1024 * 1024  # the safetensors library's own limit
    max_tensors: int = 1_000_000
    max_rank: int = 64  # torch's own maximum number of dimensions


@dataclass(frozen=True)
class SafetensorsTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offset relative to the start of the data section
    end: int

    @property
    def n_elements(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def n_bytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsInfo:
    file_size: int
    header_size: int  # N, the JSON header's length in bytes
    metadata: dict[str, str] = field(default_factory=dict)
    tensors: tuple[SafetensorsTensor, ...] = ()  # in file order (sorted by begin)

    @property
    def data_offset(self) -> int:
        """Absolute file offset of the first data byte."""
        return _HEADER_LENGTH_BYTES + self.header_size

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_safetensors(path: Path, limits: SafetensorsLimits = SafetensorsLimits()) -> SafetensorsInfo:
    """Read and validate the header of the safetensors file at ``path``; the tensor data is never read."""
    name = path.name

    def fail(problem: str) -> InvalidSafetensorsError:
        return InvalidSafetensorsError(f"safetensors file '{name}': {problem}; {_FIX}")

    try:
        opened = open_regular(path)
    except OSError as exc:
        raise InvalidSafetensorsError(
            f"cannot open safetensors file '{path}': {exc.strerror or exc}; check the path and its permissions"
        ) from None
    if opened is None:
        raise InvalidSafetensorsError(
            f"safetensors file '{name}' is not a regular file; give the path of the file itself"
        )
    handle, file_size = opened
    try:
        with handle:
            prefix = handle.read(_HEADER_LENGTH_BYTES)
            if len(prefix) < _HEADER_LENGTH_BYTES:
                raise fail(f"expected at least {_HEADER_LENGTH_BYTES} bytes (the header length), found {file_size}")
            header_size = int.from_bytes(prefix, "little")
            if header_size > limits.max_header_bytes:
                raise fail(f"header length {header_size} bytes exceeds the limit of {limits.max_header_bytes} bytes")
            if header_size > file_size - _HEADER_LENGTH_BYTES:
                raise fail(
                    f"header length {header_size} bytes exceeds the {file_size - _HEADER_LENGTH_BYTES} bytes "
                    "left in the file"
                )
            raw = handle.read(header_size)
    except OSError as exc:
        raise fail(f"read failed: {exc.strerror or exc}") from None
    if len(raw) != header_size:
        raise fail(f"expected a {header_size}-byte header, found only {len(raw)} bytes (the file shrank?)")
    header = _parse_header_json(raw, fail)
    data_size = file_size - _HEADER_LENGTH_BYTES - header_size
    metadata, tensors = _check_header(header, data_size, limits, fail)
    return SafetensorsInfo(file_size=file_size, header_size=header_size, metadata=metadata, tensors=tensors)


def _parse_header_json(raw: bytes, fail: _Fail) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"the header is not valid UTF-8 (byte {exc.start} of the header)") from None
    if not text.startswith("{"):
        raise fail(f"expected the header to be a JSON object starting with '{{', found {_short(text[:16])}")
    try:
        value = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKeyError as exc:
        raise fail(f"the header names {_short(exc.key)} twice; every key must be unique") from None
    except RecursionError:
        raise fail("the header JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise fail(f"the header is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except ValueError:  # an integer longer than Python's 4300-digit limit for int()
        raise fail(
            "the header holds an integer with thousands of digits; no valid shape or offset is that long"
        ) from None
    if not isinstance(value, dict):
        raise fail(f"expected the header to be a JSON object, found {type(value).__name__}")
    return value


def _check_header(
    header: dict[str, Any], data_size: int, limits: SafetensorsLimits, fail: _Fail
) -> tuple[dict[str, str], tuple[SafetensorsTensor, ...]]:
    metadata: dict[str, str] = {}
    if _METADATA_KEY in header:
        raw_metadata = header[_METADATA_KEY]
        if not isinstance(raw_metadata, dict):
            raise fail(f"expected '{_METADATA_KEY}' to be an object of strings, found {type(raw_metadata).__name__}")
        for key, value in raw_metadata.items():
            if not isinstance(value, str):
                raise fail(
                    f"expected '{_METADATA_KEY}' values to be strings, found {type(value).__name__} "
                    f"for key {_short(key)}"
                )
            metadata[key] = value
    n_tensors = len(header) - (1 if _METADATA_KEY in header else 0)
    if n_tensors > limits.max_tensors:
        raise fail(f"the header lists {n_tensors} tensors, more than the limit of {limits.max_tensors}")
    tensors = [
        _check_tensor(name, entry, data_size, limits, fail) for name, entry in header.items() if name != _METADATA_KEY
    ]
    tensors.sort(key=lambda t: (t.begin, t.end))
    _check_coverage(tensors, data_size, fail)
    return metadata, tuple(tensors)


def _check_tensor(
    name: str, entry: object, data_size: int, limits: SafetensorsLimits, fail: _Fail
) -> SafetensorsTensor:
    label = f"tensor {_short(name)}"
    if not isinstance(entry, dict):
        raise fail(f"expected {label} to be an object, found {type(entry).__name__}")
    missing = sorted(_TENSOR_KEYS - entry.keys())
    if missing:
        raise fail(f"{label} has no {', '.join(missing)}")
    unknown = sorted(entry.keys() - _TENSOR_KEYS)
    if unknown:
        raise fail(
            f"{label} has unknown keys {', '.join(_short(k) for k in unknown)}; expected only dtype, shape, "
            "data_offsets"
        )
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise fail(f"{label} has unknown dtype {_short(dtype)}; known dtypes: {', '.join(DTYPE_SIZES)}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise fail(f"expected the shape of {label} to be a list of non-negative integers, found {_short(shape)}")
    if len(shape) > limits.max_rank:
        raise fail(f"{label} has {len(shape)} dimensions, more than the limit of {limits.max_rank}")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise fail(
            f"expected the data_offsets of {label} to be [begin, end] non-negative integers, found {_short(offsets)}"
        )
    begin, end = offsets
    if begin > end:
        raise fail(f"{label} has data_offsets [{begin}, {end}] with begin after end")
    if end > data_size:
        raise fail(f"{label} ends at data byte {end}, past the end of the {data_size}-byte data section")
    length = end - begin
    item_size = DTYPE_SIZES[dtype]
    # Multiply with an early exit, so a hostile shape cannot make us build enormous integers.
    expected = item_size
    if 0 in shape:
        expected = 0
    else:
        for dim in shape:
            expected *= dim
            if expected > _MAX_BYTES_SHOWN:
                break
    if expected != length:
        shown = f"more than {_MAX_BYTES_SHOWN}" if expected > _MAX_BYTES_SHOWN else str(expected)
        raise fail(
            f"{label} ({dtype}, shape {_short(shape)}) needs {shown} bytes, but its data_offsets "
            f"[{begin}, {end}] hold {length} bytes"
        )
    return SafetensorsTensor(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_coverage(tensors: list[SafetensorsTensor], data_size: int, fail: _Fail) -> None:
    covered = 0
    previous: SafetensorsTensor | None = None
    for tensor in tensors:
        if tensor.begin < covered and previous is not None:
            raise fail(
                f"tensors {_short(previous.name)} [{previous.begin}, {previous.end}) and {_short(tensor.name)} "
                f"[{tensor.begin}, {tensor.end}) overlap"
            )
        if tensor.begin > covered:
            raise fail(
                f"data bytes [{covered}, {tensor.begin}) belong to no tensor (a hole before {_short(tensor.name)})"
            )
        covered = tensor.end
        previous = tensor
    if covered != data_size:
        raise fail(f"data bytes [{covered}, {data_size}) after the last tensor belong to no tensor")
