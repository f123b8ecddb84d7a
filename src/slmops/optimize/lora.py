"""LoRA fine-tuning on the CPU (peft), deterministic, and merging an adapter back into its base.

=================  =====================  ==================================================================
pass               formats                what it does
=================  =====================  ==================================================================
``lora``           safetensors → adapter  train a peft LoRA adapter on a chat JSONL dataset (completion tokens
                                          only); writes ``adapter_model.safetensors`` + ``adapter_config.json``
``lora_merge``     adapter → safetensors  merge the adapter into the base it was trained on: a full model that
                                          ``export_gguf`` → ``quantize`` turns into a full variant
=================  =====================  ==================================================================

The dataset is JSON lines ``{"messages": [{"role", "content"}, ...], "completion": "..."}`` (other keys ignored).
Each example is rendered the way the runtime renders a chat request (:func:`slmops.runtime.chat.render_chat` with the
model's own template, BOS not doubled), then the completion is appended as the assistant's turn: the tokens the
template puts after the generation prompt (for gemma3 the text and ``<end_of_turn>``), so the adapter also learns to
stop. Only those tokens are in the loss; prompt and padding tokens are masked (label -100).

The dataset is named by its sha256 (``dataset_sha256``, verified before training): the cache key covers the data and
not the path it happens to be at (``dataset`` is left out of the canonical params). Training is deterministic: the
seed fixes the adapter's initialisation, dropout and batch order, and torch's deterministic algorithms are on, so two
runs on the same machine write identical adapter bytes.

An adapter directory also holds ``base_config.json`` (the base's ``config.json``, which the GGUF LoRA exporter needs)
and :data:`ADAPTER_INFO_FILE` (the base's path and directory digest, the dataset digest and the training report), so
``lora_merge`` finds the base and checks it is the one the adapter was trained on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from slmops.errors import BlueprintError, InvalidModelError, MissingExtraError
from slmops.optimize._files import digest_path, fsync_dir
from slmops.optimize.gguf_metadata import GGUF_METADATA_FILE, import_gguf
from slmops.optimize.hf_load import (
    copy_sidecar_files,
    import_torch,
    import_transformers,
    load_hf_model,
    save_hf_model,
)
from slmops.optimize.passes import Pass, PassParams, PassProgress, register_pass
from slmops.registry.blobstore import hash_file

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_INFO_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "BASE_CONFIG_FILE",
    "ChatExample",
    "ChatFormat",
    "EncodedExample",
    "LoraMerge",
    "LoraMergeParams",
    "LoraParams",
    "LoraTrain",
    "chat_format",
    "directory_digest",
    "encode_examples",
    "file_sha256",
    "load_tokenizer",
    "read_chat_jsonl",
]

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
BASE_CONFIG_FILE = "base_config.json"
ADAPTER_INFO_FILE = "slmops_adapter.json"
IGNORE_INDEX = -100
_SHA256 = re.compile(r"^(sha256:)?[0-9a-f]{64}$")


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ChatExample:
    messages: tuple[dict[str, Any], ...]
    completion: str


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hash_file(Path(path)).digest.removeprefix("sha256:")


def directory_digest(path: Path) -> str:
    """``sha256:`` digest of a directory's (relative path, file digest) list: the optimizer's cache key of an input."""
    return digest_path(Path(path))


def read_chat_jsonl(path: Path, sha256: str | None = None) -> list[ChatExample]:
    """The examples of a chat JSONL file; with ``sha256`` (hex, ``sha256:`` prefix allowed) its bytes are checked."""
    path = Path(path)
    if not path.is_file():
        raise BlueprintError(f"expected a JSONL dataset at {path}, found nothing; export one with `slmops feedback`")
    if sha256 is not None:
        found = file_sha256(path)
        if found != sha256.removeprefix("sha256:"):
            raise BlueprintError(
                f"dataset {path} has sha256 {found}, expected {sha256.removeprefix('sha256:')}; the file changed "
                "since the recipe named it: give the digest of the dataset version you mean"
            )
    examples: list[ChatExample] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            messages = raw["messages"]
            completion = raw["completion"]
            if not isinstance(messages, list) or not messages or not isinstance(completion, str):
                raise TypeError("messages must be a non-empty list and completion a string")
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
                raise TypeError("each message needs a role")
        except (ValueError, KeyError, TypeError) as exc:
            raise BlueprintError(
                f'{path} line {number}: expected {{"messages": [{{"role", "content"}}, ...], '
                f'"completion": "..."}} ({exc})'
            ) from None
        examples.append(ChatExample(tuple(dict(m) for m in messages), completion))
    if not examples:
        raise BlueprintError(f"dataset {path} holds no examples")
    return examples


# ---------------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class ChatFormat:
    """How a model's prompts look: its chat template (None: the runtime's plain fallback) and special-token text."""

    template: str | None
    bos_token: str
    eos_token: str


def _gguf_string(directory: Path, key: str) -> str | None:
    path = directory / GGUF_METADATA_FILE
    if not path.is_file():
        return None
    gguf = import_gguf("reading GGUF metadata")
    field = gguf.GGUFReader(str(path)).fields.get(key)
    return None if field is None else str(field.contents())


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer (transformers): from ``tokenizer.json`` or from the GGUF metadata it came with."""
    transformers = import_transformers("tokenizing a dataset")
    model_dir = Path(model_dir)
    try:
        if (model_dir / "tokenizer.json").is_file():
            return transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        if (model_dir / GGUF_METADATA_FILE).is_file():
            return transformers.AutoTokenizer.from_pretrained(
                str(model_dir), gguf_file=GGUF_METADATA_FILE, local_files_only=True
            )
    except (ValueError, KeyError, OSError) as exc:
        raise InvalidModelError(f"could not load the tokenizer of {model_dir} ({exc})") from None
    raise InvalidModelError(
        f"{model_dir} has neither tokenizer.json nor {GGUF_METADATA_FILE}; training needs the model's tokenizer "
        "(start from a GGUF with hf_from_gguf, or save the tokenizer beside the model)"
    )


