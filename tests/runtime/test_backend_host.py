from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from slmops.errors import RuntimeBackendError, UnavailableError
from slmops.runtime import BackendConfig, LlamaCppBackend, ModelHost, ModelInfo

Load = Callable[..., tuple[LlamaCppBackend, ModelInfo]]
GREEDY = {"temperature": 0.0, "top_p": 1.0, "stop": []}


@pytest.mark.parametrize("file_type", ["F16", "Q8_0"])
def test_llama_backend_loads_and_generates_exactly_max_tokens(tmp_path: Path, load: Load, file_type: str) -> None:
    from tests.runtime._models import good_model

    backend, _ = load(good_model(tmp_path / "m.gguf", file_type=file_type))

    completion = backend.complete("user: hi\nassistant:", max_tokens=8, **GREEDY)

    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 8
    assert completion.prompt_tokens == backend.count_tokens("user: hi\nassistant:")


def test_stream_pieces_equal_the_completion_and_report_usage(tiny_model: Path, load: Load) -> None:
    backend, _ = load(tiny_model)
    completion = backend.complete("hello", max_tokens=12, **GREEDY)

    with backend.stream("hello", max_tokens=12, **GREEDY) as stream:
        text = "".join(stream)

    assert text == completion.text
    assert (stream.prompt_tokens, stream.completion_tokens, stream.finish_reason) == (
        completion.prompt_tokens,
        completion.completion_tokens,
        "length",
    )


def test_a_bos_written_by_the_template_is_not_doubled(tiny_model: Path, load: Load) -> None:
    backend, info = load(tiny_model)
    assert backend.count_tokens(info.bos_token + "hello") == backend.count_tokens("hello")


def test_a_prompt_starting_with_the_bos_text_makes_llama_cpp_add_no_second_bos(
    tiny_model: Path, load: Load, capfd: pytest.CaptureFixture[str]
) -> None:
    backend, info = load(tiny_model)
    capfd.readouterr()

    backend.complete(info.bos_token + "hello", max_tokens=2, **GREEDY)

    assert "BOS" not in capfd.readouterr().err  # llama.cpp: "... the final prompt starts with 2 BOS tokens"


def test_model_info_names_are_the_id_the_id_without_version_and_the_aliases() -> None:
    assert ModelInfo(model_id="gemma3-270m@v1", aliases=("chat", "gemma3-270m")).names == (
        "gemma3-270m@v1",
        "gemma3-270m",
        "chat",
    )
    assert ModelInfo(model_id="tiny").names == ("tiny",)


def test_prompt_longer_than_the_context_is_refused(tiny_model: Path, load: Load) -> None:
    backend, _ = load(tiny_model)
    with pytest.raises(RuntimeBackendError, match="context of 256 tokens"):
        backend.complete("x" * 300, max_tokens=4, **GREEDY)


def test_loading_something_that_is_not_a_model_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(RuntimeBackendError, match=r"could not load model 'junk'.*GGUF"):
        LlamaCppBackend.load(junk, "junk", BackendConfig(threads=1))
    with pytest.raises(RuntimeBackendError, match="found none"):
        LlamaCppBackend.load(tmp_path / "missing.gguf", "missing", BackendConfig(threads=1))


def test_host_without_a_model_is_unavailable() -> None:
    host = ModelHost()
    assert host.active is None
    with pytest.raises(UnavailableError), host.lease():
        pass


def test_swap_closes_the_old_backend_only_after_its_last_lease(tiny_model: Path, load: Load) -> None:
    old, old_info = load(tiny_model, "tiny@v1")
    new, new_info = load(tiny_model, "tiny@v2")
    host = ModelHost()
    host.activate(old, old_info)

    with host.lease() as (leased, info):
        host.activate(new, new_info)
        assert host.active == new_info
        assert info.model_id == "tiny@v1"
        assert leased.complete("hi", max_tokens=2, **GREEDY).completion_tokens == 2  # still loaded
        with host.lease() as (_, newer):
            assert newer.model_id == "tiny@v2"
    with pytest.raises(RuntimeBackendError, match="unloaded"):
        old.count_tokens("hi")
    host.deactivate()
    with pytest.raises(RuntimeBackendError, match="unloaded"):
        new.count_tokens("hi")


def test_calls_on_one_backend_are_serialized_while_a_stream_is_open(tiny_model: Path, load: Load) -> None:
    backend, info = load(tiny_model)
    host = ModelHost()
    host.activate(backend, info)
    finished = threading.Event()

    with host.lease() as (leased, _):
        stream = leased.stream("hello", max_tokens=4, **GREEDY)
        next(stream)

        def count() -> None:
            with host.lease() as (other, _):
                other.count_tokens("hi")
            finished.set()

        worker = threading.Thread(target=count)
        worker.start()
        assert not finished.wait(0.2)  # blocked behind the open stream
        stream.close()
        worker.join(10)
    assert finished.is_set()
    host.deactivate()
