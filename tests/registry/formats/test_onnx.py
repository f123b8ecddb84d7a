"""read_onnx: models built and saved by the onnx package, and hostile bytes built by hand."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from slmops.errors import InvalidModelError, InvalidONNXError, UnsafePathError
from slmops.registry.formats.onnx import ONNXInfo, ONNXLimits, read_onnx

# -- building models with the onnx package -------------------------------------------------------------------------


def linear_model(metadata: dict[str, str] | None = None, extra_opsets: bool = True) -> onnx.ModelProto:
    """y = x @ W + b, with W (4, 3) and b (3,) as initializers: 15 parameters, 2 nodes."""
    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), name="W")
    bias = numpy_helper.from_array(np.ones(3, dtype=np.float32), name="b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[weight, bias],
    )
    opsets = [helper.make_opsetid("", 17)]
    if extra_opsets:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="slmops-tests", producer_version="1.0")
    if metadata:
        helper.set_model_props(model, metadata)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def if_model() -> onnx.ModelProto:
    """An If node whose two branches each hold an initializer: subgraph nodes and parameters count too."""

    def branch(name: str, size: int) -> onnx.GraphProto:
        constant = numpy_helper.from_array(np.zeros(size, dtype=np.float16), name=f"{name}_c")
        return helper.make_graph(
            [helper.make_node("Identity", [f"{name}_c"], [f"{name}_out"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT16, [size])],
            initializer=[constant],
        )

    node = helper.make_node("If", ["cond"], ["out"], then_branch=branch("then", 5), else_branch=branch("else", 5))
    graph = helper.make_graph(
        [node],
        "main",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, [5])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def external_model(tmp_path: Path, location: str = "weights.data") -> Path:
    """Saved by onnx with every initializer in one external data file."""
    path = tmp_path / "model.onnx"
    onnx.save_model(
        linear_model(),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def set_external(model: onnx.ModelProto, tensor_index: int, **entries: str) -> onnx.ModelProto:
    tensor = model.graph.initializer[tensor_index]
    del tensor.external_data[:]
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    return model


# -- valid models --------------------------------------------------------------------------------------------------


def test_facts_of_a_model_built_with_onnx(tmp_path: Path) -> None:
    model = linear_model(metadata={"model_author": "tests", "license": "MIT"})
    onnx.checker.check_model(model)
    path = save(model, tmp_path / "model.onnx")

    info = read_onnx(path, tmp_path)

    assert info == ONNXInfo(
        ir_version=model.ir_version,
        producer="slmops-tests 1.0",
        opsets={"ai.onnx": 17, "com.microsoft": 1},
        node_count=2,
        parameter_count=15,
        external_files=(),
        metadata={"model_author": "tests", "license": "MIT"},
        tensor_types={"FLOAT": 2},
    )


def test_subgraph_nodes_and_initializers_are_counted(tmp_path: Path) -> None:
    model = if_model()
    onnx.checker.check_model(model)

    info = read_onnx(save(model, tmp_path / "model.onnx"), tmp_path)

    assert info.node_count == 3  # If + one Identity in each branch
    assert info.parameter_count == 10
    assert info.tensor_types == {"FLOAT16": 2}


def test_external_data_saved_by_onnx_is_checked_and_reported(tmp_path: Path) -> None:
    path = external_model(tmp_path)

    info = read_onnx(path, tmp_path)

    assert info.external_files == ("weights.data",)
    assert info.parameter_count == 15
    assert (tmp_path / "weights.data").stat().st_size == 15 * 4
    reloaded = onnx.load(str(path))  # the onnx package agrees the model and its data are whole
    assert [t.name for t in reloaded.graph.initializer] == ["W", "b"]


def test_external_data_in_a_subdirectory_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    model = set_external(linear_model(), 0, location="data/w.bin", offset="0", length="48")
    model = set_external(model, 1, location="./data/w.bin", offset="48", length="12")
    (tmp_path / "data" / "w.bin").write_bytes(b"\0" * 60)

    info = read_onnx(save(model, tmp_path / "model.onnx"), tmp_path)

    assert info.external_files == ("data/w.bin",)  # as the model directory lists it, whatever the spelling


def test_every_data_type_onnx_knows_has_its_size_checked(tmp_path: Path) -> None:
    tensors = []
    for name, code in TensorProto.DataType.items():
        if name in ("UNDEFINED", "STRING") or name.startswith("FLOAT6"):
            continue
        np_type = helper.tensor_dtype_to_np_dtype(code)
        array = np.zeros((2, 3), dtype=np_type)
        tensors.append(numpy_helper.from_array(array, name=f"t_{name}"))
    graph = helper.make_graph([], "types", [], [], initializer=tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])

    info = read_onnx(save(model, tmp_path / "model.onnx"), tmp_path)

    assert info.parameter_count == 6 * len(tensors)


def test_raw_data_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    model = linear_model()
    model.graph.initializer[0].raw_data = b"\0" * 47

    with pytest.raises(
        InvalidONNXError, match=r"initializer 'W' \(FLOAT, dims \[4, 3\]\) needs 48 bytes, its raw_data holds 47"
    ):
        read_onnx(save(model, tmp_path / "model.onnx"), tmp_path)


# -- hostile external data -----------------------------------------------------------------------------------------


def _unsafe(model: onnx.ModelProto, tmp_path: Path, fragment: str) -> str:
    with pytest.raises(UnsafePathError) as caught:
        read_onnx(save(model, tmp_path / "model.onnx"), tmp_path)
    message = str(caught.value)
    assert "model.onnx" in message and fragment in message, message
    return message


def test_external_data_escaping_with_dotdot_is_refused(tmp_path: Path) -> None:
    model = set_external(linear_model(), 0, location="../../etc/passwd")

    _unsafe(model, tmp_path, "'../../etc/passwd' of initializer 'W' escapes the model directory with '..'")


@pytest.mark.parametrize("location", ["/etc/passwd", "C:\\Windows\\win.ini", "\\\\server\\share\\w.bin", "a\x00b"])
def test_external_data_at_an_absolute_path_is_refused(tmp_path: Path, location: str) -> None:
    model = set_external(linear_model(), 0, location=location)

    _unsafe(model, tmp_path, "is an absolute path or uses")


def test_external_data_through_a_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"\0" * 4096)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "weights.data").symlink_to(outside / "secret")
    model = set_external(linear_model(), 0, location="weights.data", offset="0", length="48")

    with pytest.raises(UnsafePathError, match=re.escape("goes through the symlink 'weights.data'")):
        read_onnx(save(model, model_dir / "model.onnx"), model_dir)


def test_external_data_through_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(b"\0" * 64)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "data").symlink_to(outside, target_is_directory=True)
    model = set_external(linear_model(), 0, location="data/w.bin", offset="0", length="48")

    with pytest.raises(UnsafePathError, match="goes through the symlink 'data'"):
        read_onnx(save(model, model_dir / "model.onnx"), model_dir)


def test_external_data_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    model = set_external(linear_model(), 0, location="weights")

    _unsafe(model, tmp_path, "is not a regular file")


def test_external_data_beyond_the_end_of_its_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.data").write_bytes(b"\0" * 60)
    model = set_external(linear_model(), 0, location="weights.data", offset="1000000", length="48")

    with pytest.raises(
        InvalidONNXError,
        match=re.escape("reads bytes up to 1000048 of external data file 'weights.data', which has only 60 bytes"),
    ):
        read_onnx(save(model, tmp_path / "model.onnx"), tmp_path)


def test_external_data_without_a_length_needs_the_tensor_size(tmp_path: Path) -> None:
    (tmp_path / "weights.data").write_bytes(b"\0" * 40)
    model = set_external(linear_model(), 0, location="weights.data")

    with pytest.raises(InvalidONNXError, match="reads bytes up to 48 of external data file"):
        read_onnx(save(model, tmp_path / "model.onnx"), tmp_path)


def test_external_data_file_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    model = set_external(linear_model(), 0, location="missing.data")

    with pytest.raises(InvalidONNXError, match=re.escape("keeps its data in 'missing.data', which does not exist")):
        read_onnx(save(model, tmp_path / "model.onnx"), tmp_path)


@pytest.mark.parametrize(
    ("entries", "fragment"),
    [
        ({"offset": "0"}, "says its data is external but has no 'location' entry"),
        ({"location": "w.data", "offset": "-1"}, "external data offset of initializer 'W' to be a decimal number"),
        ({"location": "w.data", "length": "1e3"}, "external data length of initializer 'W' to be a decimal number"),
        ({"location": "w.data", "length": "12"}, "needs 48 bytes, its external data length is 12"),
    ],
)
def test_malformed_external_data_entries_are_refused(tmp_path: Path, entries: dict[str, str], fragment: str) -> None:
    (tmp_path / "w.data").write_bytes(b"\0" * 64)
    model = set_external(linear_model(), 0, **entries)

    with pytest.raises(InvalidONNXError, match=re.escape(fragment)):
        read_onnx(save(model, tmp_path / "model.onnx"), tmp_path)


def test_external_data_in_a_constant_node_is_checked_too(tmp_path: Path) -> None:
    value = numpy_helper.from_array(np.zeros(4, dtype=np.float32), name="c")
    value.ClearField("raw_data")
    value.data_location = TensorProto.EXTERNAL
    value.external_data.add(key="location", value="/etc/shadow")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["y"], value=value)],
        "const",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    _unsafe(model, tmp_path, "'/etc/shadow' of attribute tensor 'c'")


# -- hostile bytes -------------------------------------------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


_OPSET = field(8, field(2, 17))


def _invalid(tmp_path: Path, content: bytes, fragment: str, limits: ONNXLimits | None = None) -> str:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(InvalidONNXError) as caught:
        read_onnx(path, tmp_path, limits or ONNXLimits())
    message = str(caught.value)
    assert "model.onnx" in message and fragment in message, message
    return message


def test_every_truncation_is_refused(tmp_path: Path) -> None:
    # One opset, no metadata: opset_import is the last field, so no strict prefix is a complete model.
    content = linear_model(extra_opsets=False).SerializeToString()
    path = tmp_path / "model.onnx"

    for cut in range(len(content)):
        path.write_bytes(content[:cut])
        with pytest.raises(InvalidONNXError):
            read_onnx(path, tmp_path)


def test_length_prefix_of_2_to_the_62_is_refused(tmp_path: Path) -> None:
    content = field(1, 8) + varint(7 << 3 | 2) + varint(2**62) + b"\0" * 10

    _invalid(tmp_path, content, "field 7 declares 4611686018427387904 bytes, only 10 are left in its message")


def test_nested_length_larger_than_its_parent_is_refused(tmp_path: Path) -> None:
    graph = varint(1 << 3 | 2) + varint(100) + b"\0" * 5  # a node claiming 100 bytes inside a 7-byte graph
    content = field(1, 8) + field(7, graph) + _OPSET

    _invalid(tmp_path, content, "field 1 declares 100 bytes, only 5 are left in its message")


def nested_graphs(depth: int) -> bytes:
    graph = b""
    for _ in range(depth):
        attribute = field(1, b"then_branch") + field(6, graph)
        graph = field(1, field(5, attribute))  # GraphProto.node -> NodeProto.attribute -> AttributeProto.g
    return field(1, 8) + field(7, graph) + _OPSET


def test_depth_bomb_of_nested_graphs_is_refused(tmp_path: Path) -> None:
    _invalid(tmp_path, nested_graphs(5000), "graphs are nested more than 32 deep")


def test_nesting_within_the_limit_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(nested_graphs(31))

    assert read_onnx(path, tmp_path).node_count == 31


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "expected an ir_version (ModelProto field 1), found none"),
        (field(1, 8) + _OPSET, "expected a graph (ModelProto field 7), found none"),
        (field(7, b"") + _OPSET, "expected an ir_version"),
        (field(1, 0) + field(7, b"") + _OPSET, "expected an ir_version of at least 1, found 0"),
        (field(1, 8) + field(7, b""), "expected at least one opset_import"),
        (field(1, 8) + field(1, 8) + field(7, b"") + _OPSET, "ModelProto field 1 appears twice"),
        (field(1, 8) + field(7, b"") + field(7, b"") + _OPSET, "ModelProto field 7 appears twice"),
        (field(1, 8) + field(7, 3) + _OPSET, "expected graph (field 7) to be length-delimited, found wire type 0"),
        (field(1, 8) + varint(7 << 3 | 3) + b"\x0c", "wire type 3, a group"),
        (field(1, 8) + varint(7 << 3 | 4), "wire type 4, a group"),
        (field(1, 8) + varint(7 << 3 | 6), "wire type 6, an invalid wire type"),
        (field(1, 8) + varint(7 << 3 | 7), "wire type 7, an invalid wire type"),
        (varint(0 << 3) + b"\x01", "expected a field number from 1 to 536870911, found 0"),
        (b"\x08" + b"\xff" * 10 + b"\x01", "expected a varint of at most 10 bytes"),
        (b"\x08" + b"\xff" * 9 + b"\x7f", "expected a varint of at most 64 bits"),
        (b"\x08\xff\xff", "cut off by the end of the enclosing message"),
        (field(1, 8) + field(2, b"\xff\xfe") + field(7, b"") + _OPSET, "producer_name to be UTF-8 text"),
        (field(1, 8) + field(7, b"") + field(8, field(1, b"x")), "opset_import for domain 'x' has no version"),
        (field(1, 8) + field(7, b"") + _OPSET + _OPSET, "opset_import lists domain 'ai.onnx' twice"),
        (field(1, 8) + field(7, b"") + _OPSET + field(14, field(2, b"v")), "a metadata_props entry has no key"),
        (
            field(1, 8) + field(7, b"") + _OPSET + field(14, field(1, b"k")) * 2,
            "metadata_props has the key 'k' twice",
        ),
        (field(1, 8) + field(7, field(5, field(1, 2**64 - 1))) + _OPSET, "tensor dims to be non-negative, found -1"),
        (field(1, 8) + field(7, field(5, varint(1 << 3 | 5))), "field 1 needs 4 bytes, only 0 are left"),
    ],
)
def test_malformed_messages_are_refused(tmp_path: Path, content: bytes, fragment: str) -> None:
    _invalid(tmp_path, content, fragment)


def test_too_many_fields_are_refused(tmp_path: Path) -> None:
    content = field(1, 8) + field(7, field(1, b"") * 100) + _OPSET

    _invalid(tmp_path, content, "more than 50 protobuf fields", ONNXLimits(max_fields=50))


def test_too_many_dims_are_refused(tmp_path: Path) -> None:
    packed = field(1, b"\x01" * 100_000)  # 100,000 packed dims
    content = field(1, 8) + field(7, field(5, packed)) + _OPSET

    _invalid(tmp_path, content, "a tensor has more than 64 dims")


def test_string_over_the_limit_is_refused(tmp_path: Path) -> None:
    content = field(1, 8) + field(2, b"p" * 100) + field(7, b"") + _OPSET

    _invalid(tmp_path, content, "producer_name is 100 bytes long", ONNXLimits(max_string_bytes=64))


def test_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = save(linear_model(), tmp_path / "model.onnx")

    with pytest.raises(InvalidONNXError, match="save the weights as external data"):
        read_onnx(path, tmp_path, ONNXLimits(max_file_bytes=10))


def test_missing_file_and_directory_are_our_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidONNXError, match="cannot open ONNX file"):
        read_onnx(tmp_path / "absent.onnx", tmp_path)
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(InvalidONNXError, match="is not a regular file"):
        read_onnx(tmp_path / "dir.onnx", tmp_path)


# -- properties ----------------------------------------------------------------------------------------------------

_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _parses_or_refuses(path: Path, model_dir: Path) -> None:
    with contextlib.suppress(InvalidModelError):  # InvalidONNXError, or UnsafePathError for external data
        read_onnx(path, model_dir)


@_FUZZ
@given(data=st.data())
def test_any_truncation_of_a_model_with_metadata_parses_or_raises_only_our_error(
    tmp_path: Path, data: st.DataObject
) -> None:
    content = linear_model(metadata={"a": "b", "c": "d"}).SerializeToString()
    path = tmp_path / "model.onnx"
    path.write_bytes(content[: data.draw(st.integers(0, len(content)))])

    _parses_or_refuses(path, tmp_path)


@_FUZZ
@given(data=st.data())
def test_any_byte_flip_parses_or_raises_only_our_error(tmp_path: Path, data: st.DataObject) -> None:
    content = if_model().SerializeToString()
    position = data.draw(st.integers(0, len(content) - 1))
    path = tmp_path / "model.onnx"
    path.write_bytes(content[:position] + bytes([data.draw(st.integers(0, 255))]) + content[position + 1 :])

    _parses_or_refuses(path, tmp_path)


@_FUZZ
@given(data=st.data())
def test_any_byte_flip_of_an_external_data_model_parses_or_raises_only_our_error(
    tmp_path: Path, data: st.DataObject
) -> None:
    model = set_external(linear_model(), 0, location="w.data", offset="0", length="48")
    (tmp_path / "w.data").write_bytes(b"\0" * 48)
    content = model.SerializeToString()
    position = data.draw(st.integers(0, len(content) - 1))
    path = tmp_path / "model.onnx"
    path.write_bytes(content[:position] + bytes([data.draw(st.integers(0, 255))]) + content[position + 1 :])

    _parses_or_refuses(path, tmp_path)


@_FUZZ
@given(content=st.binary(max_size=512))
def test_any_bytes_parse_or_raise_only_our_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)

    _parses_or_refuses(path, tmp_path)


@_FUZZ
@given(
    dims=st.lists(st.lists(st.integers(0, 6), max_size=4), min_size=1, max_size=5),
    nodes=st.integers(0, 5),
)
def test_facts_agree_with_the_onnx_package(tmp_path: Path, dims: list[list[int]], nodes: int) -> None:
    initializers = [
        numpy_helper.from_array(np.zeros(shape, dtype=np.float32), name=f"w{i}") for i, shape in enumerate(dims)
    ]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], [f"y{i}"]) for i in range(nodes)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1]) for i in range(nodes)],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = save(model, tmp_path / "model.onnx")

    info = read_onnx(path, tmp_path)

    loaded = onnx.load(str(path))
    assert info.node_count == len(loaded.graph.node)
    assert info.parameter_count == sum(int(np.prod(t.dims)) for t in loaded.graph.initializer)
    assert info.ir_version == loaded.ir_version


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs FIFOs")
    os.mkfifo(tmp_path / "model.onnx")

    with pytest.raises(InvalidONNXError, match="is not a regular file"):
        read_onnx(tmp_path / "model.onnx", tmp_path)
