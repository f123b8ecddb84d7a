"""Facts and runtime hints of Hugging Face model directories, from configs shaped like real ones."""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slmops.core.manifest import ModelFacts, canonical_json
from slmops.errors import InvalidModelError, InvalidSafetensorsError
from slmops.registry.formats.hf import check_index, hf_facts, hf_runtime_hints, read_json_file
from slmops.registry.formats.safetensors import SafetensorsInfo, SafetensorsTensor, read_safetensors

LLAMA_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "vocab_size": 128256,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": True,
}

GEMMA3_CONFIG: dict[str, Any] = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text",
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 34,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 131072,
        "sliding_window": 1024,
        "vocab_size": 262208,
    },
    "vision_config": {"hidden_size": 1152, "num_hidden_layers": 27, "model_type": "siglip_vision_model"},
    "torch_dtype": "bfloat16",
}


def shard(*tensors: tuple[str, str, tuple[int, ...]]) -> SafetensorsInfo:
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "U8": 1}
    built = []
    offset = 0
    for name, dtype, shape in tensors:
        n = 1
        for dim in shape:
            n *= dim
        built.append(SafetensorsTensor(name, dtype, shape, offset, offset + n * sizes[dtype]))
        offset += n * sizes[dtype]
    return SafetensorsInfo(file_size=8 + 2 + offset, header_size=2, metadata={}, tensors=tuple(built))


# -- read_json_file ------------------------------------------------------------------------------------------------


def test_read_json_file_returns_the_object(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_CONFIG), encoding="utf-8")

    assert read_json_file(path) == LLAMA_CONFIG


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"a": 1', "'config.json' is not valid JSON"),
        (b"[1, 2]", "'config.json' must hold a JSON object, found a JSON list"),
        (b'"text"', "found a JSON str"),
        (b'{"a": 1, "a": 2}', "'config.json' has the key 'a' twice in one object"),
        (b'{"a": {"b": 1, "b": 1}}', "has the key 'b' twice"),
        (b'{"a": "\xff"}', "'config.json' is not UTF-8 text (invalid byte at offset 7)"),
        (b"\xef\xbb\xbf{}", "is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a": ' + b"9" * 5000 + b"}", "holds an integer with thousands of digits"),
        (b"", "is not valid JSON"),
    ],
)
def test_read_json_file_refuses_bad_json(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(content)

    with pytest.raises(InvalidModelError, match=re.escape(fragment)):
        read_json_file(path)


def test_read_json_file_refuses_a_file_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"pad": "x" * 200}))

    with pytest.raises(InvalidModelError, match=re.escape("'tokenizer_config.json' is larger than 100 bytes")):
        read_json_file(path, max_bytes=100)


def test_read_json_file_refuses_what_is_not_a_readable_regular_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="cannot open"):
        read_json_file(tmp_path / "absent.json")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(InvalidModelError, match="is not a regular file"):
        read_json_file(tmp_path / "dir.json")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.json")
        with pytest.raises(InvalidModelError, match="is not a regular file"):
            read_json_file(tmp_path / "fifo.json")


_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)


@_FUZZ
@given(content=st.binary(max_size=256))
def test_read_json_file_on_any_bytes_returns_a_dict_or_raises_only_our_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(content)

    with contextlib.suppress(InvalidModelError):
        assert isinstance(read_json_file(path), dict)


@_FUZZ
@given(data=st.data())
def test_read_json_file_on_any_byte_flip_returns_a_dict_or_raises_only_our_error(
    tmp_path: Path, data: st.DataObject
) -> None:
    content = json.dumps(GEMMA3_CONFIG).encode()
    position = data.draw(st.integers(0, len(content) - 1))
    path = tmp_path / "config.json"
    path.write_bytes(content[:position] + bytes([data.draw(st.integers(0, 255))]) + content[position + 1 :])

    with contextlib.suppress(InvalidModelError):
        assert isinstance(read_json_file(path), dict)


# -- hf_facts ------------------------------------------------------------------------------------------------------


def test_facts_of_a_llama_config_and_its_shards() -> None:
    shards = [
        shard(("model.embed_tokens.weight", "BF16", (128256, 2048)), ("model.norm.weight", "F32", (2048,))),
        shard(("model.layers.0.mlp.up_proj.weight", "BF16", (8192, 2048))),
    ]

    facts = hf_facts(LLAMA_CONFIG, shards)

    assert facts == ModelFacts(
        architecture="llama",
        parameter_count=128256 * 2048 + 2048 + 8192 * 2048,
        quantization="BF16",
        vocab_size=128256,
        context_length=131072,
        details={
            "architecture_class": "LlamaForCausalLM",
            "block_count": 16,
            "embedding_length": 2048,
            "head_count": 32,
            "head_count_kv": 8,
            "key_length": 64,
            "value_length": 64,
            "feed_forward_length": 8192,
            "torch_dtype": "bfloat16",
            "tensor_types": {"BF16": 2, "F32": 1},
            "tensor_count": 3,
        },
    )
    canonical_json(facts.model_dump(mode="json"))  # facts go into a signed manifest as canonical JSON


