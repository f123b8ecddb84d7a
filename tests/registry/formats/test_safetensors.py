"""read_safetensors: real files written the way the safetensors library writes them, and hostile ones."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slmops.errors import InvalidSafetensorsError
from slmops.registry.formats.safetensors import (
    DTYPE_SIZES,
    SafetensorsLimits,
    SafetensorsTensor,
    read_safetensors,
)

_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_}


def safetensors_bytes(arrays: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> bytes:
    """Serialize like ``safetensors.numpy.save_file``: offsets in name order, header padded to 8 bytes."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(arrays):
        dtype, array = arrays[name]
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    return raw_safetensors(json.dumps(header, separators=(",", ":")).encode(), b"".join(chunks), pad=True)


def raw_safetensors(header: bytes, data: bytes, pad: bool = False, length: int | None = None) -> bytes:
    if pad:
        header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def header_file(tmp_path: Path, header: object, data: bytes = b"") -> Path:
    """A file whose JSON header is ``header`` verbatim (any JSON value), followed by ``data``."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors(json.dumps(header).encode(), data))
    return path


def entry(dtype: str, shape: list[Any], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.fixture
def valid_bytes() -> bytes:
    return safetensors_bytes(
        {
            "model.embed.weight": ("F16", np.arange(24, dtype=np.float16).reshape(6, 4)),
            "model.norm.weight": ("F32", np.ones(4, dtype=np.float32)),
            "model.step": ("I64", np.array(7, dtype=np.int64)),
            "model.mask": ("BOOL", np.zeros((2, 3), dtype=np.bool_)),
            "model.empty": ("U8", np.zeros((0, 5), dtype=np.uint8)),
        },
        metadata={"format": "pt"},
    )


# -- valid files ---------------------------------------------------------------------------------------------------


def test_valid_file_reports_header_metadata_and_tensors(tmp_path: Path, valid_bytes: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(valid_bytes)

    info = read_safetensors(path)

    assert info.file_size == len(valid_bytes)
    assert info.header_size == struct.unpack("<Q", valid_bytes[:8])[0]
    assert info.header_size % 8 == 0  # padded with spaces, as the library does
    assert info.metadata == {"format": "pt"}
    by_name = {t.name: t for t in info.tensors}
    assert set(by_name) == {"model.embed.weight", "model.norm.weight", "model.step", "model.mask", "model.empty"}
    assert by_name["model.embed.weight"] == SafetensorsTensor("model.embed.weight", "F16", (6, 4), 0, 48)
    assert by_name["model.embed.weight"].n_elements == 24
    assert by_name["model.step"].shape == () and by_name["model.step"].n_elements == 1
    assert by_name["model.empty"].n_elements == 0 and by_name["model.empty"].n_bytes == 0
    assert [t.begin for t in info.tensors] == sorted(t.begin for t in info.tensors)
    assert info.parameter_count == 24 + 4 + 1 + 6 + 0
    assert info.data_offset + info.tensors[-1].end == info.file_size


def test_data_read_at_the_reported_offsets_is_the_tensor(tmp_path: Path) -> None:
    weight = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes({"w": ("F32", weight), "b": ("F32", np.full(4, 2.5, dtype=np.float32))}))

    info = read_safetensors(path)

    raw = path.read_bytes()
    for tensor in info.tensors:
        start = info.data_offset + tensor.begin
        array = np.frombuffer(raw[start : info.data_offset + tensor.end], dtype=np.float32).reshape(tensor.shape)
        expected = weight if tensor.name == "w" else np.full(4, 2.5, dtype=np.float32)
        np.testing.assert_array_equal(array, expected)


def test_header_only_file_with_no_tensors_is_valid(tmp_path: Path) -> None:
    path = header_file(tmp_path, {"__metadata__": {"a": "b"}})

    info = read_safetensors(path)

    assert info.tensors == () and info.metadata == {"a": "b"} and info.parameter_count == 0


def test_every_known_dtype_is_accepted_with_its_size(tmp_path: Path) -> None:
    header: dict[str, Any] = {}
    offset = 0
    for dtype, size in DTYPE_SIZES.items():
        header[f"t.{dtype}"] = entry(dtype, [3, 2], offset, offset + 6 * size)
        offset += 6 * size
    path = header_file(tmp_path, header, b"\0" * offset)

    info = read_safetensors(path)

    assert sorted(t.dtype for t in info.tensors) == sorted(DTYPE_SIZES)


def test_a_header_with_exactly_the_limit_is_accepted(tmp_path: Path) -> None:
    header = json.dumps({}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors(header, b""))

    info = read_safetensors(path, SafetensorsLimits(max_header_bytes=len(header)))

    assert info.header_size == len(header)


# -- hostile files -------------------------------------------------------------------------------------------------


def _refused(path: Path, *fragments: str, limits: SafetensorsLimits | None = None) -> str:
    with pytest.raises(InvalidSafetensorsError) as caught:
        read_safetensors(path, limits or SafetensorsLimits())
    message = str(caught.value)
    assert path.name in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_header_length_of_2_to_the_63_fails_at_once(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors(b"{}", b"", length=2**63))

    _refused(path, "header length 9223372036854775808 bytes exceeds the limit of 104857600 bytes")


def test_header_longer_than_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors(b"{}", b"", length=1000))

    _refused(path, "header length 1000 bytes exceeds the 2 bytes left in the file")


@pytest.mark.parametrize("content", [b"", b"\x02\x00\x00", b"\x00" * 7])
def test_file_shorter_than_the_length_prefix_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)

    _refused(path, "expected at least 8 bytes")


def test_header_over_a_custom_limit_is_refused(tmp_path: Path) -> None:
    path = header_file(tmp_path, {"__metadata__": {"k": "v" * 100}})

    _refused(path, "exceeds the limit of 64 bytes", limits=SafetensorsLimits(max_header_bytes=64))


def test_overlapping_tensors_are_named(tmp_path: Path) -> None:
    header = {"a": entry("F32", [4], 0, 16), "b": entry("F32", [2], 8, 16)}
    path = header_file(tmp_path, header, b"\0" * 16)

    _refused(path, "tensors 'a' [0, 16) and 'b' [8, 16) overlap")


def test_a_tensor_inside_another_overlaps(tmp_path: Path) -> None:
    header = {"outer": entry("U8", [10], 0, 10), "inner": entry("U8", [0], 4, 4)}
    path = header_file(tmp_path, header, b"\0" * 10)

    _refused(path, "'outer' [0, 10) and 'inner' [4, 4) overlap")


def test_a_hole_between_tensors_is_located(tmp_path: Path) -> None:
    header = {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)}
    path = header_file(tmp_path, header, b"\0" * 20)

    _refused(path, "data bytes [8, 12) belong to no tensor (a hole before 'b')")


def test_a_hole_at_the_start_is_located(tmp_path: Path) -> None:
    path = header_file(tmp_path, {"a": entry("U8", [4], 4, 8)}, b"\0" * 8)

    _refused(path, "data bytes [0, 4) belong to no tensor")


def test_trailing_bytes_after_the_last_tensor_are_refused(tmp_path: Path) -> None:
    path = header_file(tmp_path, {"a": entry("U8", [4], 0, 4)}, b"\0" * 9)

    _refused(path, "data bytes [4, 9) after the last tensor belong to no tensor")


def test_size_that_does_not_match_dtype_times_shape_is_refused(tmp_path: Path) -> None:
    path = header_file(tmp_path, {"w": entry("BF16", [3, 4], 0, 12)}, b"\0" * 12)

    _refused(path, "tensor 'w' (BF16, shape [3, 4]) needs 24 bytes, but its data_offsets [0, 12] hold 12 bytes")


def test_enormous_shape_is_refused_without_building_its_product(tmp_path: Path) -> None:
    path = header_file(tmp_path, {"w": entry("F64", [2**62] * 64, 0, 8)}, b"\0" * 8)

    _refused(path, "needs more than 18446744073709551616 bytes")


def test_unknown_dtype_is_refused(tmp_path: Path) -> None:
    path = header_file(tmp_path, {"w": entry("F128", [1], 0, 16)}, b"\0" * 16)

    _refused(path, "tensor 'w' has unknown dtype 'F128'; known dtypes: BOOL, U8")


@pytest.mark.parametrize("header", [[1, 2], "text", 3, None, True])
def test_header_that_is_not_a_json_object_is_refused(tmp_path: Path, header: object) -> None:
    path = header_file(tmp_path, header)

    _refused(path, "expected the header to be a JSON object")


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    tensor = b'{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    header = b'{"w":' + tensor + b',"w":' + tensor + b"}"
    path.write_bytes(raw_safetensors(header, b"\0"))

    _refused(path, "the header names 'w' twice")


def test_duplicate_keys_inside_a_tensor_entry_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors(b'{"w":{"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,1]}}', b"\0"))

    _refused(path, "the header names 'dtype' twice")


@pytest.mark.parametrize(
    ("metadata", "found"),
    [({"n": 1}, "found int for key 'n'"), ({"n": None}, "found NoneType"), (["a"], "found list"), ("x", "found str")],
)
def test_metadata_that_is_not_str_to_str_is_refused(tmp_path: Path, metadata: object, found: str) -> None:
    path = header_file(tmp_path, {"__metadata__": metadata})

    _refused(path, "__metadata__", found)


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        ([1, 2], "expected tensor 'w' to be an object"),
        ({"dtype": "U8", "shape": [1]}, "tensor 'w' has no data_offsets"),
        ({**entry("U8", [1], 0, 1), "extra": 1}, "tensor 'w' has unknown keys 'extra'"),
        (entry("U8", [-1], 0, 1), "shape of tensor 'w' to be a list of non-negative integers"),
        (entry("U8", [True], 0, 1), "shape of tensor 'w' to be a list of non-negative integers"),
        (entry("U8", [1.0], 0, 1), "shape of tensor 'w' to be a list of non-negative integers"),
        ({"dtype": "U8", "shape": 1, "data_offsets": [0, 1]}, "shape of tensor 'w'"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [0]}, "data_offsets of tensor 'w' to be [begin, end]"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}, "data_offsets of tensor 'w'"),
        ({"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}, "data_offsets of tensor 'w'"),
        ({"dtype": "U8", "shape": [1], "data_offsets": ["0", "1"]}, "data_offsets of tensor 'w'"),
        (entry("U8", [0], 1, 0), "data_offsets [1, 0] with begin after end"),
        (entry("U8", [4], 0, 4), "tensor 'w' ends at data byte 4, past the end of the 1-byte data section"),
        ({"dtype": 5, "shape": [1], "data_offsets": [0, 1]}, "unknown dtype 5"),
    ],
)
def test_malformed_tensor_entries_are_refused(tmp_path: Path, tensor: object, fragment: str) -> None:
    path = header_file(tmp_path, {"w": tensor}, b"\0")

    _refused(path, fragment)


def test_rank_over_the_limit_is_refused(tmp_path: Path) -> None:
    path = header_file(tmp_path, {"w": entry("U8", [1] * 5, 0, 1)}, b"\0")

    _refused(path, "5 dimensions, more than the limit of 4", limits=SafetensorsLimits(max_rank=4))


def test_tensor_count_over_the_limit_is_refused(tmp_path: Path) -> None:
    header = {f"t{i}": entry("U8", [1], i, i + 1) for i in range(3)}
    path = header_file(tmp_path, header, b"\0" * 3)

    _refused(path, "lists 3 tensors, more than the limit of 2", limits=SafetensorsLimits(max_tensors=2))


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (b'{"w": \xff}', "not valid UTF-8"),
        (b'{"w": ', "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "expected the header to be a JSON object starting with '{'"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
        (b'{"w": {"dtype": "U8", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 1]}}', "thousands of digits"),
        (b'{"w": NaN}', "expected tensor 'w' to be an object"),
        (b"\xef\xbb\xbf{}", "starting with '{'"),
    ],
)
def test_malformed_json_is_refused(tmp_path: Path, header: bytes, fragment: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw_safetensors(header, b"\0"))

    _refused(path, fragment)


def test_missing_file_is_our_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidSafetensorsError, match="cannot open safetensors file"):
        read_safetensors(tmp_path / "absent.safetensors")


def test_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dir.safetensors").mkdir()

    _refused(tmp_path / "dir.safetensors", "is not a regular file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    os.mkfifo(path)

    _refused(path, "is not a regular file")


# -- properties ----------------------------------------------------------------------------------------------------

_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _parses_or_refuses(path: Path) -> None:
    with contextlib.suppress(InvalidSafetensorsError):
        read_safetensors(path)


@_FUZZ
@given(data=st.data())
def test_every_strict_prefix_of_a_valid_file_is_refused(
    tmp_path: Path, valid_bytes: bytes, data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(valid_bytes) - 1))
    path = tmp_path / "model.safetensors"
    path.write_bytes(valid_bytes[:cut])

    with pytest.raises(InvalidSafetensorsError):
        read_safetensors(path)


@_FUZZ
@given(data=st.data())
def test_any_byte_flip_parses_or_raises_only_our_error(tmp_path: Path, valid_bytes: bytes, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(valid_bytes) - 1))
    value = data.draw(st.integers(0, 255))
    path = tmp_path / "model.safetensors"
    path.write_bytes(valid_bytes[:position] + bytes([value]) + valid_bytes[position + 1 :])

    _parses_or_refuses(path)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
_TENSORISH = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPE_SIZES, "F128", ""]) | _JSON,
        "shape": st.lists(st.integers(-2, 5), max_size=4) | _JSON,
        "data_offsets": st.lists(st.integers(-2, 64), min_size=2, max_size=2) | _JSON,
    }
)


@_FUZZ
@given(
    header=st.dictionaries(
        st.sampled_from(["__metadata__", "a", "b", "c"]),
        _TENSORISH | _JSON,
        max_size=4,
    ),
    data_size=st.integers(0, 64),
)
def test_any_json_header_parses_or_raises_only_our_error(tmp_path: Path, header: object, data_size: int) -> None:
    path = header_file(tmp_path, header, b"\0" * data_size)

    _parses_or_refuses(path)


@_FUZZ
@given(content=st.binary(max_size=256))
def test_any_bytes_parse_or_raise_only_our_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)

    _parses_or_refuses(path)


@_FUZZ
@given(
    sizes=st.lists(st.tuples(st.sampled_from(sorted(_NP_DTYPES)), st.lists(st.integers(0, 4), max_size=3)), max_size=6)
)
def test_files_written_like_the_library_round_trip(tmp_path: Path, sizes: list[tuple[str, list[int]]]) -> None:
    arrays: dict[str, tuple[str, np.ndarray]] = {
        f"t{i}": (dtype, np.zeros(shape, dtype=_NP_DTYPES[dtype])) for i, (dtype, shape) in enumerate(sizes)
    }
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(arrays))

    info = read_safetensors(path)

    assert {t.name: (t.dtype, list(t.shape)) for t in info.tensors} == {
        name: (dtype, list(array.shape)) for name, (dtype, array) in arrays.items()
    }
    assert info.parameter_count == sum(array.size for _, array in arrays.values())