def chat_format(model_dir: Path, tokenizer: Any, template: str | None = None) -> ChatFormat:
    """The chat template the runtime would use for this model (``template`` when given, else chat_template.jinja,
    tokenizer_config.json or the GGUF's ``tokenizer.chat_template``), with the tokenizer's BOS and EOS text."""
    model_dir = Path(model_dir)
    if template is not None:
        pass
    elif (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif (model_dir / "tokenizer_config.json").is_file():
        value = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        template = value if isinstance(value, str) else None
    if template is None:
        template = _gguf_string(model_dir, "tokenizer.chat_template")
    return ChatFormat(template, str(tokenizer.bos_token or ""), str(tokenizer.eos_token or ""))


@dataclass(frozen=True)
class EncodedExample:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX on prompt tokens

    @property
    def n_completion(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def split_prompt(fmt: ChatFormat, example: ChatExample) -> tuple[str, str]:
    """(prompt text as the runtime renders it, the text the model should produce after it)."""
    from slmops.runtime.chat import render_chat

    messages = [dict(m) for m in example.messages]
    prompt = render_chat(fmt.template, messages, bos_token=fmt.bos_token, eos_token=fmt.eos_token)
    full = render_chat(
        fmt.template,
        [*messages, {"role": "assistant", "content": example.completion}],
        bos_token=fmt.bos_token,
        eos_token=fmt.eos_token,
        add_generation_prompt=False,
    )
    if full.startswith(prompt) and len(full) > len(prompt):
        # the runtime's plain fallback ends a turn with nothing: EOS tells the model to stop
        return prompt, full[len(prompt) :] + (fmt.eos_token if fmt.template is None else "")
    # templates that render the last assistant turn differently: the completion and EOS after the prompt
    return prompt, (" " if fmt.template is None else "") + example.completion + fmt.eos_token


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and list(tokenizer.encode("a", add_special_tokens=True))[:1] == [bos]


def encode_examples(
    tokenizer: Any, fmt: ChatFormat, examples: Sequence[ChatExample], max_seq_tokens: int
) -> tuple[list[EncodedExample], int]:
    """(encoded examples, number dropped because no completion token fit in ``max_seq_tokens``)."""
    adds_bos = _adds_bos(tokenizer)
    encoded: list[EncodedExample] = []
    dropped = 0
    for example in examples:
        prompt, target = split_prompt(fmt, example)
        prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
        if adds_bos and fmt.bos_token and not prompt.startswith(fmt.bos_token):
            prompt_ids.insert(0, int(tokenizer.bos_token_id))
        target_ids = list(tokenizer.encode(target, add_special_tokens=False))
        ids = (prompt_ids + target_ids)[:max_seq_tokens]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_seq_tokens]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        encoded.append(EncodedExample(tuple(ids), tuple(labels)))
    return encoded, dropped


def _batch(torch: Any, items: Sequence[EncodedExample], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors (batch, seq) for a causal LM; padding is masked out of attention and loss."""
    width = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (batch, seq)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)  # (batch, seq)
    mask = torch.zeros((len(items), width), dtype=torch.long)  # (batch, seq)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id_of(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def _completion_ce(torch: Any, model: Any, batch: dict[str, Any], reduction: str) -> Any:
    """Cross-entropy of the completion tokens, with the output head applied only where a label is scored.

    A model with a 262k-token vocabulary spends most of a full forward pass (and its backward) on logits of prompt
    positions the loss ignores; here the transformer runs on every position and the head only on the scored ones,
    which gives the same loss as ``model(**batch).loss`` (``mean``) for models that expose ``model`` and ``lm_head``
    (llama, qwen2, gemma3), and falls back to the full logits otherwise."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = batch["labels"][:, 1:]  # (batch, seq-1)
    keep = targets != IGNORE_INDEX  # (batch, seq-1)
    inner, head = getattr(base, "model", None), getattr(base, "lm_head", None)
    if inner is None or head is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        scored = logits[:, :-1, :][keep].float()  # (n, vocab)
    else:
        hidden = inner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        scored = head(hidden[:, :-1, :][keep]).float()  # (n, vocab)
        cap = getattr(base.config, "final_logit_softcapping", None)
        if cap:
            scored = torch.tanh(scored / cap) * cap
    return torch.nn.functional.cross_entropy(scored, targets[keep], reduction=reduction)


def completion_loss(torch: Any, model: Any, items: Sequence[EncodedExample], pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy (nats) per completion token over ``items``, without gradients."""
    total = 0.0
    count = 0
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = _batch(torch, items[start : start + batch_size], pad_id)
            total += float(_completion_ce(torch, model, batch, "sum"))
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / max(count, 1)


class deterministic_torch:
    """Seed torch and turn deterministic algorithms on for the block; restore the previous setting after."""

    def __init__(self, torch: Any, seed: int) -> None:
        self.torch = torch
        self.seed = seed
        self.previous = False

    def __enter__(self) -> None:
        self.previous = bool(self.torch.are_deterministic_algorithms_enabled())
        self.torch.use_deterministic_algorithms(True)
        self.torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        self.torch.use_deterministic_algorithms(self.previous)


def _write_dir_atomically(directory: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temp)`` on a fresh sibling directory, fsync its files and rename it to ``directory``."""
    temp = directory.with_name(f".{directory.name}.tmp")
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    write(temp)
    for path in temp.iterdir():
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(temp)
    os.replace(temp, directory)
    fsync_dir(directory.parent)


@contextlib.contextmanager
def _peft_warnings() -> Iterator[None]:
    """peft still reads transformers' deprecated ``is_gradient_checkpointing``; that warning is not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _import_peft(purpose: str) -> Any:
    try:
        import peft
    except ImportError:
        raise MissingExtraError("optimize", purpose, "peft") from None
    return peft


# ---------------------------------------------------------------------------------------------- lora


def _sha256_field(value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError(f"expected a sha256 hex digest (64 lower-case hex digits), got {value!r}")
    return value.removeprefix("sha256:")


class LoraParams(PassParams):
    dataset: str = Field(description="path of the train.jsonl (chat messages + completion per line)")
    dataset_sha256: str = Field(description="sha256 of the dataset file; verified, and what the cache key uses")
    rank: int = Field(default=8, gt=0)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = Field(default=("q_proj", "v_proj"), min_length=1)
    steps: int = Field(default=100, gt=0)
    learning_rate: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=4, gt=0)
    max_seq_tokens: int = Field(default=256, gt=1)
    seed: int = 0
    chat_template: str | None = Field(
        default=None,
        description="Jinja chat template text the runtime uses for this model (the manifest's), when the model "
        "files carry none (gemma3-270m's GGUF does not)",
    )

    @field_validator("dataset_sha256")
    @classmethod
    def _digest(cls, value: str) -> str:
        return _sha256_field(value)


@register_pass
class LoraTrain(Pass[LoraParams]):
    """Train a LoRA adapter with peft on the completions of a chat dataset (CPU, deterministic)."""

    name = "lora"
    version = 2  # 2: the output head runs only on the scored positions (same loss, other float rounding)
    input_format = "safetensors"
    output_format = "safetensors"
    params_model = LoraParams
    description = "train a LoRA adapter (peft) on a chat JSONL dataset, completion tokens only"

    def canonical_params(self, params: LoraParams) -> dict[str, Any]:
        canonical = params.model_dump(mode="json")
        canonical.pop("dataset")  # named by its digest: the same data at another path is the same step
        return canonical

    def variant_label(self, params: LoraParams) -> str:
        return f"lora-r{params.rank}"

    def output_path(self, workdir: Path, params: LoraParams) -> Path:
        return workdir / "adapter"

    def apply(self, input_path: Path, params: LoraParams, output: Path, progress: PassProgress) -> dict[str, Any]:
        torch = import_torch("training a LoRA adapter")
        peft = _import_peft("training a LoRA adapter")
        started = time.monotonic()
        examples = read_chat_jsonl(Path(params.dataset), params.dataset_sha256)
        tokenizer = load_tokenizer(input_path)
        fmt = chat_format(input_path, tokenizer, params.chat_template)
        encoded, dropped = encode_examples(tokenizer, fmt, examples, params.max_seq_tokens)
        if not encoded:
            raise BlueprintError(
                f"no example of {params.dataset} has a completion token within max_seq_tokens="
                f"{params.max_seq_tokens}; raise max_seq_tokens or shorten the prompts"
            )
        pad_id = pad_id_of(tokenizer)
        base_digest = directory_digest(input_path)
        with deterministic_torch(torch, params.seed):
            model = load_hf_model(input_path)
            available = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            missing = [m for m in params.target_modules if m not in available]
            if missing:
                raise BlueprintError(
                    f"target_modules {missing} are not modules of this {model.config.model_type} model; "
                    f"linear layers it has: {', '.join(sorted(_linear_names(torch, model)))}"
                )
            config = peft.LoraConfig(
                r=params.rank,
                lora_alpha=params.alpha,
                lora_dropout=params.dropout,
                target_modules=list(params.target_modules),
                bias="none",
                task_type="CAUSAL_LM",
            )
            with _peft_warnings():
                model = peft.get_peft_model(model, config)
            probe = encoded[: min(len(encoded), 64)]
            model.eval()
            loss_before = completion_loss(torch, model, probe, pad_id, params.batch_size)
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=0.0)
            order = torch.Generator().manual_seed(params.seed)
            queue: list[int] = []
            step_losses: list[float] = []
            tokens = 0
            model.train()
            for step in range(params.steps):
                picked: list[EncodedExample] = []
                while len(picked) < min(params.batch_size, len(encoded)):
                    if not queue:
                        queue = [int(i) for i in torch.randperm(len(encoded), generator=order)]
                    picked.append(encoded[queue.pop(0)])
                batch = _batch(torch, picked, pad_id)
                loss = _completion_ce(torch, model, batch, "mean")  # mean over completion tokens
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise InvalidModelError(
                        f"the LoRA loss became {value} at step {step}; lower learning_rate ({params.learning_rate})"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step_losses.append(value)
                tokens += int(batch["attention_mask"].sum())
                progress(step + 1, params.steps)
            model.eval()
            loss_after = completion_loss(torch, model, probe, pad_id, params.batch_size)
        n_trainable = sum(int(p.numel()) for p in trainable)
        report: dict[str, Any] = {
            "examples": len(encoded),
            "examples_dropped": dropped,
            "steps": params.steps,
            "tokens": tokens,
            "completion_tokens": sum(e.n_completion for e in encoded),
            "loss_start": loss_before,
            "loss_end": loss_after,
            "loss_measured_on": f"{len(probe)} training examples, mean nats per completion token",
            "step_loss_first": step_losses[0],
            "step_loss_last": step_losses[-1],
            "trainable_params": n_trainable,
            "base_params": sum(int(p.numel()) for p in model.parameters()) - n_trainable,
            "rank": params.rank,
            "alpha": params.alpha,
            "target_modules": list(params.target_modules),
            "chat_template": "model" if fmt.template else "fallback",
            "base_digest": base_digest,
            "dataset_sha256": params.dataset_sha256.removeprefix("sha256:"),
        }
        info = {
            "type": "lora",
            "base_path": str(Path(input_path).resolve()),
            "base_digest": base_digest,
            "base_model_type": str(model.config.model_type),
            "dataset_sha256": report["dataset_sha256"],
            "rank": params.rank,
            "alpha": params.alpha,
            "target_modules": list(params.target_modules),
        }

        def write(temp: Path) -> None:
            model.save_pretrained(str(temp), safe_serialization=True)
            (temp / "README.md").unlink(missing_ok=True)  # peft's model card: nothing we need
            shutil.copyfile(Path(input_path) / "config.json", temp / BASE_CONFIG_FILE)
            (temp / ADAPTER_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")

        _write_dir_atomically(output, write)
        report["adapter_bytes"] = (output / ADAPTER_WEIGHTS_FILE).stat().st_size
        report["wall_s"] = round(time.monotonic() - started, 3)
        return report


def _linear_names(torch: Any, model: Any) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def read_adapter_info(adapter_dir: Path) -> dict[str, Any]:
    """The :data:`ADAPTER_INFO_FILE` of an adapter directory written by the ``lora`` pass."""
    path = Path(adapter_dir) / ADAPTER_INFO_FILE
    for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE):
        if not (Path(adapter_dir) / name).is_file():
            raise InvalidModelError(
                f"expected a peft adapter directory with {name} at {adapter_dir}, found none; the lora pass writes one"
            )
    if not path.is_file():
        raise InvalidModelError(
            f"{adapter_dir} has no {ADAPTER_INFO_FILE}, so its base is unknown; give the base with the `base` parameter"
        )
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise InvalidModelError(f"{path}: expected a JSON object")
    return value


# ---------------------------------------------------------------------------------------------- merge


class LoraMergeParams(PassParams):
    base: str | None = Field(
        default=None, description="the base model directory; default: the one the adapter records (digest checked)"
    )


@register_pass
class LoraMerge(Pass[LoraMergeParams]):
    """Merge a peft LoRA adapter into its base: W + (alpha / r) · B·A, a full float32 model."""

    name = "lora_merge"
    input_format = "safetensors"
    output_format = "safetensors"
    params_model = LoraMergeParams
    description = "merge a LoRA adapter into its base model (a full variant)"

    def variant_label(self, params: LoraMergeParams) -> str:
        return "merged"

    def apply(self, input_path: Path, params: LoraMergeParams, output: Path, progress: PassProgress) -> dict[str, Any]:
        torch = import_torch("merging a LoRA adapter")
        peft = _import_peft("merging a LoRA adapter")
        info = read_adapter_info(input_path)
        base = Path(params.base) if params.base is not None else Path(str(info["base_path"]))
        if not (base / "config.json").is_file():
            raise InvalidModelError(
                f"the adapter's base model is not at {base} (no config.json); give its directory with the `base` "
                "parameter"
            )
        progress(0, 3)
        found = directory_digest(base)
        if found != info.get("base_digest"):
            raise InvalidModelError(
                f"the model at {base} has digest {found}, but the adapter was trained on {info.get('base_digest')}; "
                "merge it into the base it was trained on"
            )
        model = load_hf_model(base)
        progress(1, 3)
        with torch.no_grad():
            before = {name: p.detach().clone() for name, p in model.named_parameters()}
            with _peft_warnings():
                merged = peft.PeftModel.from_pretrained(model, str(input_path)).merge_and_unload()
            changed = 0
            largest = 0.0
            for name, p in merged.named_parameters():
                if name in before and not torch.equal(before[name], p):
                    changed += 1
                    largest = max(largest, float((p - before[name]).abs().max()))
        progress(2, 3)
        save_hf_model(merged, output)
        copy_sidecar_files(base, output)
        progress(3, 3)
        return {
            "base_digest": found,
            "tensors_changed": changed,
            "max_abs_delta": largest,
            "params": sum(int(p.numel()) for p in merged.parameters()),
        }
