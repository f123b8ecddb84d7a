"""Tiny, real transformers models for tests: random weights, a tokenizer built locally, saved as safetensors.

``write_tiny_hf(directory, arch=...)`` writes ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` (and ``generation_config.json``) for a gemma3-, llama- or qwen2-shaped causal LM. Nothing
is downloaded: the config is built in code, the weights come from a seeded generator and the tokenizer is assembled
with the ``tokenizers`` library from a fixed word list.

Two tokenizer shapes, as the real families use them:

- ``gemma3`` and ``llama``: SentencePiece-style BPE over ``▁``-joined words with byte fallback (``<0x00>``..``<0xFF>``);
  gemma3 ids follow Gemma (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3) and adds no space prefix, llama
  follows Llama 2 (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2) and prepends ``▁``.
- ``qwen2``: GPT-2 style byte-level BPE plus the ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["TINY_ARCHS", "TINY_WORDS", "tiny_config", "write_tiny_hf"]

TINY_ARCHS = ("gemma3", "llama", "qwen2")
TINY_WORDS = (
    "the",
    "and",
    "of",
    "to",
    "in",
    "is",
    "model",
    "edge",
    "device",
    "small",
    "language",
    "runs",
    "hello",
    "world",
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_SPACE = "\u2581"


def _merges_for(words: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Left-to-right merges that build each word from its characters, adding every new piece to ``vocab``."""
    merges: list[tuple[str, str]] = []
    for word in words:
        piece = word[0]
        for char in word[1:]:
            merged = piece + char
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((piece, char))
            piece = merged
    return merges


def _spm_tokenizer(arch: str) -> tuple[Any, dict[str, Any]]:
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    if arch == "gemma3":
        specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
        bos, eos, unk, pad = "<bos>", "<eos>", "<unk>", "<pad>"
    else:
        specials = ["<unk>", "<s>", "</s>"]
        bos, eos, unk, pad = "<s>", "</s>", "<unk>", None
    vocab: dict[str, int] = {token: index for index, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in _SPACE + _LETTERS:
        vocab[char] = len(vocab)
    merges = _merges_for([_SPACE + word for word in TINY_WORDS], vocab)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Replace(" ", _SPACE)]
    if arch == "llama":
        steps.insert(0, normalizers.Prepend(_SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1, right=0)] if arch == "llama" else [])
    )
    tokenizer.add_special_tokens(specials)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    config: dict[str, Any] = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "add_bos_token": True,
        "add_eos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if pad is not None:
        config["pad_token"] = pad
    return tokenizer, config


def _byte_level_tokenizer() -> tuple[Any, dict[str, Any]]:
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {char: index for index, char in enumerate(alphabet)}
    merges = _merges_for(["\u0120" + word for word in TINY_WORDS], vocab)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    config: dict[str, Any] = {
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return tokenizer, config


def tiny_config(arch: str, *, vocab_size: int, n_layers: int = 2, tied: bool | None = None) -> Any:
    """A transformers config for a tiny ``arch`` model (hidden 64, 4 query heads of 16, 2 KV heads, MLP 128)."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
    }
    if arch == "gemma3":
        return Gemma3TextConfig(
            **common,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=128,
            tie_word_embeddings=True if tied is None else tied,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    if arch == "llama":
        return LlamaConfig(
            **common, head_dim=16, tie_word_embeddings=False if tied is None else tied, bos_token_id=1, eos_token_id=2
        )
    if arch == "qwen2":
        return Qwen2Config(
            **common, tie_word_embeddings=True if tied is None else tied, bos_token_id=None, eos_token_id=vocab_size - 3
        )
    raise ValueError(f"arch must be one of {TINY_ARCHS}, not {arch!r}")


def write_tiny_hf(
    directory: Path, *, arch: str = "gemma3", n_layers: int = 2, tied: bool | None = None, seed: int = 0
) -> Path:
    """Write a tiny random ``arch`` model (safetensors + config + tokenizer) into ``directory``; return it.

    The same arguments give the same weights. Norm weights are random too (not all ones), so conventions such as
    Gemma's ``1 + w`` RMSNorm or Llama's rotary Q/K layout change the outputs when an exporter gets them wrong.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, not {arch!r}")
    tokenizer, tokenizer_config = _byte_level_tokenizer() if arch == "qwen2" else _spm_tokenizer(arch)
    config = tiny_config(arch, vocab_size=tokenizer.get_vocab_size(), n_layers=n_layers, tied=tied)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # norms and biases: around their neutral value, never exactly it
                base = 0.0 if (arch == "gemma3" or name.endswith(".bias")) else 1.0
                param.copy_(base + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    return directory