def test_facts_of_real_safetensors_shards(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"format": "pt"},
        "lm_head.weight": {"dtype": "F16", "shape": [10, 4], "data_offsets": [0, 80]},
        "norm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [80, 96]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 96)

    facts = hf_facts({"model_type": "tiny", "hidden_size": 4, "num_attention_heads": 2}, [read_safetensors(path)])

    assert facts.parameter_count == 44
    assert facts.quantization == "F16"
    assert facts.details["head_count_kv"] == 2  # no num_key_value_heads: multi-head attention
    assert facts.details["key_length"] == 2  # no head_dim: hidden_size / heads


def test_multimodal_config_reads_the_text_config() -> None:
    facts = hf_facts(GEMMA3_CONFIG, [])

    assert facts.architecture == "gemma3"
    assert facts.vocab_size == 262208
    assert facts.context_length == 131072
    assert facts.parameter_count is None and facts.quantization is None
    assert facts.details["block_count"] == 34  # the language model's layers, not the vision tower's 27
    assert facts.details["embedding_length"] == 2560
    assert facts.details["key_length"] == facts.details["value_length"] == 256
    assert facts.details["sliding_window"] == 1024
    assert facts.details["architecture_class"] == "Gemma3ForConditionalGeneration"


def test_gpt2_style_keys_are_understood() -> None:
    config = {
        "model_type": "gpt2",
        "n_layer": 12,
        "n_embd": 768,
        "n_head": 12,
        "n_positions": 1024,
        "vocab_size": 50257,
    }

    facts = hf_facts(config, [])

    assert facts.context_length == 1024
    assert facts.details["block_count"] == 12 and facts.details["head_count"] == 12
    assert facts.details["key_length"] == 64


def test_multi_query_attention_has_one_kv_head() -> None:
    config = {"model_type": "falcon", "hidden_size": 4544, "num_attention_heads": 71, "multi_query": True}

    facts = hf_facts(config, [])

    assert facts.details["head_count"] == 71 and facts.details["head_count_kv"] == 1
    assert facts.details["key_length"] == 64


def test_unused_sliding_window_is_not_reported() -> None:
    facts = hf_facts({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}, [])

    assert "sliding_window" not in facts.details


@pytest.mark.parametrize(
    ("quantization_config", "expected"),
    [
        ({"quant_method": "awq", "bits": 4}, "awq"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
        ({"load_in_4bit": True}, "bitsandbytes"),
        ({}, "I32"),  # no method recorded: fall back to the dominant stored dtype
    ],
)
def test_quantization_config_names_the_method(quantization_config: dict[str, Any], expected: str) -> None:
    shards = [shard(("qweight", "I32", (512, 64)), ("scales", "F16", (16, 64)))]

    facts = hf_facts({"model_type": "llama", "quantization_config": quantization_config}, shards)

    assert facts.quantization == expected


def test_dominant_dtype_is_by_elements_not_by_tensor_count() -> None:
    shards = [shard(("big", "F16", (1000,)), ("n1", "F32", (2,)), ("n2", "F32", (2,)), ("n3", "F32", (2,)))]

    facts = hf_facts({"model_type": "x"}, shards)

    assert facts.quantization == "F16"
    assert facts.details["tensor_types"] == {"F16": 1, "F32": 3}


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"hidden_size": "2048"}, "config.json: expected 'hidden_size' to be a non-negative integer, found '2048'"),
        ({"num_hidden_layers": -1}, "expected 'num_hidden_layers' to be a non-negative integer, found '-1'"),
        ({"vocab_size": True}, "expected 'vocab_size' to be a non-negative integer, found 'True'"),
        ({"text_config": {"max_position_embeddings": 1.5}}, "'max_position_embeddings'"),
        ({"quantization_config": "gptq"}, "expected 'quantization_config' to be an object, found str"),
    ],
)
def test_config_values_of_the_wrong_type_are_refused(config: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidModelError, match=re.escape(fragment)):
        hf_facts(config, [])


@_FUZZ
@given(
    config=st.dictionaries(
        st.sampled_from(
            [
                "model_type",
                "hidden_size",
                "text_config",
                "quantization_config",
                "num_attention_heads",
                "head_dim",
                "sliding_window",
                "architectures",
                "torch_dtype",
                "vocab_size",
                "zzz",
            ]
        ),
        _JSON,
        max_size=8,
    )
)
def test_facts_of_any_config_are_canonical_json_or_our_error(config: dict[str, Any]) -> None:
    with contextlib.suppress(InvalidModelError):
        facts = hf_facts(config, [])
        canonical_json(facts.model_dump(mode="json"))


# -- hf_runtime_hints ----------------------------------------------------------------------------------------------

LLAMA3_TOKENIZER_CONFIG: dict[str, Any] = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|eot_id|>",
    "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}",
    "added_tokens_decoder": {
        "128000": {"content": "<|begin_of_text|>", "special": True},
        "128001": {"content": "<|end_of_text|>", "special": True},
        "128008": {"content": "<|eom_id|>", "special": True},
        "128009": {"content": "<|eot_id|>", "special": True},
    },
}


