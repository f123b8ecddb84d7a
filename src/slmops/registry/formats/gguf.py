"""A safe, bounded reader for GGUF headers that never trusts the file.

The upstream ``gguf`` package maps the whole file and believes every count and length it reads, so a hostile file can
make it hang or allocate without limit. This reader parses the header itself, in pure Python, through one buffered
reader, and checks every count, length, type, shape and offset against :class:`GGUFLimits` and against the bytes the
file actually has before it believes it. Work and memory are bounded by ``max_header_bytes``: every value read
consumes at least one byte of header.

What it keeps: small metadata values as Python values; large arrays only as a summary; of the token strings array only
the length and the texts of the special tokens (bos, eos, eot, ...). Tensor data is never read, only located.

The format (little-endian)::

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x  (key string, value_type u32, value)
    tensor_count x  (name string, n_dims u32, dims u64[n_dims], ggml_type u32, offset u64)
    padding to general.alignment | tensor data (offsets are relative to its start)

where a string is ``length u64, UTF-8 bytes`` and an array is ``element_type u32, count u64, elements``.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from slmops.core.manifest import ModelFacts, RuntimeHints
from slmops.errors import InvalidGGUFError

__all__ = [
    "GGML_TYPES",
    "LLAMA_FILE_TYPES",
    "GGMLType",
    "GGUFInfo",
    "GGUFLimits",
    "GGUFTensor",
    "gguf_facts",
    "gguf_runtime_hints",
    "is_gguf",
    "read_gguf",
]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20

MiB = 1 << 20


@dataclass(frozen=True)
class GGUFLimits:
    """Upper bounds the reader enforces before it allocates or loops; the defaults accept real models."""

    max_tensors: int = 65_536
    max_kv: int = 65_536
    max_string_bytes: int = 16 * MiB  # one string value: chat templates are tens of KiB
    max_key_bytes: int = 65_535  # one metadata key (the GGUF spec's limit)
    max_tensor_name_bytes: int = 64  # one tensor name (the GGUF spec's limit; llama.cpp's GGML_MAX_NAME)
    max_array_len: int = 4 * 1024 * 1024  # elements of one array: vocabularies and merge lists reach a few 100k
    max_array_depth: int = 2  # 1: arrays of scalars or strings only; 2: arrays of such arrays
    max_header_bytes: int = 512 * MiB  # everything before the tensor data
    max_dims: int = 4  # GGML_MAX_DIMS
    max_tensor_elements: int = 1 << 50
    max_kept_array_len: int = 64  # longer arrays are summarised in GGUFInfo.metadata


@dataclass(frozen=True)
class GGMLType:
    type_id: int
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block


def _ggml(*rows: tuple[int, str, int, int]) -> dict[int, GGMLType]:
    return {row[0]: GGMLType(*row) for row in rows}


_QK_K = 256
GGML_TYPES: dict[int, GGMLType] = _ggml(
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 2 + 16),
    (3, "Q4_1", 32, 2 + 2 + 16),
    (6, "Q5_0", 32, 2 + 4 + 16),
    (7, "Q5_1", 32, 2 + 2 + 4 + 16),
    (8, "Q8_0", 32, 2 + 32),
    (9, "Q8_1", 32, 4 + 4 + 32),
    (10, "Q2_K", _QK_K, 2 + 2 + _QK_K // 16 + _QK_K // 4),
    (11, "Q3_K", _QK_K, 2 + _QK_K // 4 + _QK_K // 8 + 12),
    (12, "Q4_K", _QK_K, 2 + 2 + _QK_K // 2 + 12),
    (13, "Q5_K", _QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 8 + 12),
    (14, "Q6_K", _QK_K, 2 + _QK_K // 2 + _QK_K // 4 + _QK_K // 16),
    (15, "Q8_K", _QK_K, 4 + _QK_K + _QK_K // 8),
    (16, "IQ2_XXS", _QK_K, 2 + _QK_K // 4),
    (17, "IQ2_XS", _QK_K, 2 + _QK_K // 4 + _QK_K // 32),
    (18, "IQ3_XXS", _QK_K, 2 + _QK_K // 4 + _QK_K // 8),
    (19, "IQ1_S", _QK_K, 2 + _QK_K // 8 + _QK_K // 16),
    (20, "IQ4_NL", 32, 2 + 16),
    (21, "IQ3_S", _QK_K, 2 + _QK_K // 4 + _QK_K // 8 + _QK_K // 32 + 4),
    (22, "IQ2_S", _QK_K, 2 + _QK_K // 4 + _QK_K // 16),
    (23, "IQ4_XS", _QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 64),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", _QK_K, _QK_K // 8 + _QK_K // 16 + _QK_K // 32),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", _QK_K, 2 + 4 * 13),
    (35, "TQ2_0", _QK_K, 2 + 64),
    (39, "MXFP4", 32, 1 + 16),
    (40, "NVFP4", 64, 4 + 32),
    (41, "Q1_0", 128, 2 + 16),
)

# llama_ftype (llama.h), the value of general.file_type, named the way llama-quantize names it.
LLAMA_FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
}

# GGUF metadata value types: id -> (name, struct format or None for string/array, minimum encoded size in bytes).
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_VALUE_TYPES: dict[int, tuple[str, str | None, int]] = {
    _UINT8: ("uint8", "<B", 1),
    _INT8: ("int8", "<b", 1),
    _UINT16: ("uint16", "<H", 2),
    _INT16: ("int16", "<h", 2),
    _UINT32: ("uint32", "<I", 4),
    _INT32: ("int32", "<i", 4),
    _FLOAT32: ("float32", "<f", 4),
    _BOOL: ("bool", "<B", 1),
    _STRING: ("string", None, 8),
    _ARRAY: ("array", None, 12),
    _UINT64: ("uint64", "<Q", 8),
    _INT64: ("int64", "<q", 8),
    _FLOAT64: ("float64", "<d", 8),
}
_INTEGER_TYPES = frozenset({_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _UINT64, _INT64})

_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims 0, ggml type, offset
_FIXED_HEADER_BYTES = 4 + 4 + 8 + 8

_TOKENS_KEY = "tokenizer.ggml.tokens"
_ALIGNMENT_KEY = "general.alignment"
SPECIAL_TOKEN_KEYS: dict[str, str] = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",  # sic: the key gguf and llama.cpp use
    "pad": "tokenizer.ggml.padding_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
}
# Texts llama.cpp takes as the end-of-turn token when a file names no eot_token_id (gemma's <end_of_turn>, ...).
_EOT_TEXTS = frozenset(
    t.encode()
    for t in (
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",
        "<end_of_utterance>",
    )
)


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGML order: shape[0] is the innermost (contiguous) dimension
    ggml_type: int
    type_name: str
    offset: int  # bytes, relative to the start of the data section
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    alignment: int
    file_size: int
    data_offset: int  # bytes from the start of the file to the tensor data
    metadata: dict[str, Any]  # small values as Python values; big arrays as {"array_of": <type>, "count": n}
    tensors: tuple[GGUFTensor, ...]
    special_tokens: dict[str, str]  # "bos"/"eos"/"eot"/... -> token text
    vocab_size: int | None  # length of tokenizer.ggml.tokens


class _Reader:
    """Sequential reads of a header through one buffered file object, each checked against what is left."""

    def __init__(self, fp: BinaryIO, path: Path, file_size: int, limits: GGUFLimits) -> None:
        self.fp = fp
        self.path = path
        self.file_size = file_size
        self.limits = limits
        self.pos = 0
        self.header_end_limit = min(file_size, limits.max_header_bytes)

    def fail(self, message: str) -> InvalidGGUFError:
        return InvalidGGUFError(f"{self.path}: corrupt GGUF file: {message}")

    @property
    def remaining(self) -> int:
        return self.header_end_limit - self.pos

    def _check(self, n: int, what: str) -> None:
        if self.pos + n <= self.header_end_limit:
            return
        if self.pos + n > self.file_size:
            raise InvalidGGUFError(
                f"{self.path}: truncated or corrupt GGUF file: expected {n} bytes of {what} at offset {self.pos}, "
                f"but the file has only {self.file_size - self.pos} bytes left"
            )
        raise InvalidGGUFError(
            f"{self.path}: GGUF header is larger than the limit of {self.limits.max_header_bytes} bytes "
            f"(reading {what} at offset {self.pos}); the file is corrupt or not a model we accept"
        )

    def need(self, n: int, claim: str) -> None:
        """Refuse a count or length whose ``claim`` needs at least ``n`` more bytes than the header can have."""
        if n <= self.remaining:
            return
        if self.pos + n > self.file_size:
            raise InvalidGGUFError(
                f"{self.path}: truncated or corrupt GGUF file: {claim}, which needs at least {n} bytes, "
                f"but the file has only {self.file_size - self.pos} bytes left after offset {self.pos}"
            )
        raise InvalidGGUFError(
            f"{self.path}: GGUF header is larger than the limit of {self.limits.max_header_bytes} bytes: {claim}, "
            f"which needs at least {n} bytes after offset {self.pos}; the file is corrupt or not a model we accept"
        )

    def read(self, n: int, what: str) -> bytes:
        self._check(n, what)
        data = self.fp.read(n)
        if len(data) != n:
            raise InvalidGGUFError(
                f"{self.path}: truncated GGUF file: expected {n} bytes of {what} at offset {self.pos}, "
                f"read {len(data)} (did the file shrink while being read?)"
            )
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self._check(n, what)
        self.fp.seek(n, os.SEEK_CUR)
        self.pos += n

    def string_at(self, offset: int) -> bytes:
        """A string the parse already checked at ``offset``; re-checked in case the file changed meanwhile."""
        self.fp.seek(offset)
        raw_length = self.fp.read(8)
        length = struct.unpack("<Q", raw_length)[0] if len(raw_length) == 8 else -1
        data = self.fp.read(length) if 0 <= length <= self.limits.max_string_bytes else b""
        if len(data) != length:
            raise InvalidGGUFError(f"{self.path}: GGUF file changed while being read (string at offset {offset})")
        return data

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.read(4, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = struct.unpack("<Q", self.read(8, what))[0]
        return value

    def string_bytes(self, what: str, max_bytes: int) -> bytes:
        length = self.u64(f"the length of {what}")
        if length > max_bytes:
            raise self.fail(f"{what} at offset {self.pos - 8} claims {length} bytes; the limit is {max_bytes}")
        return self.read(length, what)

    def skip_string(self, what: str, max_bytes: int) -> None:
        length = self.u64(f"the length of {what}")
        if length > max_bytes:
            raise self.fail(f"{what} at offset {self.pos - 8} claims {length} bytes; the limit is {max_bytes}")
        self.skip(length, what)

    def name(self, what: str, max_bytes: int) -> str:
        return self.decode(self.string_bytes(what, max_bytes), what)

    def decode(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def value_type(self, what: str) -> int:
        type_id = self.u32(f"the value type of {what}")
        if type_id not in _VALUE_TYPES:
            raise self.fail(f"{what} has value type {type_id}; known GGUF value types are 0..12")
        return type_id


class _Parser:
    def __init__(self, reader: _Reader) -> None:
        self.r = reader
        self.limits = reader.limits
        self.token_offsets: array[int] | None = None
        self.vocab_size: int | None = None
        self.eot_guess: int | None = None  # the first token whose text llama.cpp takes as end-of-turn
        self.value_types: dict[str, int] = {}

    # -- metadata values --------------------------------------------------------------------------------------------

    def scalar(self, type_id: int, what: str) -> Any:
        _, fmt, size = _VALUE_TYPES[type_id]
        if type_id == _STRING:
            return self.r.decode(self.r.string_bytes(what, self.limits.max_string_bytes), what)
        assert fmt is not None
        value = struct.unpack(fmt, self.r.read(size, what))[0]
        if type_id == _BOOL:
            if value > 1:
                raise self.r.fail(f"{what} is a bool with byte value {value}; expected 0 or 1")
            return bool(value)
        return value

    def value(self, type_id: int, what: str, depth: int = 0) -> Any:
        if type_id != _ARRAY:
            return self.scalar(type_id, what)
        if depth >= self.limits.max_array_depth:
            raise self.r.fail(f"{what} nests arrays deeper than the limit of {self.limits.max_array_depth}")
        elem_type = self.r.value_type(f"the elements of {what}")
        count = self.r.u64(f"the element count of {what}")
        elem_name, fmt, elem_min = _VALUE_TYPES[elem_type]
        if count > self.limits.max_array_len:
            raise self.r.fail(f"{what} claims {count} elements; the limit is {self.limits.max_array_len}")
        self.r.need(count * elem_min, f"{what} claims {count} {elem_name} elements")
        keep = count <= self.limits.max_kept_array_len
        if fmt is not None and elem_type != _BOOL:
            if not keep:
                self.r.skip(count * elem_min, what)
                return {"array_of": elem_name, "count": count}
            raw = self.r.read(count * elem_min, what)
            return [v[0] for v in struct.iter_unpack(fmt, raw)]
        items: list[Any] = []
        element = f"an element of {what}"
        for _ in range(count):
            if elem_type == _STRING:
                if keep:
                    raw_text = self.r.string_bytes(element, self.limits.max_string_bytes)
                    items.append(self.r.decode(raw_text, element))
                else:
                    self.r.skip_string(element, self.limits.max_string_bytes)
            else:
                item = self.value(elem_type, element, depth + 1)
                if keep:
                    items.append(item)
        if keep:
            return items
        return {"array_of": elem_name, "count": count}

    def tokens(self, what: str) -> dict[str, Any]:
        """The token strings array: only where each token is, so the special ones can be read once their ids are known.

        The ids may come before or after the array. Memory is 8 bytes per token, never more than the header's size.
        """
        elem_type = self.r.value_type(f"the elements of {what}")
        count = self.r.u64(f"the element count of {what}")
        if elem_type != _STRING:
            raise self.r.fail(f"{what} must be an array of strings, found an array of {_VALUE_TYPES[elem_type][0]}")
        if count > self.limits.max_array_len:
            raise self.r.fail(f"{what} claims {count} tokens; the limit is {self.limits.max_array_len}")
        self.r.need(count * 8, f"{what} claims {count} tokens")
        # The hot loop of a parse (262144 tokens for gemma3): the checks of _Reader.read, inlined.
        r = self.r
        fp_read = r.fp.read
        unpack = struct.Struct("<Q").unpack
        max_bytes = self.limits.max_string_bytes
        offsets = array("Q")
        add = offsets.append
        eot_texts = _EOT_TEXTS
        eot_guess: int | None = None
        pos, end = r.pos, r.header_end_limit
        for index in range(count):
            add(pos)
            if pos + 8 > end:
                r.pos = pos
                r.read(8, "the length of a token string")  # raises the right error
            raw_length = fp_read(8)
            pos += 8
            if len(raw_length) != 8:
                r.pos = pos - 8
                raise r.fail(f"{what}: the file shrank while being read")
            length = unpack(raw_length)[0]
            if length > max_bytes:
                r.pos = pos
                raise r.fail(f"a token string in {what} claims {length} bytes; the limit is {max_bytes}")
            if pos + length > end:
                r.pos = pos
                r.read(length, "a token string")  # raises the right error
            token = fp_read(length)
            pos += length
            if len(token) != length:
                r.pos = pos - length
                raise r.fail(f"{what}: the file shrank while being read")
            if eot_guess is None and token in eot_texts:
                eot_guess = index
        r.pos = pos
        self.token_offsets = offsets
        self.eot_guess = eot_guess
        self.vocab_size = count
        return {"array_of": "string", "count": count}

    # -- sections ---------------------------------------------------------------------------------------------------

    def metadata(self, kv_count: int) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for index in range(kv_count):
            key = self.r.name(f"the key of metadata entry {index}", self.limits.max_key_bytes)
            if key in metadata:
                raise self.r.fail(f"metadata key {key!r} appears twice")
            what = f"metadata value {key!r}"
            type_id = self.r.value_type(what)
            self.value_types[key] = type_id
            if key == _TOKENS_KEY and type_id == _ARRAY:
                metadata[key] = self.tokens(what)
            else:
                metadata[key] = self.value(type_id, what)
        return metadata

    def tensor_infos(self, tensor_count: int) -> list[tuple[str, tuple[int, ...], GGMLType, int, int]]:
        infos: list[tuple[str, tuple[int, ...], GGMLType, int, int]] = []
        seen: set[str] = set()
        for index in range(tensor_count):
            name = self.r.name(f"the name of tensor {index}", self.limits.max_tensor_name_bytes)
            if name in seen:
                raise self.r.fail(f"tensor name {name!r} appears twice")
            seen.add(name)
            what = f"tensor {name!r}"
            n_dims = self.r.u32(f"the number of dimensions of {what}")
            if n_dims > self.limits.max_dims:
                raise self.r.fail(f"{what} has {n_dims} dimensions; at most {self.limits.max_dims} are allowed")
            shape = tuple(self.r.u64(f"a dimension of {what}") for _ in range(n_dims))
            n_elements = 1
            for dim in shape:
                n_elements *= dim
                if n_elements > self.limits.max_tensor_elements:
                    raise self.r.fail(
                        f"{what} has shape {list(shape)}, more than {self.limits.max_tensor_elements} elements"
                    )
            type_id = self.r.u32(f"the ggml type of {what}")
            ggml_type = GGML_TYPES.get(type_id)
            if ggml_type is None:
                raise self.r.fail(f"{what} has unknown ggml type {type_id}; known types: {sorted(GGML_TYPES)}")
            inner = shape[0] if shape else 1
            if inner % ggml_type.block_size:
                raise self.r.fail(
                    f"{what} has innermost dimension {inner}, not a multiple of the {ggml_type.name} block size "
                    f"{ggml_type.block_size}"
                )
            offset = self.r.u64(f"the data offset of {what}")
            nbytes = n_elements // ggml_type.block_size * ggml_type.type_size
            infos.append((name, shape, ggml_type, offset, nbytes))
        return infos


def _alignment(metadata: dict[str, Any], raw_type: int | None, r: _Reader) -> int:
    if _ALIGNMENT_KEY not in metadata:
        return DEFAULT_ALIGNMENT
    value = metadata[_ALIGNMENT_KEY]
    if raw_type not in _INTEGER_TYPES or isinstance(value, bool):
        raise r.fail(f"{_ALIGNMENT_KEY} must be an unsigned integer, found {value!r}")
    if not (1 <= value <= MAX_ALIGNMENT) or value & (value - 1):
        raise r.fail(f"{_ALIGNMENT_KEY} must be a power of two between 1 and {MAX_ALIGNMENT}, found {value}")
    return int(value)


def _special_tokens(parser: _Parser, metadata: dict[str, Any]) -> dict[str, str]:
    """The texts of the special tokens whose ids the metadata gives (ids out of range are ignored)."""
    offsets = parser.token_offsets
    if offsets is None:
        return {}
    ids: dict[str, int] = {}
    for role, key in SPECIAL_TOKEN_KEYS.items():
        token_id = metadata.get(key)
        if isinstance(token_id, int) and not isinstance(token_id, bool) and 0 <= token_id < len(offsets):
            ids[role] = token_id
    if SPECIAL_TOKEN_KEYS["eot"] not in metadata and parser.eot_guess is not None:
        ids["eot"] = parser.eot_guess
    return {
        role: parser.r.decode(parser.r.string_at(offsets[token_id]), f"the {role} token (id {token_id})")
        for role, token_id in ids.items()
    }


def read_gguf(path: Path, limits: GGUFLimits = GGUFLimits()) -> GGUFInfo:
    """Parse and validate the header of the GGUF file at ``path``; raise :class:`InvalidGGUFError` if anything is off.

    Only the header is read; tensor data is located and bounds-checked, never read.
    """
    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidGGUFError(f"{path}: not a regular file; a GGUF model must be a regular file")
        with open(path, "rb", buffering=1 * MiB) as fp:
            file_size = os.fstat(fp.fileno()).st_size
            return _read(_Reader(fp, path, file_size, limits))
    except InvalidGGUFError:
        raise
    except OSError as exc:
        raise InvalidGGUFError(f"{path}: cannot read the GGUF file: {exc.strerror or exc}") from None
    except (struct.error, ValueError, OverflowError, MemoryError, RecursionError) as exc:  # defence in depth
        raise InvalidGGUFError(f"{path}: corrupt GGUF file: {type(exc).__name__}: {exc}") from None


def _read(r: _Reader) -> GGUFInfo:
    path, limits = r.path, r.limits
    if r.file_size == 0:
        raise InvalidGGUFError(f"{path}: empty file; expected a GGUF model starting with the magic 'GGUF'")
    if r.file_size < 4:
        raise InvalidGGUFError(
            f"{path}: truncated: {r.file_size} bytes; a GGUF file starts with the 4-byte magic 'GGUF'"
        )
    magic = r.read(4, "the magic")
    if magic != GGUF_MAGIC:
        raise InvalidGGUFError(f"{path}: not a GGUF file: expected the magic b'GGUF', found {magic!r}")
    raw_version = r.read(4, "the version")
    version = struct.unpack("<I", raw_version)[0]
    if version not in SUPPORTED_VERSIONS:
        swapped = struct.unpack(">I", raw_version)[0]
        if swapped in (1, 2, 3):
            raise InvalidGGUFError(
                f"{path}: big-endian GGUF file (version bytes {raw_version.hex()} read as {swapped} when swapped); "
                "only little-endian GGUF files are supported"
            )
        raise InvalidGGUFError(
            f"{path}: unsupported GGUF version {version}; supported versions are "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))} (the file is corrupt or from an incompatible writer)"
        )
    tensor_count = r.u64("the tensor count")
    kv_count = r.u64("the metadata entry count")
    if tensor_count > limits.max_tensors:
        raise r.fail(f"header claims {tensor_count} tensors; the limit is {limits.max_tensors}")
    if kv_count > limits.max_kv:
        raise r.fail(f"header claims {kv_count} metadata entries; the limit is {limits.max_kv}")
    needed = tensor_count * _MIN_TENSOR_INFO_BYTES + kv_count * _MIN_KV_BYTES
    r.need(needed, f"the header claims {tensor_count} tensors and {kv_count} metadata entries")

    parser = _Parser(r)
    metadata = parser.metadata(kv_count)
    alignment = _alignment(metadata, parser.value_types.get(_ALIGNMENT_KEY), r)
    infos = parser.tensor_infos(tensor_count)
    header_end = r.pos
    data_offset = -(-header_end // alignment) * alignment
    if not infos:
        # A vocabulary-only file has no tensors and often no padding after its header.
        data_offset = min(data_offset, r.file_size)
    data_size = r.file_size - data_offset

    tensors: list[GGUFTensor] = []
    required = 0
    for name, shape, ggml_type, offset, nbytes in infos:
        if offset % alignment:
            raise r.fail(f"tensor {name!r} has offset {offset}, not a multiple of the alignment {alignment}")
        required = max(required, offset + nbytes)
        tensors.append(GGUFTensor(name, shape, ggml_type.type_id, ggml_type.name, offset, nbytes))
    if data_offset > r.file_size or required > data_size:
        last = max(tensors, key=lambda t: t.offset + t.nbytes)
        raise InvalidGGUFError(
            f"{path}: truncated or corrupt GGUF file: header says {required} bytes of tensor data "
            f"(tensor {last.name!r} ends there), file has {max(data_size, 0)} after the header"
        )
    furthest: GGUFTensor | None = None  # of the tensors so far, the one whose bytes end last
    for tensor in sorted(tensors, key=lambda t: t.offset):
        if not tensor.nbytes:
            continue
        if furthest is not None and tensor.offset < furthest.offset + furthest.nbytes:
            raise r.fail(
                f"tensors {furthest.name!r} (bytes {furthest.offset}..{furthest.offset + furthest.nbytes}) and "
                f"{tensor.name!r} (bytes {tensor.offset}..{tensor.offset + tensor.nbytes}) overlap"
            )
        furthest = tensor

    special = _special_tokens(parser, metadata)
    parser.token_offsets = None
    return GGUFInfo(
        version=version,
        alignment=alignment,
        file_size=r.file_size,
        data_offset=data_offset,
        metadata=metadata,
        tensors=tuple(tensors),
        special_tokens=special,
        vocab_size=parser.vocab_size,
    )


def is_gguf(path: Path) -> bool:
    """Whether the file at ``path`` starts with the GGUF magic; nothing else is checked."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open
            return False
        with open(path, "rb") as fp:
            return fp.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _int(value: Any) -> int | None:
    """An integer metadata value; per-layer arrays (some architectures) give their largest element."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return max(int(v) for v in value)
    return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _quantization(info: GGUFInfo) -> str | None:
    file_type = _int(info.metadata.get("general.file_type"))
    if file_type is not None and file_type in LLAMA_FILE_TYPES:
        return LLAMA_FILE_TYPES[file_type]
    weights = Counter(t.type_name for t in info.tensors if len(t.shape) >= 2 and t.name.endswith(".weight"))
    if not weights:
        weights = Counter(t.type_name for t in info.tensors)
    if not weights:
        return None
    return max(sorted(weights), key=lambda name: weights[name])


def gguf_facts(info: GGUFInfo) -> ModelFacts:
    """What the header says about the model, for a manifest."""
    meta = info.metadata
    arch = _str(meta.get("general.architecture"))

    def arch_int(key: str) -> int | None:
        return _int(meta.get(f"{arch}.{key}")) if arch else None

    details: dict[str, Any] = {"gguf_version": info.version, "tensor_count": len(info.tensors)}
    for name, key in (
        ("block_count", "block_count"),
        ("embedding_length", "embedding_length"),
        ("feed_forward_length", "feed_forward_length"),
        ("head_count", "attention.head_count"),
        ("head_count_kv", "attention.head_count_kv"),
        ("key_length", "attention.key_length"),
        ("value_length", "attention.value_length"),
        ("sliding_window", "attention.sliding_window"),
    ):
        value = arch_int(key)
        if value is not None:
            details[name] = value
    embedding, heads = details.get("embedding_length"), details.get("head_count")
    if embedding is not None and heads:
        details.setdefault("key_length", embedding // heads)
        details.setdefault("value_length", embedding // heads)
    if "head_count" in details:
        details.setdefault("head_count_kv", details["head_count"])
    details["tensor_types"] = dict(sorted(Counter(t.type_name for t in info.tensors).items()))
    model_name = _str(meta.get("general.name"))
    if model_name is not None:
        details["name"] = model_name

    vocab_size = info.vocab_size if info.vocab_size is not None else arch_int("vocab_size")
    return ModelFacts(
        architecture=arch,
        parameter_count=sum(t.n_elements for t in info.tensors),
        quantization=_quantization(info),
        vocab_size=vocab_size,
        context_length=arch_int("context_length"),
        details=details,
    )


def gguf_runtime_hints(info: GGUFInfo) -> RuntimeHints:
    """How to prompt the model: its chat template and the texts of its special tokens."""
    special = info.special_tokens
    stop_tokens: list[str] = []
    for role in ("eos", "eot", "eom"):
        text = special.get(role)
        if text is not None and text not in stop_tokens:
            stop_tokens.append(text)
    return RuntimeHints(
        chat_template=_str(info.metadata.get("tokenizer.chat_template")),
        stop_tokens=stop_tokens,
        bos_token=special.get("bos"),
        eos_token=special.get("eos"),
    )
