"""Knowledge distillation: a pruned copy of a teacher trained to match the teacher's logits, on the CPU.

``distill`` (safetensors → safetensors) makes the student from its input, the teacher:

- **depth**: whole decoder layers dropped (``drop_layers``, or ``keep_every`` = keep layers 0, k, 2k, ...). The
  student is rebuilt from the teacher's config with fewer layers; gemma3's layer types are reset to llama.cpp's fixed
  pattern (every sixth layer global) so the student stays exportable, which changes the attention span and rotary
  base of some kept layers: distillation has to make up for that too;
- **width**: attention heads or MLP channels removed by L2 norm (``width_sparsity``, ``width_target``), with the
  ``prune_struct`` operation.

It is then trained (all weights, AdamW) to minimise ``T² · KL(teacher_T ‖ student_T)`` on temperature-``T``
distributions at every non-padding position, plus ``ce_weight`` × the next-token cross-entropy, over sequences from a
chat JSONL dataset (``dataset`` + ``dataset_sha256``, prompt and completion rendered as in the ``lora`` pass) or, with
no dataset, ``synthetic_sequences`` sampled from the teacher itself (seeded: the same every run).

The report measures perplexity with :func:`slmops.optimize.torch_ops.torch_perplexity` (the same chunking as the
llama.cpp evaluation) on a held-out text (``eval_text``, the shipped ``builtin:eval.txt`` by default) for the
teacher, the pruned student before training and the student after, and
``recovery = (ppl_pruned - ppl_distilled) / (ppl_pruned - ppl_teacher)``: 1 means distillation won back all that
pruning lost, 0 nothing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from slmops.errors import BlueprintError, InvalidModelError
from slmops.optimize.hf_load import copy_sidecar_files, import_torch, import_transformers, load_hf_model, save_hf_model
from slmops.optimize.lora import (
    _sha256_field,
    chat_format,
    deterministic_torch,
    encode_examples,
    load_tokenizer,
    pad_id_of,
    read_chat_jsonl,
)
from slmops.optimize.passes import Pass, PassParams, PassProgress, register_pass

__all__ = ["Distill", "DistillParams", "drop_layers", "kept_layers"]

_GEMMA3_SWA_PERIOD = 6


class DistillParams(PassParams):
    drop_layers: tuple[int, ...] = Field(default=(), description="decoder layers to drop (0-based)")
    keep_every: int | None = Field(default=None, gt=1, description="keep layers 0, k, 2k, ... (instead of drop_layers)")
    width_sparsity: float | None = Field(default=None, gt=0, lt=1, description="fraction of heads / MLP channels")
    width_target: Literal["heads", "mlp"] = "mlp"
    temperature: float = Field(default=2.0, gt=0)
    ce_weight: float = Field(default=0.0, ge=0, description="weight of the next-token cross-entropy term")
    steps: int = Field(default=100, gt=0)
    learning_rate: float = Field(default=1e-4, gt=0)
    batch_size: int = Field(default=4, gt=0)
    max_seq_tokens: int = Field(default=128, gt=1)
    dataset: str | None = Field(default=None, description="chat JSONL of training sequences; default: synthetic")
    dataset_sha256: str | None = None
    synthetic_sequences: int = Field(default=32, gt=0)
    synthetic_tokens: int = Field(default=48, gt=1)
    eval_text: str = Field(default="builtin:eval.txt", description="held-out text for perplexity: builtin:NAME or path")
    eval_max_tokens: int = Field(default=1024, gt=1)
    eval_context_tokens: int = Field(default=256, gt=1)
    seed: int = 0

    @field_validator("dataset_sha256")
    @classmethod
    def _digest(cls, value: str | None) -> str | None:
        return None if value is None else _sha256_field(value)

    @model_validator(mode="after")
    def _consistent(self) -> DistillParams:
        if self.drop_layers and self.keep_every is not None:
            raise ValueError("give drop_layers or keep_every, not both")
        if not self.drop_layers and self.keep_every is None and self.width_sparsity is None:
            raise ValueError("nothing to prune: give drop_layers, keep_every or width_sparsity")
        if (self.dataset is None) != (self.dataset_sha256 is None):
            raise ValueError("dataset and dataset_sha256 go together")
        return self


def kept_layers(n_layers: int, params: DistillParams) -> list[int]:
    """The teacher's layers the student keeps, in order."""
    if params.keep_every is not None:
        return list(range(0, n_layers, params.keep_every))
    bad = [i for i in params.drop_layers if not 0 <= i < n_layers]
    if bad:
        raise BlueprintError(f"drop_layers {bad} are not layers of a {n_layers}-layer model (0..{n_layers - 1})")
    kept = [i for i in range(n_layers) if i not in set(params.drop_layers)]
    if not kept:
        raise BlueprintError("drop_layers would drop every layer; keep at least one")
    return kept


