"""Our own Hugging Face → GGUF exporter for gemma3, llama and qwen2 causal LMs, with the ``gguf`` package's writer.

llama.cpp's converter ships only in its source tree, so this module does the same job for the architectures we
support, following its conventions (checked against ``convert_hf_to_gguf.py`` and the ``gguf`` package's constants):

- tensor names come from ``gguf.get_tensor_name_map(arch, n_blocks)``; a tied output head is not written (llama.cpp
  falls back to ``token_embd``);
- gemma3: RMSNorm weights are stored as ``1 + w`` (transformers keeps ``w`` and computes ``x * (1 + w)``); the
  attention scale must be ``1/sqrt(head_dim)`` and global layers every sixth, as llama.cpp hard-codes both;
- llama: the Q and K rows are permuted back from transformers' rotate-half layout to the interleaved rotary layout
  llama.cpp uses (qwen2 and gemma3 use NeoX rotary in llama.cpp, so no permutation there);
- F16 files keep 1-D tensors (norms, biases) in F32, as llama.cpp expects.

The tokenizer is copied key for key from a source GGUF's ``tokenizer.*`` metadata when the model came from one (see
:mod:`slmops.optimize.gguf_metadata`), or built from ``tokenizer.json`` (SentencePiece-style BPE with byte fallback →
``llama`` vocabulary with merge-rank scores; byte-level BPE → ``gpt2`` vocabulary with merges).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from slmops.errors import InvalidModelError
from slmops.optimize._files import replace_durably
from slmops.optimize.gguf_metadata import GGUF_METADATA_FILE, copy_gguf_metadata, import_gguf
from slmops.optimize.hf_load import load_hf_model

__all__ = ["SUPPORTED_MODEL_TYPES", "ExportReport", "export_gguf", "export_gguf_dir"]

ExportFileType = Literal["F16", "F32"]
Progress = Callable[[float, float], None]
SUPPORTED_MODEL_TYPES = {"gemma3_text": "gemma3", "gemma3": "gemma3", "llama": "llama", "qwen2": "qwen2"}
_BPE_PRE = {"gemma3": "default", "llama": "llama-bpe", "qwen2": "qwen2"}
_GEMMA3_SWA_PERIOD = 6  # llama.cpp: every sixth gemma3 layer uses global attention
_SPACE = "\u2581"
# token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _no_progress(done: float, total: float) -> None:
    return None


@dataclass(frozen=True)
class ExportReport:
    output_path: Path
    arch: str
    file_type: ExportFileType
    n_tensors: int
    n_params: int
    tokenizer_source: str  # "gguf:<file>" or "hf:tokenizer.json"
    n_vocab: int

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "file_type": self.file_type,
            "tensors": self.n_tensors,
            "params": self.n_params,
            "tokenizer_source": self.tokenizer_source,
            "vocab_size": self.n_vocab,
        }


# ---------------------------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class _Vocab:
    kind: Literal["llama", "gpt2"]
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str]
    special: dict[str, int]  # bos / eos / unk / pad -> id
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None


def _token_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise InvalidModelError(f"{path.name}: expected a JSON object, found {type(data).__name__}")
    return data


def _component_types(component: object) -> list[Mapping[str, Any]]:
    """A normalizer / pre-tokenizer and, for a Sequence, its parts."""
    if not isinstance(component, dict):
        return []
    parts: list[Mapping[str, Any]] = [component]
    for key in ("normalizers", "pretokenizers"):
        for inner in component.get(key) or []:
            parts.extend(_component_types(inner))
    return parts


def _hf_vocab(directory: Path, n_vocab: int) -> _Vocab:
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise InvalidModelError(
            f"exporting to GGUF needs a tokenizer: found neither {directory / 'tokenizer.json'} nor GGUF metadata; "
            "save the tokenizer with `tokenizer.save_pretrained(dir)` or start from a GGUF"
        )
    data = _json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise InvalidModelError(
            f"{path}: expected a BPE tokenizer, found model type {model.get('type')!r}; the exporter converts BPE "
            "tokenizers (SentencePiece-style with byte fallback, or byte-level)"
        )
    byte_level = any(p.get("type") == "ByteLevel" for p in _component_types(data.get("pre_tokenizer")))
    if not byte_level and not model.get("byte_fallback"):
        raise InvalidModelError(f"{path}: a BPE tokenizer that is neither byte-level nor byte-fallback is unsupported")
    kind: Literal["llama", "gpt2"] = "gpt2" if byte_level else "llama"
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(t["id"]): t for t in data.get("added_tokens") or []}
    size = max([*vocab.values(), *added, -1]) + 1
    if size > n_vocab:
        raise InvalidModelError(
            f"{path} has {size} tokens but the model's embedding has only {n_vocab} rows; the tokenizer does not "
            "belong to this model"
        )
    merges: list[str] = []
    for merge in model.get("merges") or []:
        merges.append(merge if isinstance(merge, str) else " ".join(merge))
    rank = {m.replace(" ", "", 1): i for i, m in enumerate(merges)}  # merge "a b" makes token "ab"
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [_UNUSED] * n_vocab
    scores = [0.0] * n_vocab
    unk = model.get("unk_token")
    for text, index in vocab.items():
        tokens[index] = text
        if text == unk:
            types[index] = _UNKNOWN
        elif kind == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[index] = _BYTE
        else:
            types[index] = _NORMAL
        if kind == "llama":
            scores[index] = -float(rank[text]) - 1.0 if text in rank else 0.0
    for index, token in added.items():
        tokens[index] = str(token["content"])
        types[index] = _CONTROL if token.get("special") else _USER_DEFINED
        if token["content"] == unk:
            types[index] = _UNKNOWN
    config_path = directory / "tokenizer_config.json"
    config = _json(config_path) if config_path.is_file() else {}
    ids = {text: i for i, text in enumerate(tokens)}
    special: dict[str, int] = {}
    for role in ("bos", "eos", "unk", "pad"):
        content = _token_text(config.get(f"{role}_token"))
        if content is not None and content in ids:
            special[role] = ids[content]
    template_file = directory / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    if template is None and isinstance(config.get("chat_template"), str):
        template = str(config["chat_template"])
    prepend = any(p.get("type") == "Prepend" for p in _component_types(data.get("normalizer")))
    return _Vocab(
        kind=kind,
        tokens=tokens,
        scores=scores,
        types=types,
        merges=merges if kind == "gpt2" else [],
        special=special,
        add_bos=bool(config.get("add_bos_token", kind == "llama")) and "bos" in special,
        add_eos=bool(config.get("add_eos_token", False)),
        add_space_prefix=prepend,
        chat_template=template,
    )


def _write_hf_vocab(writer: Any, vocab: _Vocab, arch: str) -> None:
    writer.add_tokenizer_model(vocab.kind)
    writer.add_tokenizer_pre(_BPE_PRE[arch] if vocab.kind == "gpt2" else "default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.kind == "llama":
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
    else:
        writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for role, token_id in vocab.special.items():
        adders[role](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


# ---------------------------------------------------------------------------------------------- hyperparameters


def _rope(config: Any, arch: str) -> tuple[float, float | None, Mapping[str, Any]]:
    """(global rope theta, local rope theta or None, the global rope parameters)."""
    params = getattr(config, "rope_parameters", None) or {}
    local: float | None = None
    if "full_attention" in params:
        local_params = params.get("sliding_attention") or {}
        local = float(local_params["rope_theta"]) if "rope_theta" in local_params else None
        params = params["full_attention"]
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if arch == "gemma3" and local is None:
        local = float(getattr(config, "rope_local_base_freq", 10000.0))
    return float(theta), local, params


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _write_hparams(writer: Any, config: Any, arch: str) -> None:
    gguf = import_gguf("exporting to GGUF")
    head_dim = _head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    theta, local, rope = _rope(config, arch)
    writer.add_rope_freq_base(theta)
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type != "default":
        raise InvalidModelError(
            f"rope_type {rope_type!r} is not supported by the exporter (only 'default' and 'linear'); "
            "use llama.cpp's own converter for this model"
        )
    if arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        scalar = getattr(config, "query_pre_attn_scalar", head_dim)
        if int(scalar) != head_dim:
            raise InvalidModelError(
                f"gemma3 with query_pre_attn_scalar={scalar} != head_dim={head_dim} cannot be expressed in GGUF: "
                "llama.cpp scales attention by 1/sqrt(head_dim)"
            )
        layer_types = list(getattr(config, "layer_types", None) or [])
        expected = [
            "full_attention" if (i + 1) % _GEMMA3_SWA_PERIOD == 0 else "sliding_attention"
            for i in range(int(config.num_hidden_layers))
        ]
        if layer_types and layer_types != expected:
            raise InvalidModelError(
                f"gemma3 layer_types {layer_types} differ from llama.cpp's fixed pattern (every "
                f"{_GEMMA3_SWA_PERIOD}th layer global); such a model cannot be exported"
            )
        writer.add_sliding_window(int(config.sliding_window))
        if local is not None:
            writer.add_rope_freq_base_swa(local)
        softcap = getattr(config, "final_logit_softcapping", None)
        if softcap:
            writer.add_final_logit_softcapping(float(softcap))
    else:
        writer.add_rope_dimension_count(head_dim)
        if head_dim * int(config.num_attention_heads) != int(config.hidden_size):
            if arch == "qwen2":
                raise InvalidModelError(
                    f"llama.cpp's qwen2 needs heads × head_dim == hidden_size, found {config.num_attention_heads} × "
                    f"{head_dim} != {config.hidden_size} (attention heads were removed?); prune qwen2 heads with "
                    "mode 'mask', or prune MLP channels instead"
                )
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)


# ---------------------------------------------------------------------------------------------- tensors


def _permute_rotary(weight: Any, n_head: int) -> Any:
    """transformers' rotate-half rows → llama.cpp's interleaved rotary rows, per head (as convert_hf_to_gguf)."""
    rows = weight.shape[0]
    # (rows, in) -> (n_head, 2, head_dim/2, in) -> (n_head, head_dim/2, 2, in) -> (rows, in)
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_tensors(model: Any, arch: str, file_type: ExportFileType) -> Iterable[tuple[str, Any, Any]]:
    """(gguf name, numpy array, ggml type) for every tensor to write."""
    import numpy as np
    import torch

    gguf = import_gguf("exporting to GGUF")
    config = model.config
    n_blocks = int(config.num_hidden_layers)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_blocks)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_head, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads)
    for hf_name, value in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InvalidModelError(
                f"no GGUF name for tensor {hf_name!r} of a {arch} model; the exporter cannot map it"
            )
        data = value.detach().to(torch.float32)
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            data = data + 1.0  # Gemma3RMSNorm computes x * (1 + w); llama.cpp multiplies by the stored weight
        if arch == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute_rotary(data, n_head)
        elif arch == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute_rotary(data, n_kv)
        array = data.contiguous().numpy()
        if file_type == "F16" and array.ndim >= 2:
            yield gguf_name, array.astype(np.float16), gguf.GGMLQuantizationType.F16
        else:
            yield gguf_name, array.astype(np.float32), gguf.GGMLQuantizationType.F32


# ---------------------------------------------------------------------------------------------- export


def export_gguf(
    model: Any,
    output_path: Path,
    *,
    tokenizer_dir: Path | None = None,
    tokenizer_gguf: Path | None = None,
    file_type: ExportFileType = "F16",
    name: str | None = None,
    progress: Progress = _no_progress,
) -> ExportReport:
    """Write the transformers causal LM ``model`` as a GGUF file at ``output_path`` (atomically).

    The tokenizer comes from ``tokenizer_gguf`` (every ``tokenizer.*`` key and the descriptive ``general.*`` keys are
    copied) or, without it, from the Hugging Face files in ``tokenizer_dir``.
    """
    gguf = import_gguf("exporting to GGUF")
    config = model.config
    arch = SUPPORTED_MODEL_TYPES.get(str(getattr(config, "model_type", "")))
    if arch is None:
        raise InvalidModelError(
            f"the GGUF exporter supports model types {', '.join(sorted(SUPPORTED_MODEL_TYPES))}; found "
            f"{getattr(config, 'model_type', None)!r}"
        )
    if tokenizer_gguf is None and tokenizer_dir is None:
        raise ValueError("pass tokenizer_gguf or tokenizer_dir")
    output_path = Path(output_path)
    temp = output_path.with_name(f".{output_path.name}.tmp")
    writer = gguf.GGUFWriter(str(temp), arch)
    try:
        n_vocab = int(config.vocab_size)
        if tokenizer_gguf is not None:
            reader = gguf.GGUFReader(str(tokenizer_gguf))
            general_skip = ("general.architecture", "general.file_type", "general.quantization_version")
            copy_gguf_metadata(reader, writer, ("general.",), skip=general_skip)
            copy_gguf_metadata(reader, writer, ("tokenizer.",))
            tokens = reader.fields.get("tokenizer.ggml.tokens")
            if tokens is None or len(tokens.data) != n_vocab:
                raise InvalidModelError(
                    f"{tokenizer_gguf} holds {0 if tokens is None else len(tokens.data)} tokens but the model's "
                    f"vocabulary has {n_vocab}; the GGUF metadata does not belong to this model"
                )
            source = f"gguf:{Path(tokenizer_gguf).name}"
        else:
            assert tokenizer_dir is not None
            _write_hf_vocab(writer, _hf_vocab(Path(tokenizer_dir), n_vocab), arch)
            source = "hf:tokenizer.json"
        if name is not None:
            writer.add_name(name)
        elif tokenizer_gguf is None:
            writer.add_name(str(getattr(config, "name_or_path", "") or arch))
        writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if file_type == "F16" else gguf.LlamaFileType.ALL_F32))
        _write_hparams(writer, config, arch)
        n_tensors = n_params = 0
        for tensor_name, array, ggml_type in _gguf_tensors(model, arch, file_type):
            writer.add_tensor(tensor_name, array, raw_dtype=ggml_type)
            n_tensors += 1
            n_params += int(array.size)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        total = n_tensors
        progress(0, total)
        writer.write_tensors_to_file()
        progress(total, total)
    except BaseException:
        writer.close()
        temp.unlink(missing_ok=True)
        raise
    writer.close()
    replace_durably(temp, output_path)
    return ExportReport(output_path, arch, file_type, n_tensors, n_params, source, n_vocab)


def export_gguf_dir(
    model_dir: Path, output_path: Path, *, file_type: ExportFileType = "F16", progress: Progress = _no_progress
) -> ExportReport:
    """Export a safetensors model directory: the tokenizer from its GGUF metadata file, else its tokenizer.json."""
    model_dir = Path(model_dir)
    model = load_hf_model(model_dir)
    metadata = model_dir / GGUF_METADATA_FILE
    return export_gguf(
        model,
        output_path,
        tokenizer_gguf=metadata if metadata.is_file() else None,
        tokenizer_dir=model_dir,
        file_type=file_type,
        progress=progress,
    )
