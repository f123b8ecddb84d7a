"""The lora and lora_merge passes on tiny real models: completion-only loss, determinism, the merge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch

from slmops.errors import BlueprintError, InvalidModelError
from slmops.optimize.hf_load import load_hf_model
from slmops.optimize.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_INFO_FILE,
    ADAPTER_WEIGHTS_FILE,
    IGNORE_INDEX,
    ChatExample,
    chat_format,
    encode_examples,
    file_sha256,
    load_tokenizer,
)
from slmops.optimize.passes import PassResult, get_pass
from tests.tiny_hf import write_tiny_hf

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
    "{% endif %}"
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_dataset(path: Path, n: int = 12) -> Path:
    words = ["hello world", "small model", "edge device", "language model runs"]
    lines = []
    for i in range(n):
        prompt = words[i % len(words)]
        lines.append(json.dumps({"messages": [{"role": "user", "content": prompt}], "completion": "the edge"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_hf(tmp_path_factory.mktemp("tiny-gemma3"), arch="gemma3", seed=3)


def run_pass(name: str, input_path: Path, params: dict[str, Any], workdir: Path) -> PassResult:
    step = get_pass(name)
    workdir.mkdir()
    calls: list[tuple[float, float]] = []
    result = step.run(input_path, step.parse_params(params), workdir, lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1]
    return result


def lora_params(dataset: Path, **extra: Any) -> dict[str, Any]:
    return {
        "dataset": str(dataset),
        "dataset_sha256": file_sha256(dataset),
        "steps": 8,
        "batch_size": 4,
        "learning_rate": 0.02,
        "rank": 4,
        "alpha": 8.0,
        **extra,
    }


def test_only_completion_tokens_are_labelled_and_the_template_is_the_models(tmp_path: Path) -> None:
    directory = write_tiny_hf(tmp_path / "m", arch="gemma3", seed=1)
    (directory / "chat_template.jinja").write_text(GEMMA_TEMPLATE, encoding="utf-8")
    tokenizer = load_tokenizer(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    fmt = chat_format(directory, tokenizer)
    example = ChatExample(({"role": "user", "content": "hello"},), "the model")

    [encoded], dropped = encode_examples(tokenizer, fmt, [example], max_seq_tokens=64)

    labelled = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    prompt = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label == IGNORE_INDEX]
    assert dropped == 0
    assert tokenizer.decode(labelled) == "the model<end_of_turn>\n"
    assert tokenizer.decode(prompt) == "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n"
    assert encoded.input_ids.count(tokenizer.bos_token_id) == 1  # the template's BOS, not doubled


def test_examples_without_room_for_a_completion_token_are_dropped(tiny: Path) -> None:
    tokenizer = load_tokenizer(tiny)
    fmt = chat_format(tiny, tokenizer)
    long = ChatExample(({"role": "user", "content": "hello world " * 20},), "the")

    encoded, dropped = encode_examples(tokenizer, fmt, [long], max_seq_tokens=8)

    assert encoded == [] and dropped == 1


def test_lora_lowers_the_completion_loss_and_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "train.jsonl")

    first = run_pass("lora", tiny, lora_params(dataset), tmp_path / "a")
    second = run_pass("lora", tiny, lora_params(dataset), tmp_path / "b")

    report = first.report
    assert report["loss_end"] < 0.8 * report["loss_start"], report
    assert report["steps"] == 8 and report["tokens"] > 0 and report["examples"] == 12
    assert report["trainable_params"] == 2 * 2 * 4 * (64 + 64) - 2 * 4 * (64 - 32)  # q (64→64), v (64→32), r=4
    assert report["adapter_bytes"] == (first.output_path / ADAPTER_WEIGHTS_FILE).stat().st_size
    for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE, ADAPTER_INFO_FILE):
        assert (first.output_path / name).read_bytes() == (second.output_path / name).read_bytes(), name
    config = json.loads((first.output_path / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert torch.are_deterministic_algorithms_enabled() is False  # restored


def test_another_seed_gives_another_adapter_and_the_key_ignores_the_path(tiny: Path, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "train.jsonl")
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_bytes(dataset.read_bytes())
    step = get_pass("lora")

    one = run_pass("lora", tiny, lora_params(dataset, steps=2), tmp_path / "a")
    other = run_pass("lora", tiny, lora_params(dataset, steps=2, seed=1), tmp_path / "b")

    assert (one.output_path / ADAPTER_WEIGHTS_FILE).read_bytes() != (
        other.output_path / ADAPTER_WEIGHTS_FILE
    ).read_bytes()
    key = step.cache_key("sha256:x", step.parse_params(lora_params(dataset)))
    assert key == step.cache_key("sha256:x", step.parse_params(lora_params(moved)))
    assert key != step.cache_key("sha256:x", step.parse_params(lora_params(dataset, seed=1)))


def test_a_changed_dataset_is_refused(tiny: Path, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "train.jsonl")
    params = lora_params(dataset)
    dataset.write_text(dataset.read_text(encoding="utf-8") + "\n", encoding="utf-8")

    with pytest.raises(BlueprintError, match="has sha256"):
        run_pass("lora", tiny, params, tmp_path / "w")


@pytest.mark.parametrize(
    ("extra", "message"),
    [({"dataset_sha256": "abc"}, "sha256 hex digest"), ({"rank": 0}, "rank"), ({"typo": 1}, "typo")],
)
def test_bad_lora_parameters_are_recipe_errors(tmp_path: Path, extra: dict[str, Any], message: str) -> None:
    dataset = write_dataset(tmp_path / "train.jsonl")
    with pytest.raises(BlueprintError, match=message):
        get_pass("lora").parse_params(lora_params(dataset, **extra))


def test_unknown_target_modules_name_the_linear_layers(tiny: Path, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "train.jsonl")
    with pytest.raises(BlueprintError, match="gate_proj"):
        run_pass("lora", tiny, lora_params(dataset, target_modules=["query"]), tmp_path / "w")


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_merge_equals_base_plus_adapter_and_checks_the_base(tiny: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    dataset = write_dataset(tmp_path / "train.jsonl")
    adapter = run_pass("lora", tiny, lora_params(dataset), tmp_path / "a").output_path
    ids = torch.tensor([[2, 300, 301, 302, 5, 6]])

    merged = run_pass("lora_merge", adapter, {}, tmp_path / "m")

    with torch.no_grad():
        expected = PeftModel.from_pretrained(load_hf_model(tiny), str(adapter))(ids).logits
        base = load_hf_model(tiny)(ids).logits
        got = load_hf_model(merged.output_path)(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - base).abs().max() > 1e-3
    assert merged.report["tensors_changed"] == 4  # q and v of two layers
    assert (merged.output_path / "tokenizer.json").is_file()

    other = write_tiny_hf(tmp_path / "other", arch="gemma3", seed=9)
    with pytest.raises(InvalidModelError, match="trained on"):
        run_pass("lora_merge", adapter, {"base": str(other)}, tmp_path / "m2")


def test_a_given_chat_template_is_the_one_trained_on(tiny: Path, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "train.jsonl")

    plain = run_pass("lora", tiny, lora_params(dataset, steps=1), tmp_path / "a")
    templated = run_pass("lora", tiny, lora_params(dataset, steps=1, chat_template=GEMMA_TEMPLATE), tmp_path / "b")

    assert plain.report["chat_template"] == "fallback" and templated.report["chat_template"] == "model"
    assert templated.report["completion_tokens"] != plain.report["completion_tokens"]
