"""Validate an ONNX model by scanning its protobuf wire format, without the onnx or protobuf packages.

An ONNX file is one serialized ``ModelProto``. We walk the few messages that carry facts or file references
(model, graph, node, attribute, tensor, sparse tensor, function, training info) and skip every other field by its
length, so the weights inline in ``raw_data`` are never read. For each tensor we compute its element count from its
``dims`` and check that its bytes, inline or external, have the size its data type needs. External data must be a
regular file inside the model directory, reached without symlinks, and hold ``offset + length`` bytes.

Bounds: every length is checked against the bytes left in its enclosing message before it is trusted; graphs nested
in node attributes may go ``max_depth`` deep; the number of fields visited is capped, which bounds time; strings are
capped, which with a fixed read buffer bounds memory. The only errors raised are
:class:`~slmops.errors.InvalidONNXError` and, for external data paths, :class:`~slmops.errors.UnsafePathError`.

Field numbers are those of ``onnx/onnx.proto`` (onnx 1.23, IR version 14).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NoReturn

from slmops.errors import InvalidONNXError, UnsafePathError
from slmops.registry.formats._io import open_regular

__all__ = ["ONNX_DATA_TYPES", "ONNXInfo", "ONNXLimits", "read_onnx"]

# TensorProto.DataType -> (name, bits per element in raw_data, sub-byte types packed); None: size not checked.
ONNX_DATA_TYPES: dict[int, tuple[str, int | None]] = {
    1: ("FLOAT", 32),
    2: ("UINT8", 8),
    3: ("INT8", 8),
    4: ("UINT16", 16),
    5: ("INT16", 16),
    6: ("INT32", 32),
    7: ("INT64", 64),
    8: ("STRING", None),
    9: ("BOOL", 8),
    10: ("FLOAT16", 16),
    11: ("DOUBLE", 64),
    12: ("UINT32", 32),
    13: ("UINT64", 64),
    14: ("COMPLEX64", 64),
    15: ("COMPLEX128", 128),
    16: ("BFLOAT16", 16),
    17: ("FLOAT8E4M3FN", 8),
    18: ("FLOAT8E4M3FNUZ", 8),
    19: ("FLOAT8E5M2", 8),
    20: ("FLOAT8E5M2FNUZ", 8),
    21: ("UINT4", 4),
    22: ("INT4", 4),
    23: ("FLOAT4E2M1", 4),
    24: ("FLOAT8E8M0", 8),
    25: ("UINT2", 2),
    26: ("INT2", 2),
    27: ("FLOAT6E2M3", None),  # packing of raw_data not settled here: size not checked
    28: ("FLOAT6E3M2", None),
}

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_MAX_FIELD_NUMBER = (1 << 29) - 1
_READ_CHUNK_BYTES = 64 * 1024
_DATA_LOCATION_EXTERNAL = 1
_DEFAULT_DOMAIN = "ai.onnx"
_FIX = "re-export the model (for example with `torch.onnx.export`) or check that the file was copied completely"

# Message field numbers we read; everything else is skipped by length.
_MODEL_IR_VERSION, _MODEL_PRODUCER_NAME, _MODEL_PRODUCER_VERSION, _MODEL_GRAPH = 1, 2, 3, 7
_MODEL_OPSET_IMPORT, _MODEL_METADATA_PROPS, _MODEL_TRAINING_INFO, _MODEL_FUNCTIONS = 8, 14, 20, 25
_TRAINING_INITIALIZATION, _TRAINING_ALGORITHM = 1, 2
_FUNCTION_NODE = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA = 1, 2, 8, 9
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2


@dataclass(frozen=True)
class ONNXLimits:
    max_file_bytes: int = (1 << 31) - 1  # protobuf's 2 GiB message limit; bigger models keep weights outside
    max_depth: int = 32  # graphs nested inside node attributes (If, Loop, Scan)
    max_fields: int = 20_000_000  # protobuf fields visited in the whole file: bounds time
    max_string_bytes: int = 1024 * 1024  # one name, producer, domain, metadata value or external data entry
    max_metadata_entries: int = 10_000
    max_opsets: int = 1_000
    max_rank: int = 64
    max_external_entries: int = 64  # external_data key/value pairs of one tensor


@dataclass(frozen=True)
class ONNXInfo:
    ir_version: int
    producer: str  # "name version", e.g. "pytorch 2.3.0"; "" when the file does not say
    opsets: dict[str, int]  # domain -> version; the default domain "" is reported as "ai.onnx"
    node_count: int  # nodes of the main graph and of the subgraphs in its nodes' attributes
    parameter_count: int  # elements of the initializers of those graphs (sparse ones: their stored values)
    external_files: tuple[str, ...]  # external data files: POSIX paths relative to the model directory, sorted
    metadata: dict[str, str]
    tensor_types: dict[str, int] = field(default_factory=dict)  # initializer data type name -> tensor count


@dataclass
class _Facts:
    node_count: int = 0
    parameter_count: int = 0
    tensor_types: dict[str, int] = field(default_factory=dict)
    external_sizes: dict[str, int] = field(default_factory=dict)  # normalized location -> file size


@dataclass(frozen=True)
class _Field:
    number: int
    wire: int
    value: int  # the varint, or the payload length of a length-delimited field
    start: int  # absolute offset of the payload
    stop: int  # absolute offset just past the field


class _Scanner:
    """Reads protobuf fields from a file through a small buffer; every read is bounded by an ``end`` offset."""

    def __init__(self, handle: BinaryIO, size: int, path: Path, model_dir: Path, limits: ONNXLimits) -> None:
        self._handle = handle
        self._size = size
        self._path = path
        self._model_dir = model_dir
        self._limits = limits
        self._buf = b""
        self._buf_start = 0
        self._fields_left = limits.max_fields
        self._external_checked: dict[str, int] = {}  # location as written -> file size
        self.pos = 0
        self.facts = _Facts()

    # -- errors ------------------------------------------------------------------------------------------------

    def fail(self, problem: str, at: int | None = None) -> NoReturn:
        where = self.pos if at is None else at
        raise InvalidONNXError(f"ONNX file '{self._path.name}': {problem} (at byte {where}); {_FIX}")

    # -- wire format -------------------------------------------------------------------------------------------

    def _window(self, n: int) -> int:
        """Make bytes [pos, pos + n) available in the buffer and return the index of pos in it."""
        offset = self.pos - self._buf_start
        if offset < 0 or offset + n > len(self._buf):
            try:
                self._handle.seek(self.pos)
                self._buf = self._handle.read(max(n, _READ_CHUNK_BYTES))
            except OSError as exc:
                self.fail(f"read failed: {exc.strerror or exc}")
            self._buf_start = self.pos
            offset = 0
            if len(self._buf) < n:
                self.fail(f"expected {n} more bytes, found {len(self._buf)}: the file shrank while being read")
        return offset

    def varint(self, end: int) -> int:
        available = min(10, end - self.pos)
        if available <= 0:
            self.fail("expected a varint, found the end of the enclosing message")
        offset = self._window(available)
        buf = self._buf
        result = 0
        for i in range(available):
            byte = buf[offset + i]
            result |= (byte & 0x7F) << (7 * i)
            if byte < 0x80:
                if result >= 1 << 64:
                    self.fail("expected a varint of at most 64 bits, found a larger one")
                self.pos += i + 1
                return result
        if available < 10:
            self.fail("expected a varint, found one cut off by the end of the enclosing message")
        self.fail("expected a varint of at most 10 bytes, found a longer one")

    def read_bytes(self, length: int) -> bytes:
        offset = self._window(length)
        self.pos += length
        return self._buf[offset : offset + length]

    def fields(self, end: int) -> Iterator[_Field]:
        """Yield the fields of the message that ends at ``end``; the consumer may read inside each payload."""
        while self.pos < end:
            self._fields_left -= 1
            if self._fields_left < 0:
                self.fail(f"the file has more than {self._limits.max_fields} protobuf fields")
            field_at = self.pos
            key = self.varint(end)
            number, wire = key >> 3, key & 7
            if number == 0 or number > _MAX_FIELD_NUMBER:
                self.fail(f"expected a field number from 1 to {_MAX_FIELD_NUMBER}, found {number}", field_at)
            if wire == _VARINT:
                value = self.varint(end)
                found = _Field(number, wire, value, self.pos, self.pos)
            elif wire in (_FIXED64, _FIXED32):
                width = 8 if wire == _FIXED64 else 4
                if width > end - self.pos:
                    self.fail(f"field {number} needs {width} bytes, only {end - self.pos} are left in its message")
                found = _Field(number, wire, 0, self.pos, self.pos + width)
            elif wire == _LEN:
                length = self.varint(end)
                if length > end - self.pos:
                    self.fail(
                        f"field {number} declares {length} bytes, only {end - self.pos} are left in its message",
                        field_at,
                    )
                found = _Field(number, wire, length, self.pos, self.pos + length)
            else:
                kind = "a group (deprecated, never used by ONNX)" if wire in (3, 4) else "an invalid wire type"
                self.fail(f"field {number} has wire type {wire}, {kind}", field_at)
            yield found
            self.pos = found.stop

    def expect(self, f: _Field, wire: int, what: str) -> None:
        if f.wire != wire:
            names = {_VARINT: "a varint", _FIXED64: "a fixed64", _LEN: "length-delimited", _FIXED32: "a fixed32"}
            self.fail(f"expected {what} (field {f.number}) to be {names[wire]}, found wire type {f.wire}", f.start)

    def string(self, f: _Field, what: str) -> str:
        self.expect(f, _LEN, what)
        if f.value > self._limits.max_string_bytes:
            self.fail(f"{what} is {f.value} bytes long, more than the limit of {self._limits.max_string_bytes}")
        raw = self.read_bytes(f.value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"expected {what} to be UTF-8 text, found invalid bytes", f.start)

    def int64(self, f: _Field, what: str) -> int:
        self.expect(f, _VARINT, what)
        return f.value - (1 << 64) if f.value >= 1 << 63 else f.value

    # -- messages ----------------------------------------------------------------------------------------------

    def model(self) -> ONNXInfo:
        ir_version: int | None = None
        producer_name = producer_version = ""
        graph_seen = False
        opsets: dict[str, int] = {}
        metadata: dict[str, str] = {}
        seen: set[int] = set()
        for f in self.fields(self._size):
            if f.number in (_MODEL_IR_VERSION, _MODEL_PRODUCER_NAME, _MODEL_PRODUCER_VERSION, _MODEL_GRAPH):
                if f.number in seen:
                    self.fail(f"ModelProto field {f.number} appears twice; it must appear once", f.start)
                seen.add(f.number)
            if f.number == _MODEL_IR_VERSION:
                ir_version = self.int64(f, "ir_version")
            elif f.number == _MODEL_PRODUCER_NAME:
                producer_name = self.string(f, "producer_name")
            elif f.number == _MODEL_PRODUCER_VERSION:
                producer_version = self.string(f, "producer_version")
            elif f.number == _MODEL_GRAPH:
                self.expect(f, _LEN, "graph")
                self.graph(f.stop, depth=1, counting=True)
                graph_seen = True
            elif f.number == _MODEL_OPSET_IMPORT:
                self.expect(f, _LEN, "opset_import")
                domain, version = self.opset(f.stop)
                if domain in opsets:
                    self.fail(f"opset_import lists domain {domain!r} twice", f.start)
                if len(opsets) >= self._limits.max_opsets:
                    self.fail(f"more than {self._limits.max_opsets} opset_import entries")
                opsets[domain] = version
            elif f.number == _MODEL_METADATA_PROPS:
                self.expect(f, _LEN, "metadata_props")
                key, value = self.entry(f.stop, "metadata_props")
                if key in metadata:
                    self.fail(f"metadata_props has the key {key[:100]!r} twice", f.start)
                if len(metadata) >= self._limits.max_metadata_entries:
                    self.fail(f"more than {self._limits.max_metadata_entries} metadata_props entries")
                metadata[key] = value
            elif f.number == _MODEL_TRAINING_INFO:
                self.expect(f, _LEN, "training_info")
                self.training_info(f.stop)
            elif f.number == _MODEL_FUNCTIONS:
                self.expect(f, _LEN, "functions")
                self.function(f.stop)
        if ir_version is None:
            self.fail("expected an ir_version (ModelProto field 1), found none; this may not be an ONNX file")
        if ir_version < 1:
            self.fail(f"expected an ir_version of at least 1, found {ir_version}")
        if not graph_seen:
            self.fail("expected a graph (ModelProto field 7), found none; this may not be an ONNX file")
        if ir_version >= 3 and not opsets:
            self.fail(
                f"expected at least one opset_import (required since IR version 3), found none in IR "
                f"version {ir_version}"
            )
        facts = self.facts
        return ONNXInfo(
            ir_version=ir_version,
            producer=f"{producer_name} {producer_version}".strip(),
            opsets=opsets,
            node_count=facts.node_count,
            parameter_count=facts.parameter_count,
            external_files=tuple(sorted(facts.external_sizes)),
            metadata=metadata,
            tensor_types=dict(sorted(facts.tensor_types.items())),
        )

    def opset(self, end: int) -> tuple[str, int]:
        domain = ""
        version: int | None = None
        for f in self.fields(end):
            if f.number == _OPSET_DOMAIN:
                domain = self.string(f, "opset_import domain")
            elif f.number == _OPSET_VERSION:
                version = self.int64(f, "opset_import version")
        if version is None:
            self.fail(f"opset_import for domain {domain!r} has no version")
        return domain or _DEFAULT_DOMAIN, version

    def entry(self, end: int, what: str) -> tuple[str, str]:
        key: str | None = None
        value = ""
        for f in self.fields(end):
            if f.number == _ENTRY_KEY:
                key = self.string(f, f"{what} key")
            elif f.number == _ENTRY_VALUE:
                value = self.string(f, f"{what} value")
        if key is None:
            self.fail(f"a {what} entry has no key")
        return key, value

    def training_info(self, end: int) -> None:
        for f in self.fields(end):
            if f.number in (_TRAINING_INITIALIZATION, _TRAINING_ALGORITHM):
                self.expect(f, _LEN, "training_info graph")
                self.graph(f.stop, depth=1, counting=False)

    def function(self, end: int) -> None:
        for f in self.fields(end):
            if f.number == _FUNCTION_NODE:
                self.expect(f, _LEN, "function node")
                self.node(f.stop, depth=1, counting=False)

    def graph(self, end: int, depth: int, counting: bool) -> None:
        if depth > self._limits.max_depth:
            self.fail(f"graphs are nested more than {self._limits.max_depth} deep")
        for f in self.fields(end):
            if f.number == _GRAPH_NODE:
                self.expect(f, _LEN, "node")
                if counting:
                    self.facts.node_count += 1
                self.node(f.stop, depth, counting)
            elif f.number == _GRAPH_INITIALIZER:
                self.expect(f, _LEN, "initializer")
                n_elements, type_name = self.tensor(f.stop, "initializer")
                if counting:
                    self.facts.parameter_count += n_elements
                    self.facts.tensor_types[type_name] = self.facts.tensor_types.get(type_name, 0) + 1
            elif f.number == _GRAPH_SPARSE_INITIALIZER:
                self.expect(f, _LEN, "sparse_initializer")
                n_values, type_name = self.sparse_tensor(f.stop)
                if counting:
                    self.facts.parameter_count += n_values
                    self.facts.tensor_types[type_name] = self.facts.tensor_types.get(type_name, 0) + 1

    def node(self, end: int, depth: int, counting: bool) -> None:
        for f in self.fields(end):
            if f.number == _NODE_ATTRIBUTE:
                self.expect(f, _LEN, "node attribute")
                self.attribute(f.stop, depth, counting)

    def attribute(self, end: int, depth: int, counting: bool) -> None:
        for f in self.fields(end):
            if f.number in (_ATTR_T, _ATTR_TENSORS):
                self.expect(f, _LEN, "attribute tensor")
                self.tensor(f.stop, "attribute tensor")
            elif f.number in (_ATTR_G, _ATTR_GRAPHS):
                self.expect(f, _LEN, "attribute graph")
                self.graph(f.stop, depth + 1, counting)
            elif f.number in (_ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS):
                self.expect(f, _LEN, "attribute sparse tensor")
                self.sparse_tensor(f.stop)

    def sparse_tensor(self, end: int) -> tuple[int, str]:
        n_values, type_name = 0, "UNDEFINED"
        for f in self.fields(end):
            if f.number == _SPARSE_VALUES:
                self.expect(f, _LEN, "sparse tensor values")
                n_values, type_name = self.tensor(f.stop, "sparse tensor values")
            elif f.number == _SPARSE_INDICES:
                self.expect(f, _LEN, "sparse tensor indices")
                self.tensor(f.stop, "sparse tensor indices")
        return n_values, type_name

    def tensor(self, end: int, what: str) -> tuple[int, str]:
        """Check one TensorProto; return its element count and data type name."""
        start = self.pos
        dims: list[int] = []
        data_type = 0
        name = ""
        raw_length: int | None = None
        location_external = False
        external: dict[str, str] = {}
        for f in self.fields(end):
            if f.number == _TENSOR_DIMS:
                if f.wire == _LEN:  # packed
                    while self.pos < f.stop:
                        self._add_dim(dims, self.varint(f.stop), f)
                else:
                    self._add_dim(dims, self.int64(f, "dims"), f)
            elif f.number == _TENSOR_DATA_TYPE:
                data_type = self.int64(f, "data_type")
            elif f.number == _TENSOR_NAME:
                name = self.string(f, "tensor name")
            elif f.number == _TENSOR_RAW_DATA:
                self.expect(f, _LEN, "raw_data")
                raw_length = f.value
            elif f.number == _TENSOR_EXTERNAL_DATA:
                self.expect(f, _LEN, "external_data")
                if len(external) >= self._limits.max_external_entries:
                    self.fail(f"a tensor has more than {self._limits.max_external_entries} external_data entries")
                key, value = self.entry(f.stop, "external_data")
                if key in external:
                    self.fail(f"external_data has the key {key[:100]!r} twice", f.start)
                external[key] = value
            elif f.number == _TENSOR_DATA_LOCATION:
                location_external = self.int64(f, "data_location") == _DATA_LOCATION_EXTERNAL
        label = f"{what} {name[:200]!r}" if name else f"an unnamed {what}"
        n_elements = 1
        for dim in dims:
            n_elements *= dim
        type_name, bits = ONNX_DATA_TYPES.get(data_type, (f"TYPE_{data_type}", None))
        expected_bytes = None if bits is None else (n_elements * bits + 7) // 8
        if raw_length is not None and expected_bytes is not None and raw_length != expected_bytes:
            self.fail(
                f"{label} ({type_name}, dims {dims}) needs {expected_bytes} bytes, its raw_data holds {raw_length}",
                start,
            )
        if location_external or external:
            if raw_length is not None:
                self.fail(f"{label} has both raw_data and external data; it must have one", start)
            self._external(external, label, expected_bytes, start)
        return n_elements, type_name

    def _add_dim(self, dims: list[int], value: int, f: _Field) -> None:
        signed = value - (1 << 64) if value >= 1 << 63 else value
        if signed < 0:
            self.fail(f"expected tensor dims to be non-negative, found {signed}", f.start)
        if len(dims) >= self._limits.max_rank:
            self.fail(f"a tensor has more than {self._limits.max_rank} dims", f.start)
        dims.append(signed)

    # -- external data -----------------------------------------------------------------------------------------

    def _external(self, entries: dict[str, str], label: str, expected_bytes: int | None, at: int) -> None:
        location = entries.get("location")
        if not location:
            self.fail(f"{label} says its data is external but has no 'location' entry", at)
        offset = self._decimal(entries, "offset", label, at)
        length = self._decimal(entries, "length", label, at)
        if length is not None and expected_bytes is not None and length != expected_bytes:
            self.fail(f"{label} needs {expected_bytes} bytes, its external data length is {length}", at)
        needed = (offset or 0) + (length if length is not None else expected_bytes or 0)
        file_size = self._external_file_size(location, label)
        if needed > file_size:
            self.fail(
                f"{label} reads bytes up to {needed} of external data file {location!r}, which has only "
                f"{file_size} bytes",
                at,
            )

    def _decimal(self, entries: dict[str, str], key: str, label: str, at: int) -> int | None:
        text = entries.get(key)
        if text is None:
            return None
        if not (text.isascii() and text.isdigit() and len(text) <= 20):
            self.fail(f"expected the external data {key} of {label} to be a decimal number, found {text[:40]!r}", at)
        return int(text)

    def _external_file_size(self, location: str, label: str) -> int:
        """Size of the external data file, after checking it is a regular file inside the model directory."""
        cached = self._external_checked.get(location)
        if cached is not None:
            return cached
        name = self._path.name

        def unsafe(problem: str) -> UnsafePathError:
            return UnsafePathError(
                f"ONNX file '{name}': the external data location {location[:200]!r} of {label} {problem}; "
                "external data must be a regular file inside the model directory, named by a relative path "
                "(re-save the model with `onnx.save_model(model, path, save_as_external_data=True)`)"
            )

        if location.startswith("/") or "\\" in location or ":" in location or "\x00" in location:
            raise unsafe("is an absolute path or uses '\\', ':' or NUL")
        parts = PurePosixPath(location).parts
        if not parts or ".." in parts:
            raise unsafe("escapes the model directory with '..'" if parts else "is empty")
        current = self._model_dir
        for index, part in enumerate(parts):
            current = current / part
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                self.fail(f"{label} keeps its data in {location!r}, which does not exist in the model directory")
            except OSError as exc:
                self.fail(f"cannot inspect the external data file {location!r}: {exc.strerror or exc}")
            if stat.S_ISLNK(st.st_mode):
                raise unsafe(f"goes through the symlink {'/'.join(parts[: index + 1])!r}")
            is_last = index == len(parts) - 1
            if is_last and not stat.S_ISREG(st.st_mode):
                raise unsafe("is not a regular file")
            if not is_last and not stat.S_ISDIR(st.st_mode):
                raise unsafe(f"goes through {'/'.join(parts[: index + 1])!r}, which is not a directory")
        self._external_checked[location] = st.st_size
        self.facts.external_sizes["/".join(parts)] = st.st_size  # "./data//w.bin" is reported as "data/w.bin"
        return st.st_size


def read_onnx(path: Path, model_dir: Path, limits: ONNXLimits = ONNXLimits()) -> ONNXInfo:
    """Scan the ONNX model at ``path``; external data locations are resolved inside ``model_dir``."""
    try:
        opened = open_regular(path)
    except OSError as exc:
        raise InvalidONNXError(
            f"cannot open ONNX file '{path}': {exc.strerror or exc}; check the path and its permissions"
        ) from None
    if opened is None:
        raise InvalidONNXError(f"ONNX file '{path.name}' is not a regular file; give the path of the file itself")
    handle, size = opened
    with handle:
        if size > limits.max_file_bytes:
            raise InvalidONNXError(
                f"ONNX file '{path.name}' is {size} bytes, more than the {limits.max_file_bytes}-byte limit of "
                "a protobuf message; save the weights as external data with "
                "`onnx.save_model(model, path, save_as_external_data=True)`"
            )
        return _Scanner(handle, size, path, model_dir, limits).model()