def test_runtime_hints_of_a_llama3_tokenizer() -> None:
    hints = hf_runtime_hints(LLAMA3_TOKENIZER_CONFIG, None, {"eos_token_id": [128001, 128008, 128009]})

    assert hints.chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert hints.bos_token == "<|begin_of_text|>"
    assert hints.eos_token == "<|eot_id|>"
    assert hints.stop_tokens == ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]


def test_chat_template_file_wins_over_the_tokenizer_config() -> None:
    hints = hf_runtime_hints(LLAMA3_TOKENIZER_CONFIG, "{{ 'from the file' }}", None)

    assert hints.chat_template == "{{ 'from the file' }}"


def test_added_token_objects_and_named_templates() -> None:
    config = {
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False},
        "eos_token": {"__type": "AddedToken", "content": "</s>"},
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
    }

    hints = hf_runtime_hints(config, None, {"eos_token_id": 2})

    assert (hints.bos_token, hints.eos_token, hints.chat_template) == ("<s>", "</s>", "D")
    assert hints.stop_tokens == ["</s>"]  # id 2 is not in added_tokens_decoder: nothing more to name


def test_named_templates_without_a_default_give_no_template() -> None:
    hints = hf_runtime_hints({"chat_template": [{"name": "rag", "template": "R"}]}, None, None)

    assert hints.chat_template is None


def test_no_configs_give_empty_hints() -> None:
    hints = hf_runtime_hints(None, None, None)

    assert (hints.chat_template, hints.bos_token, hints.eos_token, hints.stop_tokens) == (None, None, None, [])


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"eos_token": 2}, "tokenizer_config.json: expected 'eos_token' to be a string or an object with a 'content'"),
        ({"bos_token": {"text": "<s>"}}, "expected 'bos_token' to be a string or an object"),
        ({"chat_template": {"default": "x"}}, "expected 'chat_template' to be a string or a list of"),
        ({"chat_template": [{"name": "default"}]}, "expected 'chat_template' to be a string or a list of"),
    ],
)
def test_malformed_tokenizer_config_is_refused(config: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidModelError, match=re.escape(fragment)):
        hf_runtime_hints(config, None, None)


@_FUZZ
@given(
    tokenizer_config=st.none()
    | st.dictionaries(
        st.sampled_from(["bos_token", "eos_token", "chat_template", "added_tokens_decoder", "x"]), _JSON, max_size=5
    ),
    template=st.none() | st.text(max_size=20),
    generation_config=st.none() | st.dictionaries(st.sampled_from(["eos_token_id", "x"]), _JSON, max_size=2),
)
def test_runtime_hints_of_any_config_are_valid_or_our_error(
    tokenizer_config: dict[str, Any] | None, template: str | None, generation_config: dict[str, Any] | None
) -> None:
    with contextlib.suppress(InvalidModelError):
        hints = hf_runtime_hints(tokenizer_config, template, generation_config)
        canonical_json(hints.model_dump(mode="json"))


# -- check_index ---------------------------------------------------------------------------------------------------

SHARDS = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_index_naming_present_shards_passes() -> None:
    index = {
        "metadata": {"total_size": 4_000_000_000},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        },
    }

    check_index(index, SHARDS)  # returns without raising


@pytest.mark.parametrize(
    ("index", "fragment"),
    [
        ({}, "expected 'weight_map' to be an object of tensor name -> shard file, found NoneType"),
        ({"weight_map": []}, "found list"),
        ({"weight_map": {}}, "found an empty object"),
        ({"weight_map": {"w": "model-00003-of-00002.safetensors"}}, "names 1 shard file(s) that are not in the model"),
        ({"weight_map": {"w": "../other/model.safetensors"}}, "tensor 'w' is mapped to '../other/model.safetensors'"),
        ({"weight_map": {"w": "/etc/model.safetensors"}}, "is mapped to '/etc/model.safetensors'; expected a relative"),
        ({"weight_map": {"w": "a\\b.safetensors"}}, "is mapped to"),
        ({"weight_map": {"w": "pytorch_model.bin"}}, "is mapped to 'pytorch_model.bin'"),
        ({"weight_map": {"w": 1}}, "is mapped to '1'"),
        ({"weight_map": {"w": "model-00001-of-00002.safetensors"}, "metadata": []}, "expected 'metadata' to be an"),
        (
            {"weight_map": {"w": "model-00001-of-00002.safetensors"}, "metadata": {"total_size": "big"}},
            "expected metadata.total_size to be a non-negative integer of bytes",
        ),
    ],
)
def test_bad_index_is_refused(index: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidSafetensorsError) as caught:
        check_index(index, SHARDS)

    assert "model.safetensors.index.json" in str(caught.value)
    assert fragment in str(caught.value), str(caught.value)


@_FUZZ
@given(index=st.dictionaries(st.sampled_from(["weight_map", "metadata", "x"]), _JSON, max_size=3))
def test_any_index_passes_or_raises_only_our_error(index: dict[str, Any]) -> None:
    with contextlib.suppress(InvalidSafetensorsError):
        check_index(index, SHARDS)
