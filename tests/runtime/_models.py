"""Tiny real GGUF models for the runtime tests, including broken ones made by patching a good file in place."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tests.tiny_gguf import write_tiny_gguf


def good_model(path: Path, **kwargs: Any) -> Path:
    return write_tiny_gguf(path, seed=0, context_length=256, **kwargs)


def _patch(path: Path, edit: Any) -> Path:
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    edit(reader)
    del reader  # flushes the memory map
    return path


def _zero_output(reader: Any) -> None:
    for tensor in reader.tensors:
        if tensor.name == "output.weight":
            tensor.data[...] = 0


def silent_model(path: Path) -> Path:
    """All output weights zero: every logit ties, greedy decoding picks <unk> (id 0) forever, which renders as ''."""
    return _patch(good_model(path), _zero_output)


def stuck_model(path: Path) -> Path:
    """Like ``silent_model``, but token 0 is the normal word piece '▁la': the model says ' la la la …'."""
    import numpy as np

    def edit(reader: Any) -> None:
        _zero_output(reader)
        tokens = reader.fields["tokenizer.ggml.tokens"]
        tokens.parts[tokens.data[0]][:] = np.frombuffer("\u2581la".encode(), dtype=np.uint8)  # same 5 bytes as <unk>
        types = reader.fields["tokenizer.ggml.token_type"]
        types.parts[types.data[0]][0] = 1  # normal

    return _patch(good_model(path), edit)


def aborting_model(path: Path) -> Path:
    """Loads, then aborts llama.cpp at the first decode: a negative RMS-norm epsilon trips
    ``GGML_ASSERT(eps >= 0.0f)`` in ggml-cpu's rms_norm (SIGABRT)."""

    def edit(reader: Any) -> None:
        field = reader.fields["llama.attention.layer_norm_rms_epsilon"]
        field.parts[field.data[0]][0] = -1.0

    return _patch(good_model(path), edit)


def copy_model(source: Path, path: Path) -> Path:
    shutil.copyfile(source, path)
    return path
