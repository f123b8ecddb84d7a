"""Facts and runtime hints of a Hugging Face model directory, from its already-read pieces.

The caller walks the directory and reads the files (``config.json``, ``tokenizer_config.json``,
``generation_config.json``, ``chat_template.jinja``, the safetensors headers); the functions here only decide what
those pieces say. :func:`read_json_file` is the one bounded JSON reader they share.

Config values are looked up in the language model's sub-config first (``text_config`` in multimodal configs such as
Gemma 3 or LLaVA), then at the top level, under the names transformers uses for them (``num_hidden_layers``, GPT-2's
``n_layer``, ...). A value that is present but of the wrong type is an error, not a silent gap.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from slmops.core.manifest import ModelFacts, RuntimeHints
from slmops.errors import InvalidModelError, InvalidSafetensorsError
from slmops.registry.formats._io import open_regular
from slmops.registry.formats.safetensors import SafetensorsInfo

__all__ = ["check_index", "hf_facts", "hf_runtime_hints", "read_json_file"]

_DEFAULT_MAX_JSON_BYTES = 16 * 1024 * 1024
_SUB_CONFIGS = ("text_config", "llm_config", "language_config")
_CONFIG_FIX = "fix config.json or re-save it with `model.config.save_pretrained(dir)`"
_TOKENIZER_FIX = "fix tokenizer_config.json or re-save it with `tokenizer.save_pretrained(dir)`"

# ModelFacts.details key -> config keys that hold it, in order of preference.
_DETAIL_KEYS: dict[str, tuple[str, ...]] = {
    "block_count": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "embedding_length": ("hidden_size", "n_embd", "d_model"),
    "head_count": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "head_count_kv": ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"),
    "head_dim": ("head_dim",),
    "feed_forward_length": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
}
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def read_json_file(path: Path, max_bytes: int = _DEFAULT_MAX_JSON_BYTES) -> dict[str, Any]:
    """Read a JSON object from ``path``: at most ``max_bytes``, strict UTF-8, no duplicate keys."""
    name = path.name
    try:
        opened = open_regular(path)
    except OSError as exc:
        raise InvalidModelError(
            f"cannot open '{path}': {exc.strerror or exc}; check the path and its permissions"
        ) from None
    if opened is None:
        raise InvalidModelError(f"'{name}' is not a regular file; replace it with the JSON file itself")
    handle, _size = opened
    try:
        with handle:
            raw = handle.read(max_bytes + 1)
    except OSError as exc:
        raise InvalidModelError(f"cannot read '{path}': {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise InvalidModelError(
            f"'{name}' is larger than {max_bytes} bytes, the limit for a JSON file; expected a small JSON object"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidModelError(
            f"'{name}' is not UTF-8 text (invalid byte at offset {exc.start}); save it as UTF-8 JSON"
        ) from None
    try:
        value = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKeyError as exc:
        raise InvalidModelError(
            f"'{name}' has the key {exc.key[:100]!r} twice in one object; expected every key once (tools disagree on "
            "which one wins); remove the duplicate"
        ) from None
    except RecursionError:
        raise InvalidModelError(f"'{name}' is nested too deeply to be a configuration file") from None
    except json.JSONDecodeError as exc:
        raise InvalidModelError(
            f"'{name}' is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            "fix or regenerate the file"
        ) from None
    except ValueError:  # an integer longer than Python's 4300-digit limit for int()
        raise InvalidModelError(
            f"'{name}' holds an integer with thousands of digits; fix or regenerate the file"
        ) from None
    if not isinstance(value, dict):
        raise InvalidModelError(
            f"'{name}' must hold a JSON object, found a JSON {type(value).__name__}; fix or regenerate the file"
        )
    return value


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


# -- facts ---------------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sections(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    subs = [config[key] for key in _SUB_CONFIGS if isinstance(config.get(key), dict)]
    return [*subs, config]


def _config_int(sections: Iterable[Mapping[str, Any]], keys: Iterable[str]) -> int | None:
    for section in sections:
        for key in keys:
            value = section.get(key)
            if value is None:
                continue
            if not _is_int(value) or value < 0:
                raise InvalidModelError(
                    f"config.json: expected '{key}' to be a non-negative integer, found {str(value)[:60]!r}; "
                    f"{_CONFIG_FIX}"
                )
            return int(value)
    return None


def hf_facts(config: dict[str, Any], shards: list[SafetensorsInfo]) -> ModelFacts:
    """What ``config.json`` and the safetensors headers say about the model.

    ``parameter_count`` is the number of stored elements, so weights packed by GPTQ or AWQ (several 4-bit values
    in one I32 element) count as stored, not as unpacked.
    """
    sections = _sections(config)
    details: dict[str, Any] = {}
    model_type = config.get("model_type")
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        details["architecture_class"] = architectures[0]
    for detail, keys in _DETAIL_KEYS.items():
        value = _config_int(sections, keys)
        if value is not None:
            details[detail] = value
    # transformers' defaults: no num_key_value_heads means multi-head attention, or multi-query attention (one KV
    # head) where the config says multi_query (Falcon, GPT-BigCode); no head_dim means hidden / heads.
    if "head_count_kv" not in details and "head_count" in details:
        multi_query = any(section.get("multi_query") is True for section in sections)
        details["head_count_kv"] = 1 if multi_query else details["head_count"]
    head_dim = details.pop("head_dim", None)
    heads, width = details.get("head_count"), details.get("embedding_length")
    if head_dim is None and heads and width is not None and width % heads == 0:
        head_dim = width // heads
    if head_dim is not None:
        details["key_length"] = head_dim
        details["value_length"] = head_dim
    for section in sections:
        window = section.get("sliding_window")
        if (
            isinstance(window, int)
            and not isinstance(window, bool)
            and window > 0
            and section.get("use_sliding_window") is not False
        ):
            details["sliding_window"] = window
            break
    torch_dtype = next(
        (s.get(k) for s in sections for k in ("torch_dtype", "dtype") if isinstance(s.get(k), str)), None
    )
    if torch_dtype is not None:
        details["torch_dtype"] = torch_dtype

    tensor_types: dict[str, int] = {}
    elements_by_type: dict[str, int] = {}
    for shard in shards:
        for tensor in shard.tensors:
            tensor_types[tensor.dtype] = tensor_types.get(tensor.dtype, 0) + 1
            elements_by_type[tensor.dtype] = elements_by_type.get(tensor.dtype, 0) + tensor.n_elements
    if shards:
        details["tensor_types"] = dict(sorted(tensor_types.items()))
        details["tensor_count"] = sum(tensor_types.values())

    quantization = _quant_method(config, details)
    if quantization is None and elements_by_type:
        quantization = min(elements_by_type, key=lambda dtype: (-elements_by_type[dtype], dtype))
    return ModelFacts(
        architecture=model_type if isinstance(model_type, str) and model_type else None,
        parameter_count=sum(elements_by_type.values()) if shards else None,
        quantization=quantization,
        vocab_size=_config_int(sections, ("vocab_size", "padded_vocab_size")),
        context_length=_config_int(sections, _CONTEXT_KEYS),
        details=details,
    )


def _quant_method(config: Mapping[str, Any], details: dict[str, Any]) -> str | None:
    quant = config.get("quantization_config")
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise InvalidModelError(
            f"config.json: expected 'quantization_config' to be an object, found {type(quant).__name__}; {_CONFIG_FIX}"
        )
    bits = quant.get("bits")
    if _is_int(bits):
        details["quantization_bits"] = bits
    method = quant.get("quant_method")
    if isinstance(method, str) and method:
        return method
    if quant.get("load_in_4bit") is True or quant.get("load_in_8bit") is True:
        return "bitsandbytes"  # configs written before transformers recorded quant_method
    return None


# -- runtime hints -------------------------------------------------------------------------------------------------


def _token_text(value: object, key: str) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken object with 'content'."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise InvalidModelError(
        f"tokenizer_config.json: expected '{key}' to be a string or an object with a 'content' string, found "
        f"{str(value)[:60]!r}; {_TOKENIZER_FIX}"
    )


def _chat_template(tokenizer_config: Mapping[str, Any], template_file_text: str | None) -> str | None:
    if template_file_text is not None and template_file_text.strip():
        return template_file_text  # transformers prefers chat_template.jinja over the copy in tokenizer_config.json
    value = tokenizer_config.get("chat_template")
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list) and all(
        isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str)
        for item in value
    ):
        for item in value:
            if item["name"] == "default":
                return str(item["template"])
        return None  # only named templates (tool_use, rag): none applies by default
    raise InvalidModelError(
        'tokenizer_config.json: expected \'chat_template\' to be a string or a list of {"name", "template"} '
        f"objects, found {str(value)[:60]!r}; {_TOKENIZER_FIX}"
    )


def _eos_ids(generation_config: Mapping[str, Any] | None) -> list[int]:
    if not generation_config:
        return []
    value = generation_config.get("eos_token_id")
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [int(item) for item in value if _is_int(item)]
    return []


def hf_runtime_hints(
    tokenizer_config: dict[str, Any] | None,
    chat_template_file_text: str | None,
    generation_config: dict[str, Any] | None,
) -> RuntimeHints:
    """Chat template, BOS/EOS tokens and stop tokens from the tokenizer and generation configs.

    Stop tokens are the EOS token, then the tokens of ``generation_config.eos_token_id`` that
    ``tokenizer_config.added_tokens_decoder`` names (Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``).
    """
    tokenizer_config = tokenizer_config or {}
    bos = _token_text(tokenizer_config.get("bos_token"), "bos_token")
    eos = _token_text(tokenizer_config.get("eos_token"), "eos_token")
    stop: list[str] = [eos] if eos else []
    decoder = tokenizer_config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for token_id in _eos_ids(generation_config):
            entry = decoder.get(str(token_id))
            content = entry.get("content") if isinstance(entry, dict) else None
            if isinstance(content, str) and content and content not in stop:
                stop.append(content)
    return RuntimeHints(
        chat_template=_chat_template(tokenizer_config, chat_template_file_text),
        stop_tokens=stop,
        bos_token=bos,
        eos_token=eos,
    )


# -- sharded checkpoints -------------------------------------------------------------------------------------------


def _safe_shard_name(name: str) -> bool:
    if not name or name.startswith("/") or "\\" in name or "\x00" in name or ":" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/")) and PurePosixPath(name).suffix == ".safetensors"


def check_index(index: dict[str, Any], present_files: set[str]) -> None:
    """Check ``model.safetensors.index.json``: every shard it names is a safe, present ``.safetensors`` file."""
    fix = "regenerate the checkpoint with `model.save_pretrained(dir, safe_serialization=True)`"
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        found = "an empty object" if isinstance(weight_map, dict) else type(weight_map).__name__
        raise InvalidSafetensorsError(
            f"model.safetensors.index.json: expected 'weight_map' to be an object of tensor name -> shard file, "
            f"found {found}; {fix}"
        )
    missing: set[str] = set()
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not _safe_shard_name(shard):
            raise InvalidSafetensorsError(
                f"model.safetensors.index.json: tensor {tensor[:100]!r} is mapped to {str(shard)[:100]!r}; expected "
                f"a relative path to a .safetensors file inside the model directory; {fix}"
            )
        if shard not in present_files:
            missing.add(shard)
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        present = ", ".join(sorted(present_files)[:5]) or "none"
        raise InvalidSafetensorsError(
            f"model.safetensors.index.json names {len(missing)} shard file(s) that are not in the model directory: "
            f"{shown} (present: {present}); copy the missing shards or {fix}"
        )
    metadata = index.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidSafetensorsError(
            f"model.safetensors.index.json: expected 'metadata' to be an object, found {type(metadata).__name__}; {fix}"
        )
    total_size = (metadata or {}).get("total_size")
    if total_size is not None and (
        not isinstance(total_size, int | float) or isinstance(total_size, bool) or total_size < 0
    ):
        raise InvalidSafetensorsError(
            f"model.safetensors.index.json: expected metadata.total_size to be a non-negative integer of bytes, found "
            f"{str(total_size)[:40]!r}; {fix}"
        )
