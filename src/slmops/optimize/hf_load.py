"""Load and save transformers models for the torch passes: from a safetensors directory or dequantized from a GGUF.

Everything comes from local files (``local_files_only``); nothing is ever downloaded. torch and transformers are
imported inside the functions, so importing this module is cheap; a missing package raises
:class:`~slmops.errors.MissingExtraError` naming the ``optimize`` extra.

A model directory written here holds ``config.json``, ``model.safetensors``, the Hugging Face tokenizer files when
there are any, and, when the model came from a GGUF, :data:`~slmops.optimize.gguf_metadata.GGUF_METADATA_FILE`: a
GGUF without tensors that keeps the source's ``tokenizer.*`` and ``general.*`` metadata, so that the exporter can write
the tokenizer back exactly.

Int8 weight-only models (see :mod:`slmops.optimize.torch_passes`) are stored as int8 tensors plus a float32
``<name>.int8_scale`` per output channel; :func:`load_hf_model` dequantizes them on load.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from slmops.errors import InvalidModelError, MissingExtraError
from slmops.optimize._files import fsync_dir
from slmops.optimize.gguf_metadata import GGUF_METADATA_FILE

__all__ = [
    "INT8_SCALE_SUFFIX",
    "SIDECAR_FILES",
    "copy_sidecar_files",
    "import_torch",
    "import_transformers",
    "load_hf_model",
    "load_hf_model_from_gguf",
    "save_hf_model",
]

INT8_SCALE_SUFFIX = ".int8_scale"
SAFETENSORS_FORMAT_KEY = "slmops.format"
INT8_FORMAT = "int8_weight_only"
SIDECAR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    GGUF_METADATA_FILE,
)
"""Files that travel with a model directory from one pass to the next (everything but config and weights)."""


def import_torch(purpose: str) -> Any:
    try:
        import torch
    except ImportError:
        raise MissingExtraError("optimize", purpose, "torch") from None
    return torch


def import_transformers(purpose: str) -> Any:
    import_torch(purpose)
    try:
        import transformers
    except ImportError:
        raise MissingExtraError("optimize", purpose, "transformers") from None
    return transformers


def _import_safetensors(purpose: str) -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise MissingExtraError("optimize", purpose, "safetensors") from None
    return safetensors.torch


def load_hf_model_from_gguf(gguf_path: Path) -> Any:
    """A transformers causal LM with the GGUF's weights dequantized to float32 (about 45 s for gemma3-270m).

    The returned model is a plain float32 model: the GGUF quantizer that transformers attaches while loading is
    removed, so that ``save_pretrained`` writes ordinary safetensors.
    """
    transformers = import_transformers("loading a GGUF model into transformers")
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise InvalidModelError(f"expected a GGUF file at {gguf_path}, found nothing; check the path")
    # transformers decides how to read a file by its name and looks at the files beside it: give it a directory of
    # its own holding only a `.gguf` link, so a blob named by its digest is never mistaken for a torch checkpoint.
    try:
        with tempfile.TemporaryDirectory(prefix="slmops-gguf-") as isolated:
            link = Path(isolated) / "model.gguf"
            link.symlink_to(gguf_path.resolve())
            model = transformers.AutoModelForCausalLM.from_pretrained(
                isolated, gguf_file=link.name, local_files_only=True
            )
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise InvalidModelError(
            f"transformers could not load {gguf_path.name} as a causal LM ({exc}); the torch passes support the "
            "architectures transformers can dequantize from GGUF (gemma3, llama, qwen2, ...)"
        ) from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if model.config.model_type == "gemma3_text":
        # GGUF has no query_pre_attn_scalar: llama.cpp scales gemma3 attention by 1/sqrt(head_dim), while
        # transformers' GGUF loader leaves the config default (256); make the model compute what the GGUF means.
        model.config.query_pre_attn_scalar = model.config.head_dim
        for layer in model.model.layers:
            layer.self_attn.scaling = model.config.head_dim**-0.5
    model.eval()
    return model


def _int8_directory(directory: Path) -> bool:
    _import_safetensors("reading a safetensors model")
    from safetensors import safe_open

    path = directory / "model.safetensors"
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return metadata.get(SAFETENSORS_FORMAT_KEY) == INT8_FORMAT


def load_hf_model(directory: Path) -> Any:
    """A float32 transformers causal LM from a local safetensors directory (int8 weight-only ones dequantized)."""
    transformers = import_transformers("loading a safetensors model")
    torch = import_torch("loading a safetensors model")
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise InvalidModelError(
            f"expected a Hugging Face model directory with config.json at {directory}, found none; "
            "point at the directory that holds config.json and *.safetensors"
        )
    if _int8_directory(directory):
        from safetensors.torch import load_file

        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        stored = load_file(str(directory / "model.safetensors"))
        state: dict[str, Any] = {}
        for name, tensor in stored.items():
            if name.endswith(INT8_SCALE_SUFFIX):
                continue
            scale = stored.get(name + INT8_SCALE_SUFFIX)
            # int8 (out, in) * scale (out, 1) -> float32 (out, in)
            state[name] = tensor.to(torch.float32) * scale if scale is not None else tensor.to(torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise InvalidModelError(
                f"{directory}: int8 weights do not match config.json (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); re-run the int8 pass"
            )
        model.tie_weights()
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=torch.float32, local_files_only=True
        )
    model.eval()
    return model


def save_hf_model(model: Any, directory: Path, *, tensors: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (config + ``model.safetensors``) into the new directory ``directory``; return it.

    ``tensors`` replaces the model's own state dict in ``model.safetensors`` (used for int8 + scales, which carry
    ``slmops.format=int8_weight_only`` in the safetensors metadata). The directory is written as a temporary sibling
    and renamed into place, so a reader never sees half a model.
    """
    directory = Path(directory)
    temp = directory.with_name(f".{directory.name}.tmp")
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    if tensors is None:
        model.save_pretrained(str(temp), safe_serialization=True)
    else:
        safetensors = _import_safetensors("saving an int8 model")
        model.config.save_pretrained(str(temp))
        safetensors.save_file(tensors, str(temp / "model.safetensors"), metadata={SAFETENSORS_FORMAT_KEY: INT8_FORMAT})
    for path in temp.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(temp)
    os.replace(temp, directory)
    fsync_dir(directory.parent)
    return directory


def copy_sidecar_files(source: Path, destination: Path, names: Iterable[str] = SIDECAR_FILES) -> list[str]:
    """Copy the tokenizer, generation config and GGUF metadata files that exist in ``source``; return their names."""
    copied = []
    for name in names:
        path = Path(source) / name
        if path.is_file():
            shutil.copyfile(path, Path(destination) / name)
            copied.append(name)
    return copied
