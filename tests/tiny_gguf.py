"""Tiny, real GGUF models for tests: random weights, a real SentencePiece-style vocabulary, loadable by llama.cpp.

``write_tiny_gguf`` writes with the upstream ``gguf`` package (imported lazily, it needs numpy), using the tensor
names and metadata keys llama.cpp expects for the ``llama`` and ``gemma3`` architectures. The vocabulary is
``<unk> <s> </s>``, the 256 byte tokens ``<0x00>``..``<0xFF>`` (so any text tokenizes by byte fallback), an
end-of-turn token, then plain word pieces up to ``vocab_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["FILE_TYPES", "TINY_EOT_TOKEN", "write_tiny_gguf"]

# file type name -> (general.file_type, ggml type of the matrices); norms always stay F32, as llama.cpp expects.
FILE_TYPES: dict[str, tuple[int, int]] = {
    "F32": (0, 0),
    "F16": (1, 1),
    "Q4_0": (2, 2),
    "Q4_1": (3, 3),
    "Q8_0": (7, 8),
    "Q5_0": (8, 6),
    "Q5_1": (9, 7),
    "BF16": (32, 30),
}
TINY_EOT_TOKEN = "<|eot|>"

_UNK, _BOS, _EOS = 0, 1, 2
_N_SPECIAL = 3
_TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_BYTE = 1, 2, 3, 6


def _vocabulary(vocab_size: int) -> tuple[list[str], list[float], list[int], int | None]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [_TYPE_UNKNOWN, _TYPE_CONTROL, _TYPE_CONTROL]
    for byte in range(256):
        if len(tokens) == vocab_size:
            break
        tokens.append(f"<0x{byte:02X}>")
        types.append(_TYPE_BYTE)
    eot_id: int | None = None
    if len(tokens) < vocab_size:
        eot_id = len(tokens)
        tokens.append(TINY_EOT_TOKEN)
        types.append(_TYPE_CONTROL)
    word = 0
    while len(tokens) < vocab_size:
        tokens.append("\u2581" if word == 0 else f"\u2581w{word}")
        types.append(_TYPE_NORMAL)
        word += 1
    scores = [0.0 if t != _TYPE_NORMAL else -float(i) for i, t in enumerate(types)]
    return tokens, scores, types, eot_id


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    n_layers: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    vocab_size: int = 260,
    context_length: int = 256,
    file_type: str = "F32",
    chat_template: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny random-weight model of architecture ``arch`` ("llama" or "gemma3") to ``path``; return ``path``.

    Missing parent directories are created. ``seed`` fixes the weights: the same arguments give the same bytes.

    ``file_type`` is one of :data:`FILE_TYPES`; quantized types need ``n_embd`` and ``n_ff`` multiples of 32.
    """
    import gguf
    import numpy as np

    if arch not in ("llama", "gemma3"):
        raise ValueError(f"arch must be 'llama' or 'gemma3', not {arch!r}")
    if file_type not in FILE_TYPES:
        raise ValueError(f"file_type must be one of {sorted(FILE_TYPES)}, not {file_type!r}")
    if vocab_size < _N_SPECIAL or n_embd % n_head or n_head % n_head_kv:
        raise ValueError("need vocab_size >= 3, n_embd divisible by n_head, n_head divisible by n_head_kv")
    ftype, matrix_type = FILE_TYPES[file_type]
    qtype = gguf.GGMLQuantizationType(matrix_type)
    head_dim = n_embd // n_head
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_file_type(ftype)
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(min(512, context_length))

    tokens, scores, types, eot_id = _vocabulary(vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(_BOS)
    writer.add_eos_token_id(_EOS)
    writer.add_unk_token_id(_UNK)
    if eot_id is not None:
        writer.add_eot_token_id(eot_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def matrix(name: str, rows: int, cols: int) -> None:
        # numpy (rows, cols) is ggml {cols, rows}: cols is the innermost dimension.
        weights = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        data: Any = gguf.quants.quantize(weights, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)

    def norm(name: str, size: int) -> None:
        writer.add_tensor(name, np.ones(size, dtype=np.float32))

    matrix("token_embd.weight", vocab_size, n_embd)
    for layer in range(n_layers):
        blk = f"blk.{layer}"
        norm(f"{blk}.attn_norm.weight", n_embd)
        matrix(f"{blk}.attn_q.weight", n_head * head_dim, n_embd)
        matrix(f"{blk}.attn_k.weight", n_head_kv * head_dim, n_embd)
        matrix(f"{blk}.attn_v.weight", n_head_kv * head_dim, n_embd)
        matrix(f"{blk}.attn_output.weight", n_embd, n_head * head_dim)
        if arch == "gemma3":
            norm(f"{blk}.attn_q_norm.weight", head_dim)
            norm(f"{blk}.attn_k_norm.weight", head_dim)
            norm(f"{blk}.post_attention_norm.weight", n_embd)
        norm(f"{blk}.ffn_norm.weight", n_embd)
        matrix(f"{blk}.ffn_gate.weight", n_ff, n_embd)
        matrix(f"{blk}.ffn_up.weight", n_ff, n_embd)
        matrix(f"{blk}.ffn_down.weight", n_embd, n_ff)
        if arch == "gemma3":
            norm(f"{blk}.post_ffw_norm.weight", n_embd)
    norm("output_norm.weight", n_embd)
    if arch == "llama":  # gemma3 ties the output projection to token_embd
        matrix("output.weight", vocab_size, n_embd)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
