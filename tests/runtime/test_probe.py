from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slmops.runtime import BackendConfig, LlamaCppBackend, ModelInfo, ProbeConfig, probe_backend, probe_model_file
from slmops.runtime.probe import degenerate_reason
from tests.runtime._models import aborting_model, silent_model, stuck_model

Load = Callable[..., tuple[LlamaCppBackend, ModelInfo]]
CONFIG = BackendConfig(context_tokens=256, threads=1)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("The sea is wide and grey.", None),
        ("3Uzv$<\n\tv$<f", None),
        ("", "no text"),
        (" \n\t ", "only whitespace"),
        ("\ufffd\ufffd \ufffd", "replacement"),
        ("aaaaaaaaaa", "one character"),
        (" la la la la la la", "one token"),
        ("the the the the the", "one token"),
    ],
)
def test_degenerate_reason(text: str, reason: str | None) -> None:
    found = degenerate_reason(text)
    assert found is None if reason is None else reason in (found or "")


def test_probe_accepts_a_good_model(tiny_model: Path, load: Load) -> None:
    backend, info = load(tiny_model)

    result = probe_backend(backend, info)

    assert result.ok, result.reason
    assert result.tokens == ProbeConfig().max_tokens
    assert result.generate_s > 0 and result.decode_tokens_per_s > 0


@pytest.mark.parametrize(("make", "reason"), [(silent_model, "no text"), (stuck_model, "one token")])
def test_probe_rejects_a_degenerate_model(
    tmp_path: Path, load: Load, make: Callable[[Path], Path], reason: str
) -> None:
    backend, info = load(make(tmp_path / "bad.gguf"))

    result = probe_backend(backend, info)

    assert not result.ok and reason in result.reason
    assert result.tokens == ProbeConfig().max_tokens


def test_probe_rejects_a_model_over_its_latency_budget(tiny_model: Path, load: Load) -> None:
    backend, info = load(tiny_model)
    result = probe_backend(backend, info, ProbeConfig(max_latency_s=0.0))
    assert not result.ok and "budget" in result.reason


def test_probe_in_a_child_process_accepts_a_good_model(tiny_model: Path) -> None:
    info = ModelInfo.from_gguf(tiny_model, context_tokens=256)

    result = probe_model_file(tiny_model, info, CONFIG)

    assert result.ok, result.reason
    assert result.load_s > 0 and result.tokens == ProbeConfig().max_tokens


def test_probe_in_a_child_process_rejects_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))

    result = probe_model_file(junk, ModelInfo(model_id="junk"), CONFIG)

    assert not result.ok and "does not load" in result.reason


def test_a_model_that_aborts_llama_cpp_fails_the_probe_without_killing_the_caller(tmp_path: Path) -> None:
    path = aborting_model(tmp_path / "abort.gguf")
    info = ModelInfo.from_gguf(path, context_tokens=256)

    result = probe_model_file(path, info, CONFIG)

    assert not result.ok
    assert "SIGABRT" in result.reason and "GGML_ASSERT" in result.reason


def test_a_child_that_hangs_is_killed_at_the_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The child is replaced by a script that never answers; the probe must kill it instead of waiting.
    import slmops.runtime.probe as probe_module

    hang = tmp_path / "hang.py"
    hang.write_text("import time\ntime.sleep(60)\n")
    real_popen = subprocess.Popen

    def popen(_args: list[str], **kwargs: Any) -> Any:
        return real_popen([sys.executable, str(hang)], **kwargs)

    monkeypatch.setattr(probe_module.subprocess, "Popen", popen)
    deadline = ProbeConfig(load_timeout_s=-9.5, max_latency_s=0.0)  # 0.5 s with the 10 s start-up allowance

    result = probe_model_file(tmp_path / "x.gguf", ModelInfo(model_id="x"), CONFIG, deadline)

    assert not result.ok and "killed" in result.reason
