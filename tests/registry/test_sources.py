from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from slmops.errors import InvalidModelError, NotFoundError, UnsafeFormatError, UnsafePathError
from slmops.registry import Registry
from slmops.registry.sources import inspect_source
from tests.tiny_gguf import write_tiny_gguf


class _Trap:
    """Unpickling this creates a sentinel file: proof that something loaded the pickle."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.sentinel, "w"))


def _state(registry: Registry) -> tuple[list[object], list[str]]:
    return registry.models(), sorted(registry.blobs.digests())


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_pickle_checkpoints_in_a_model_directory_are_refused_never_loaded(
    registry: Registry, tmp_path: Path, suffix: str
) -> None:
    sentinel = tmp_path / "SENTINEL"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / f"pytorch_model{suffix}").write_bytes(pickle.dumps(_Trap(str(sentinel))))

    with pytest.raises(UnsafeFormatError, match="safetensors"):
        registry.import_model(model, "m")

    assert not sentinel.exists()
    assert _state(registry) == ([], [])


def test_a_symlink_inside_the_model_directory_is_refused(registry: Registry, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    write_tiny_gguf(model / "m.gguf")
    os.symlink("/etc/passwd", model / "tokenizer.json")

    with pytest.raises(UnsafePathError, match="symbolic link"):
        registry.import_model(model, "m")
    assert _state(registry) == ([], [])


def test_a_symlinked_model_file_is_refused(tmp_path: Path) -> None:
    real = write_tiny_gguf(tmp_path / "real.gguf")
    link = tmp_path / "link.gguf"
    link.symlink_to(real)

    with pytest.raises(UnsafePathError, match="symbolic link"):
        inspect_source(link)


def test_a_fifo_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    write_tiny_gguf(model / "m.gguf")
    os.mkfifo(model / "pipe")

    with pytest.raises(UnsafePathError, match="not a regular file"):
        inspect_source(model)


def test_hidden_entries_are_skipped_and_reported(registry: Registry, tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / ".git").mkdir(parents=True)
    (model / ".git" / "HEAD").write_text("ref")
    write_tiny_gguf(model / "m.gguf")
    (model / "README.md").write_text("hello")

    result = registry.import_model(model, "m")

    assert [f.path for f in result.manifest.files] == ["README.md", "m.gguf"]
    assert result.skipped == [".git"]


def test_unclear_sources_get_a_message_that_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        inspect_source(tmp_path / "nope.gguf")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InvalidModelError, match="not a GGUF file"):
        inspect_source(text)
    two = tmp_path / "two"
    two.mkdir()
    write_tiny_gguf(two / "a.gguf")
    write_tiny_gguf(two / "b.gguf")
    with pytest.raises(InvalidModelError, match="2 GGUF files"):
        inspect_source(two)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("x")
    with pytest.raises(InvalidModelError, match=r"no \.gguf, \.safetensors or \.onnx"):
        inspect_source(empty)
