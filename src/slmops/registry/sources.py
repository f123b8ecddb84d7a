"""Read a model source — a GGUF file, a Hugging Face directory or an ONNX directory — and validate every file.

Nothing here copies or registers anything: it walks the source without following links, refuses what is
unsafe (symlinks, special files, paths that escape, pickle checkpoints), validates each weight file with the
bounded parsers in :mod:`slmops.registry.formats`, and returns what the files say.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmops.core.manifest import ModelFacts, ModelFormat, RuntimeHints
from slmops.errors import InvalidModelError, NotFoundError, UnsafePathError
from slmops.registry.formats.gguf import gguf_facts, gguf_runtime_hints, is_gguf, read_gguf
from slmops.registry.formats.hf import check_index, hf_facts, hf_runtime_hints, read_json_file
from slmops.registry.formats.onnx import read_onnx
from slmops.registry.formats.pickle_guard import check_not_pickle
from slmops.registry.formats.safetensors import read_safetensors

__all__ = ["InspectedModel", "SourceLimits", "inspect_source", "walk_model_dir"]


@dataclass(frozen=True)
class SourceLimits:
    max_files: int = 10_000
    max_depth: int = 8


@dataclass(frozen=True)
class InspectedModel:
    format: ModelFormat
    root: Path
    files: dict[str, Path]  # path inside the version -> local file
    facts: ModelFacts
    runtime: RuntimeHints
    weight_bytes: int
    skipped: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files.values())


def walk_model_dir(root: Path, limits: SourceLimits = SourceLimits()) -> tuple[dict[str, Path], list[str]]:
    """Regular files under ``root`` by POSIX relative path; refuses links and special files.

    Hidden entries (``.git``, ``.cache``) are skipped and reported.
    """
    files: dict[str, Path] = {}
    skipped: list[str] = []
    root_stat = os.lstat(root)
    if stat.S_ISLNK(root_stat.st_mode):
        raise UnsafePathError(f"{root} is a symbolic link; import the directory it points to, not the link")
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        directory, depth = stack.pop()
        if depth > limits.max_depth:
            raise UnsafePathError(f"{directory} is nested deeper than {limits.max_depth} levels; not a model directory")
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                path = Path(entry.path)
                rel = path.relative_to(root).as_posix()
                if entry.name.startswith("."):
                    skipped.append(rel)
                    continue
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    raise UnsafePathError(
                        f"{rel} in {root} is a symbolic link (to {os.readlink(path)!r}); links are refused "
                        "because they can point outside the model directory. Copy the real files, "
                        "e.g. `cp -rL SRC DST`, then import DST"
                    )
                if stat.S_ISDIR(mode):
                    stack.append((path, depth + 1))
                elif stat.S_ISREG(mode):
                    if not _safe_relpath(rel):
                        raise UnsafePathError(f"{rel!r} in {root} is not a plain relative path; rename it")
                    files[rel] = path
                    if len(files) > limits.max_files:
                        raise InvalidModelError(f"{root} has more than {limits.max_files} files; not a model directory")
                else:
                    raise UnsafePathError(
                        f"{rel} in {root} is not a regular file (a device, socket or FIFO); remove it"
                    )
    return files, skipped


def _safe_relpath(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and all(p not in ("", ".", "..") for p in parts)


def inspect_source(source: Path, limits: SourceLimits = SourceLimits()) -> InspectedModel:
    """Validate a model file or directory and read its facts; raises an InvalidModelError subclass on bad input."""
    try:
        mode = os.lstat(source).st_mode
    except FileNotFoundError:
        raise NotFoundError(f"{source} does not exist; give the path of a .gguf file or a model directory") from None
    if stat.S_ISLNK(mode):
        raise UnsafePathError(f"{source} is a symbolic link; import the file it points to ({os.path.realpath(source)})")
    if stat.S_ISREG(mode):
        check_not_pickle(source)
        if not is_gguf(source):
            raise InvalidModelError(
                f"{source} is not a GGUF file; a single file must be GGUF, other formats are imported as a directory "
                "(safetensors with config.json and tokenizer files, or ONNX)"
            )
        return _inspect_gguf(source.parent, {_safe_name(source): source}, source, [])
    if not stat.S_ISDIR(mode):
        raise UnsafePathError(f"{source} is not a regular file or directory")
    files, skipped = walk_model_dir(source, limits)
    if not files:
        raise InvalidModelError(f"{source} has no files to import")
    for path in files.values():
        check_not_pickle(path)
    by_suffix = Counter(Path(rel).suffix.lower() for rel in files)
    if by_suffix[".gguf"]:
        ggufs = sorted(rel for rel in files if rel.lower().endswith(".gguf"))
        if len(ggufs) > 1:
            raise InvalidModelError(
                f"{source} holds {len(ggufs)} GGUF files ({', '.join(ggufs[:4])}); import each file on its own"
            )
        return _inspect_gguf(source, files, files[ggufs[0]], skipped)
    if by_suffix[".safetensors"]:
        return _inspect_hf(source, files, skipped)
    if by_suffix[".onnx"]:
        return _inspect_onnx(source, files, skipped)
    raise InvalidModelError(
        f"{source} has no .gguf, .safetensors or .onnx file; found {', '.join(sorted(files)[:6])}. "
        "slmops imports GGUF, safetensors (Hugging Face layout) and ONNX models"
    )


def _safe_name(path: Path) -> str:
    if not _safe_relpath(path.name):
        raise UnsafePathError(f"{path.name!r} is not a usable file name")
    return path.name


def _inspect_gguf(root: Path, files: dict[str, Path], gguf_path: Path, skipped: list[str]) -> InspectedModel:
    info = read_gguf(gguf_path)
    return InspectedModel(
        format="gguf",
        root=root,
        files=files,
        facts=gguf_facts(info),
        runtime=gguf_runtime_hints(info),
        weight_bytes=info.file_size,
        skipped=skipped,
    )


def _optional_json(files: dict[str, Path], name: str) -> dict[str, Any] | None:
    path = files.get(name)
    return read_json_file(path) if path is not None else None


def _inspect_hf(root: Path, files: dict[str, Path], skipped: list[str]) -> InspectedModel:
    config = _optional_json(files, "config.json")
    if config is None:
        raise InvalidModelError(
            f"{root} has safetensors weights but no config.json; a Hugging Face model directory needs config.json "
            "and its tokenizer files (save with `model.save_pretrained(dir)` and `tokenizer.save_pretrained(dir)`)"
        )
    shard_names = sorted(rel for rel in files if rel.endswith(".safetensors"))
    shards = [read_safetensors(files[rel]) for rel in shard_names]
    index = _optional_json(files, "model.safetensors.index.json")
    if index is not None:
        check_index(index, set(shard_names))
    template_path = files.get("chat_template.jinja")
    template_text = None
    if template_path is not None:
        if template_path.stat().st_size > 1 << 20:
            raise InvalidModelError(f"{template_path} is larger than 1 MiB; not a chat template")
        template_text = template_path.read_text(encoding="utf-8", errors="strict")
    runtime = hf_runtime_hints(
        _optional_json(files, "tokenizer_config.json"), template_text, _optional_json(files, "generation_config.json")
    )
    if not any(name in files for name in ("tokenizer.json", "tokenizer.model")):
        raise InvalidModelError(
            f"{root} has no tokenizer (tokenizer.json or tokenizer.model); save it beside the weights with "
            "`tokenizer.save_pretrained(dir)`"
        )
    return InspectedModel(
        format="safetensors",
        root=root,
        files=files,
        facts=hf_facts(config, shards),
        runtime=runtime,
        weight_bytes=sum(s.file_size for s in shards),
        skipped=skipped,
    )


def _inspect_onnx(root: Path, files: dict[str, Path], skipped: list[str]) -> InspectedModel:
    if "genai_config.json" in files:  # an ONNX Runtime GenAI model directory (see slmops.runtime.backends)
        from slmops.registry.formats.onnx_genai import onnx_genai_facts, read_onnx_genai

        info_genai = read_onnx_genai(root)
        runtime_genai = hf_runtime_hints(_optional_json(files, "tokenizer_config.json"), None, None)
        return InspectedModel(
            format="onnx",
            root=root,
            files=files,
            facts=onnx_genai_facts(info_genai),
            runtime=runtime_genai,
            weight_bytes=info_genai.weight_bytes,
            skipped=skipped,
        )
    models = sorted(rel for rel in files if rel.endswith(".onnx"))
    infos = [read_onnx(files[rel], root) for rel in models]
    external = {name for info in infos for name in info.external_files}
    weight_bytes = sum(files[rel].stat().st_size for rel in models) + sum(
        files[name].stat().st_size for name in external if name in files
    )
    config = _optional_json(files, "config.json")
    main = infos[0]
    details: dict[str, Any] = {
        "onnx_files": models,
        "ir_version": main.ir_version,
        "producer": main.producer,
        "opsets": dict(main.opsets),
        "node_count": sum(i.node_count for i in infos),
    }
    facts = ModelFacts(
        architecture=(config or {}).get("model_type") if isinstance((config or {}).get("model_type"), str) else None,
        parameter_count=sum(i.parameter_count for i in infos),
        vocab_size=_int_or_none((config or {}).get("vocab_size")),
        context_length=_int_or_none((config or {}).get("max_position_embeddings")),
        details=details,
    )
    runtime = hf_runtime_hints(_optional_json(files, "tokenizer_config.json"), None, None)
    return InspectedModel(
        format="onnx", root=root, files=files, facts=facts, runtime=runtime, weight_bytes=weight_bytes, skipped=skipped
    )


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