def drop_layers(model: Any, keep: list[int]) -> tuple[Any, bool]:
    """(a new model with only the decoder layers ``keep`` of ``model``, whether gemma3 layer types were reset)."""
    torch = import_torch("dropping decoder layers")
    transformers = import_transformers("dropping decoder layers")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(keep)
    reset = False
    layer_types = list(getattr(model.config, "layer_types", None) or [])
    if layer_types:
        if config.model_type in ("gemma3_text", "gemma3"):
            config.layer_types = [
                "full_attention" if (i + 1) % _GEMMA3_SWA_PERIOD == 0 else "sliding_attention" for i in range(len(keep))
            ]
            reset = config.layer_types != [layer_types[i] for i in keep]
        else:
            config.layer_types = [layer_types[i] for i in keep]
    student = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state: dict[str, Any] = {}
    for name, value in model.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            if int(index) not in keep:
                continue
            name = f"model.layers.{keep.index(int(index))}.{rest}"
        state[name] = value.clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise InvalidModelError(
            f"the depth-pruned student does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    student.tie_weights()
    return student, reset


def _synthetic(torch: Any, teacher: Any, n: int, length: int, bos: int | None, seed: int) -> Any:
    """``n`` sequences of ``length`` tokens sampled from the teacher (temperature 1), seeded; (n, length)."""
    generator = torch.Generator().manual_seed(seed)
    vocab = int(teacher.config.vocab_size)
    if bos is not None:
        ids = torch.full((n, 1), bos, dtype=torch.long)
    else:
        ids = torch.randint(0, vocab, (n, 1), generator=generator)
    with torch.no_grad():
        for _ in range(length - 1):
            logits = teacher(input_ids=ids).logits[:, -1, :].float()  # (n, vocab)
            probs = torch.softmax(logits, dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


def _eval_tokens(tokenizer: Any, params: DistillParams) -> list[int]:
    from slmops.optimize._data import read_text

    tokens = list(tokenizer.encode(read_text(params.eval_text), add_special_tokens=False))[: params.eval_max_tokens]
    if len(tokens) < params.eval_context_tokens:
        raise BlueprintError(
            f"the eval text gave {len(tokens)} tokens, fewer than eval_context_tokens={params.eval_context_tokens}; "
            "use a longer text or a smaller eval_context_tokens"
        )
    return tokens


@register_pass
class Distill(Pass[DistillParams]):
    """Prune the input (depth or width) and distill the teacher's logits into the smaller student."""

    name = "distill"
    input_format = "safetensors"
    output_format = "safetensors"
    params_model = DistillParams
    description = "depth/width-pruned student trained on the teacher's logits (KL + optional CE)"

    def canonical_params(self, params: DistillParams) -> dict[str, Any]:
        canonical = params.model_dump(mode="json")
        canonical.pop("dataset")  # named by dataset_sha256
        return canonical

    def variant_label(self, params: DistillParams) -> str:
        parts = ["distill"]
        if params.keep_every is not None:
            parts.append(f"k{params.keep_every}")
        elif params.drop_layers:
            parts.append(f"d{len(params.drop_layers)}")
        if params.width_sparsity is not None:
            parts.append(f"{params.width_target}{round(params.width_sparsity * 100)}")
        return "-".join(parts)

    def apply(self, input_path: Path, params: DistillParams, output: Path, progress: PassProgress) -> dict[str, Any]:
        torch = import_torch("distilling a model")
        from slmops.optimize.torch_ops import structured_prune, torch_perplexity

        started = time.monotonic()
        tokenizer = load_tokenizer(input_path)
        bos = tokenizer.bos_token_id
        eval_tokens = _eval_tokens(tokenizer, params)
        pad_id = pad_id_of(tokenizer)

        def ppl(model: Any) -> float:
            return torch_perplexity(model, eval_tokens, context_tokens=params.eval_context_tokens, bos=bos)[0]

        with deterministic_torch(torch, params.seed):
            teacher = load_hf_model(input_path)
            for p in teacher.parameters():
                p.requires_grad_(False)
            n_layers = int(teacher.config.num_hidden_layers)
            keep = kept_layers(n_layers, params) if (params.drop_layers or params.keep_every) else list(range(n_layers))
            student, reset = drop_layers(teacher, keep) if len(keep) < n_layers else (load_hf_model(input_path), False)
            width: dict[str, Any] | None = None
            if params.width_sparsity is not None:
                student, structured = structured_prune(student, params.width_sparsity, target=params.width_target)
                width = {"target": params.width_target, "sparsity": params.width_sparsity, **structured.to_json()}
            if params.dataset is not None:
                fmt = chat_format(input_path, tokenizer)
                examples = read_chat_jsonl(Path(params.dataset), params.dataset_sha256)
                encoded, _ = encode_examples(tokenizer, fmt, examples, params.max_seq_tokens)
                rows = [list(e.input_ids) for e in encoded]
                source = f"dataset sha256:{params.dataset_sha256}"
            else:
                sampled = _synthetic(
                    torch, teacher, params.synthetic_sequences, params.synthetic_tokens, bos, params.seed
                )
                rows = [list(map(int, row)) for row in sampled]
                source = f"{len(rows)} sequences of {params.synthetic_tokens} tokens sampled from the teacher"
            if not rows:
                raise BlueprintError("the distillation set is empty; give a dataset with examples")
            ppl_teacher = ppl(teacher)
            student.eval()
            ppl_pruned = ppl(student)
            optimizer = torch.optim.AdamW(student.parameters(), lr=params.learning_rate, weight_decay=0.0)
            order = torch.Generator().manual_seed(params.seed)
            queue: list[int] = []
            losses: list[float] = []
            t = params.temperature
            student.train()
            for step in range(params.steps):
                picked: list[list[int]] = []
                while len(picked) < min(params.batch_size, len(rows)):
                    if not queue:
                        queue = [int(i) for i in torch.randperm(len(rows), generator=order)]
                    picked.append(rows[queue.pop(0)])
                width_tokens = max(len(r) for r in picked)
                ids = torch.full((len(picked), width_tokens), pad_id, dtype=torch.long)  # (batch, seq)
                mask = torch.zeros((len(picked), width_tokens), dtype=torch.long)  # (batch, seq)
                for i, row in enumerate(picked):
                    ids[i, : len(row)] = torch.tensor(row)
                    mask[i, : len(row)] = 1
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits.float()  # (b, s, vocab)
                student_logits = student(input_ids=ids, attention_mask=mask).logits.float()  # (b, s, vocab)
                valid = mask.bool()  # (b, s)
                log_p_teacher = torch.log_softmax(teacher_logits[valid] / t, dim=-1)  # (n, vocab)
                log_p_student = torch.log_softmax(student_logits[valid] / t, dim=-1)  # (n, vocab)
                kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean() * t * t
                loss = kl
                if params.ce_weight > 0:
                    targets = ids[:, 1:].masked_fill(~valid[:, 1:], -100)  # (b, s-1)
                    ce = torch.nn.functional.cross_entropy(
                        student_logits[:, :-1].reshape(-1, student_logits.shape[-1]),
                        targets.reshape(-1),
                        ignore_index=-100,
                    )
                    loss = loss + params.ce_weight * ce
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise InvalidModelError(f"the distillation loss became {value} at step {step}; lower learning_rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(value)
                progress(step + 1, params.steps)
            student.eval()
            ppl_distilled = ppl(student)
        for p in student.parameters():
            p.requires_grad_(True)
        save_hf_model(student, output)
        copy_sidecar_files(input_path, output)
        gap = ppl_pruned - ppl_teacher
        return {
            "teacher_params": sum(int(p.numel()) for p in teacher.parameters()),
            "student_params": sum(int(p.numel()) for p in student.parameters()),
            "teacher_layers": n_layers,
            "kept_layers": keep,
            "layer_types_reset": reset,
            "width": width,
            "training_data": source,
            "steps": params.steps,
            "loss_first": losses[0],
            "loss_last": losses[-1],
            "ppl_teacher": ppl_teacher,
            "ppl_pruned": ppl_pruned,
            "ppl_distilled": ppl_distilled,
            "recovery": (ppl_pruned - ppl_distilled) / gap if gap > 0 else None,
            "ppl_measured_on": f"{len(eval_tokens)} tokens of {params.eval_text}, {params.eval_context_tokens}-token "
            "chunks, second halves scored (torch)",
            "wall_s": round(time.monotonic() - started, 3),
        }
