"""Weight transforms on an in-memory transformers causal LM: int8 weight-only, magnitude pruning, structured
pruning of attention heads and MLP channels, and N:M (2:4) semi-structured sparsity as masks.

No I/O here: functions take a model, change its weights in place (or return a rebuilt model when shapes change) and
return a frozen report of what they did, measured on the result. torch is imported lazily.

What is pruned or quantized: the ``nn.Linear`` weights inside the decoder blocks (attention q/k/v/o and MLP
gate/up/down projections). Embeddings, the output head and norms are left alone: they are shared (tied) or tiny,
and pruning them costs far more quality than it saves.

On CPU, 2:4 sparsity is applied and measured with masks (zeros in dense tensors): PyTorch's semi-structured sparse
kernels run only on CUDA, and llama.cpp has no sparse tensor type, so a masked model is as large and as fast as its
parent; structured pruning with ``mode="remove"`` is what makes a model smaller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from slmops.errors import InvalidModelError

__all__ = [
    "Int8Report",
    "Int8TensorError",
    "SparsityReport",
    "StructuredReport",
    "TensorSparsity",
    "magnitude_prune",
    "measure_sparsity",
    "prunable_linears",
    "quantize_int8_weight_only",
    "semi_structured_prune",
    "structured_prune",
    "torch_perplexity",
]

Progress = Callable[[float, float], None]
PruneScope = Literal["global", "per_layer"]
StructuredTarget = Literal["heads", "mlp"]
StructuredMode = Literal["remove", "mask"]
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _no_progress(done: float, total: float) -> None:
    return None


@dataclass(frozen=True)
class TensorSparsity:
    name: str
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Zeros per targeted tensor, measured after the transform; ``overall`` is over the targeted tensors."""

    tensors: tuple[TensorSparsity, ...]
    model_params: int

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def zeros(self) -> int:
        return sum(t.zeros for t in self.tensors)

    @property
    def overall(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "overall_sparsity": self.overall,
            "targeted_params": self.numel,
            "zero_params": self.zeros,
            "model_params": self.model_params,
            "model_sparsity": self.zeros / self.model_params if self.model_params else 0.0,
            "per_tensor": {t.name: round(t.sparsity, 6) for t in self.tensors},
        }


@dataclass(frozen=True)
class Int8TensorError:
    name: str
    numel: int
    max_abs_error: float
    relative_rms_error: float


@dataclass(frozen=True)
class Int8Report:
    tensors: tuple[Int8TensorError, ...]
    bytes_before: int
    bytes_after: int

    def to_json(self) -> dict[str, Any]:
        return {
            "method": "per-output-channel symmetric int8, weight-only; evaluated with dequantized weights",
            "quantized_tensors": len(self.tensors),
            "bytes_float32": self.bytes_before,
            "bytes_int8_with_scales": self.bytes_after,
            "max_relative_rms_error": max((t.relative_rms_error for t in self.tensors), default=0.0),
            "per_tensor_relative_rms_error": {t.name: round(t.relative_rms_error, 6) for t in self.tensors},
        }


@dataclass(frozen=True)
class StructuredReport:
    target: StructuredTarget
    mode: StructuredMode
    removed: dict[int, tuple[int, ...]]  # layer -> removed head or channel indices (in the parent's numbering)
    units_before: int  # per layer: query heads or MLP channels
    units_after: int
    params_before: int
    params_after: int
    sparsity: SparsityReport = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "mode": self.mode,
            "units_per_layer_before": self.units_before,
            "units_per_layer_after": self.units_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "removed": {str(layer): list(units) for layer, units in self.removed.items()},
            **self.sparsity.to_json(),
        }


def prunable_linears(model: Any) -> list[tuple[str, Any]]:
    """(parameter name, weight) of every decoder-block projection, in model order."""
    result = []
    for name, param in model.named_parameters():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _PROJECTIONS and param.dim() == 2:
            result.append((name, param))
    if not result:
        raise InvalidModelError(
            f"expected a decoder with {'/'.join(_PROJECTIONS)} projections, found none in {type(model).__name__}; "
            "the torch passes support llama-, qwen2- and gemma3-style models"
        )
    return result


def measure_sparsity(model: Any) -> SparsityReport:
    tensors = tuple(
        TensorSparsity(name, int(w.numel()), int((w == 0).sum().item())) for name, w in prunable_linears(model)
    )
    return SparsityReport(tensors, sum(int(p.numel()) for p in model.parameters()))


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def magnitude_prune(
    model: Any, sparsity: float, *, scope: PruneScope = "global", progress: Progress = _no_progress
) -> SparsityReport:
    """Zero the smallest-magnitude weights of the decoder projections, in place.

    ``global``: one threshold over all targeted weights, so layers end up with different sparsities;
    ``per_layer``: each tensor gets ``sparsity`` itself. Exactly ``round(sparsity * n)`` weights are zeroed (ties at
    the threshold are broken by position), so the achieved sparsity equals the target up to rounding.
    """
    import torch

    _check_fraction("sparsity", sparsity)
    linears = prunable_linears(model)
    with torch.no_grad():
        if scope == "per_layer":
            for index, (_, weight) in enumerate(linears):
                flat = weight.view(-1)  # (out * in,)
                k = round(sparsity * flat.numel())
                if k:
                    drop = torch.topk(flat.abs(), k, largest=False, sorted=False).indices  # (k,)
                    flat[drop] = 0.0
                progress(index + 1, len(linears))
        elif scope == "global":
            total = sum(int(w.numel()) for _, w in linears)
            k = round(sparsity * total)
            if k:
                scores = torch.cat([w.detach().abs().view(-1) for _, w in linears])  # (total,)
                threshold = torch.kthvalue(scores, k).values
                del scores
                budget = k - sum(int((w.abs() < threshold).sum().item()) for _, w in linears)  # ties to take
                for index, (_, weight) in enumerate(linears):
                    magnitude = weight.abs()  # (out, in)
                    drop = magnitude < threshold
                    if budget > 0:
                        ties = (magnitude == threshold).view(-1).nonzero().view(-1)  # (n_ties,)
                        take = ties[:budget]
                        drop.view(-1)[take] = True
                        budget -= int(take.numel())
                    weight.masked_fill_(drop, 0.0)
                    progress(index + 1, len(linears))
        else:
            raise ValueError(f"scope must be 'global' or 'per_layer', got {scope!r}")
    return measure_sparsity(model)


def semi_structured_prune(model: Any, *, n: int = 2, m: int = 4, progress: Progress = _no_progress) -> SparsityReport:
    """N:M sparsity as masks, in place: in every group of ``m`` consecutive weights along the input dimension, keep
    the ``n`` largest in magnitude and zero the rest (2:4 by default). Every targeted tensor must have an input
    dimension divisible by ``m``."""
    import torch

    if not 0 < n < m:
        raise ValueError(f"need 0 < n < m, got n={n}, m={m}")
    linears = prunable_linears(model)
    for name, weight in linears:
        if weight.shape[1] % m:
            raise InvalidModelError(
                f"{n}:{m} sparsity needs input dimensions divisible by {m}; {name} has shape {tuple(weight.shape)}"
            )
    with torch.no_grad():
        for index, (_, weight) in enumerate(linears):
            rows, cols = weight.shape
            groups = weight.view(rows, cols // m, m)  # (out, in/m, m)
            keep = torch.topk(groups.abs(), n, dim=-1).indices  # (out, in/m, n)
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)  # (out, in/m, m)
            groups.masked_fill_(~mask, 0.0)
            progress(index + 1, len(linears))
    return measure_sparsity(model)


def quantize_int8_weight_only(model: Any, *, progress: Progress = _no_progress) -> tuple[Int8Report, dict[str, Any]]:
    """Per-output-channel symmetric int8 quantization of the decoder projections.

    The model's weights are replaced in place by their dequantized values (``int8 * scale``), so evaluating the
    model measures exactly what the int8 weights give. Returns the report and the tensors to store: the model's
    state dict with each quantized weight as int8 plus a float32 ``<name>.int8_scale`` of shape (out, 1).
    """
    import torch

    from slmops.optimize.hf_load import INT8_SCALE_SUFFIX

    linears = prunable_linears(model)
    quantized: dict[str, tuple[Any, Any]] = {}
    errors = []
    with torch.no_grad():
        for index, (name, weight) in enumerate(linears):
            original = weight.detach().clone()  # (out, in)
            scale = original.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # (out, 1)
            q = torch.clamp(torch.round(original / scale), -127, 127).to(torch.int8)  # (out, in)
            dequantized = q.to(torch.float32) * scale  # (out, in)
            weight.copy_(dequantized)
            diff = dequantized - original
            rms = float(original.pow(2).mean().sqrt().item())
            errors.append(
                Int8TensorError(
                    name,
                    int(original.numel()),
                    float(diff.abs().max().item()),
                    float(diff.pow(2).mean().sqrt().item()) / rms if rms else 0.0,
                )
            )
            quantized[name] = (q, scale.to(torch.float32))
            progress(index + 1, len(linears))
    tensors: dict[str, Any] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    bytes_before = bytes_after = 0
    for name, value in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # shared with the embedding; safetensors stores it once
        if name in quantized:
            q, scale = quantized[name]
            tensors[name] = q.contiguous()
            tensors[name + INT8_SCALE_SUFFIX] = scale.contiguous()
            bytes_before += value.numel() * 4
            bytes_after += q.numel() + scale.numel() * 4
        else:
            tensors[name] = value.detach().contiguous()
    return Int8Report(tuple(errors), bytes_before, bytes_after), tensors


def _layer_modules(model: Any) -> list[Any]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise InvalidModelError(
            f"expected a decoder at model.model.layers, found none in {type(model).__name__}; "
            "structured pruning supports llama-, qwen2- and gemma3-style models"
        )
    return list(layers)


def _rebuild(model: Any, config: Any, state: dict[str, Any]) -> Any:
    """A new model of the same class for ``config`` (new shapes), loaded with ``state``."""
    import torch

    rebuilt = type(model)(config).to(torch.float32)
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    missing = [name for name in missing if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise InvalidModelError(f"structured pruning produced mismatched weights: {missing[:3]} {unexpected[:3]}")
    rebuilt.tie_weights()
    rebuilt.eval()
    return rebuilt


@dataclass(frozen=True)
class _UnitLayout:
    """A layer's prunable units: ``units`` query heads or MLP channels, in ``n_groups`` groups of ``group`` (one
    group per key/value head; all channels are one group)."""

    target: StructuredTarget
    units: int
    group: int
    n_groups: int
    head_dim: int = 0  # heads only


def _unit_layout(config: Any, target: StructuredTarget) -> _UnitLayout:
    if target == "mlp":
        units = int(config.intermediate_size)
        return _UnitLayout(target, units, group=units, n_groups=1)
    if target == "heads":
        n_head, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
        return _UnitLayout(target, n_head, group=n_head // n_kv, n_groups=n_kv, head_dim=head_dim)
    raise ValueError(f"target must be 'heads' or 'mlp', got {target!r}")


def _unit_scores(layer: Any, layout: _UnitLayout) -> Any:
    """The L2 norm of each unit's weights in one decoder layer: (units,)."""
    if layout.target == "mlp":
        mlp = layer.mlp
        return (  # (intermediate,)
            mlp.gate_proj.weight.pow(2).sum(1) + mlp.up_proj.weight.pow(2).sum(1) + mlp.down_proj.weight.pow(2).sum(0)
        ).sqrt()
    attn = layer.self_attn
    q = attn.q_proj.weight.view(layout.units, layout.head_dim, -1)  # (heads, head_dim, hidden)
    o = attn.o_proj.weight.view(attn.o_proj.weight.shape[0], layout.units, layout.head_dim)  # (hidden, heads, head_dim)
    return (q.pow(2).sum((1, 2)) + o.pow(2).sum((0, 2))).sqrt()  # (heads,)


def _lowest_per_group(score: Any, layout: _UnitLayout, per_group: int) -> tuple[int, ...]:
    """The ``per_group`` lowest-scoring units of every group, as sorted indices into the layer's units."""
    import torch

    drop: list[int] = []
    for g in range(layout.n_groups):
        members = score[g * layout.group : (g + 1) * layout.group]  # (group,)
        lowest = torch.topk(members, per_group, largest=False).indices if per_group else members[:0].long()
        drop.extend(sorted(int(i) + g * layout.group for i in lowest))
    return tuple(drop)


def _mask_units(layer: Any, layout: _UnitLayout, drop: tuple[int, ...]) -> None:
    """Zero the weights of the units ``drop`` in one layer, in place."""
    import torch

    idx = torch.tensor(drop)
    if layout.target == "mlp":
        layer.mlp.gate_proj.weight[idx, :] = 0.0
        layer.mlp.up_proj.weight[idx, :] = 0.0
        layer.mlp.down_proj.weight[:, idx] = 0.0
        return
    attn = layer.self_attn
    q_rows = attn.q_proj.weight.view(layout.units, layout.head_dim, -1)  # (heads, head_dim, hidden)
    q_rows[idx] = 0.0
    if attn.q_proj.bias is not None:
        attn.q_proj.bias.view(layout.units, layout.head_dim)[idx] = 0.0
    attn.o_proj.weight.view(-1, layout.units, layout.head_dim)[:, idx] = 0.0


def _remove_units(state: dict[str, Any], removed: dict[int, tuple[int, ...]], layout: _UnitLayout) -> None:
    """Cut the removed units' rows and columns out of a state dict, in place."""
    import torch

    for index, dropped in removed.items():
        keep = torch.tensor([u for u in range(layout.units) if u not in set(dropped)])  # (units_after,)
        prefix = f"model.layers.{index}."
        if layout.target == "mlp":
            for proj in ("gate_proj", "up_proj"):
                state[f"{prefix}mlp.{proj}.weight"] = state[f"{prefix}mlp.{proj}.weight"][keep]
            state[f"{prefix}mlp.down_proj.weight"] = state[f"{prefix}mlp.down_proj.weight"][:, keep]
            continue
        head_dim = layout.head_dim
        rows = (keep[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)  # (kept * head_dim,)
        state[f"{prefix}self_attn.q_proj.weight"] = state[f"{prefix}self_attn.q_proj.weight"][rows]
        if f"{prefix}self_attn.q_proj.bias" in state:
            state[f"{prefix}self_attn.q_proj.bias"] = state[f"{prefix}self_attn.q_proj.bias"][rows]
        state[f"{prefix}self_attn.o_proj.weight"] = state[f"{prefix}self_attn.o_proj.weight"][:, rows]


def _shrunk_config(config: Any, layout: _UnitLayout, units_after: int) -> Any:
    """A copy of ``config`` with ``units_after`` MLP channels or query heads per layer."""
    new_config = type(config).from_dict(config.to_dict())
    if layout.target == "mlp":
        new_config.intermediate_size = units_after
    else:
        new_config.num_attention_heads = units_after
        new_config.head_dim = layout.head_dim  # keep it explicit: hidden_size // heads no longer gives it
    return new_config


def structured_prune(
    model: Any,
    sparsity: float,
    *,
    target: StructuredTarget = "mlp",
    mode: StructuredMode = "remove",
    progress: Progress = _no_progress,
) -> tuple[Any, StructuredReport]:
    """Prune whole attention heads or MLP channels, ranked per layer by the L2 norm of their weights.

    ``mlp``: channel j of a layer is row j of gate/up and column j of down; ``round(sparsity * intermediate)``
    channels go in every layer. ``heads``: query head h is its rows of q (and its q bias) and its columns of o; in
    every key/value group the same number ``round(sparsity * group size)`` of query heads goes, so grouped-query
    attention stays uniform (the key/value heads are kept). ``remove`` returns a smaller model (config updated,
    every layer the same size, as transformers and llama.cpp need); ``mask`` zeroes the same weights in the same
    model, which computes the same function. Returns (model, report); with ``remove`` the model is a new object.
    """
    import torch

    _check_fraction("sparsity", sparsity)
    config = model.config
    layers = _layer_modules(model)
    params_before = sum(int(p.numel()) for p in model.parameters())
    layout = _unit_layout(config, target)
    if mode not in ("remove", "mask"):
        raise ValueError(f"mode must be 'remove' or 'mask', got {mode!r}")
    per_group = round(sparsity * layout.group)
    if per_group >= layout.group:
        raise InvalidModelError(f"pruning {sparsity:.0%} of {target} leaves no unit in a group of {layout.group}")
    removed: dict[int, tuple[int, ...]] = {}
    with torch.no_grad():
        for index, layer in enumerate(layers):
            removed[index] = _lowest_per_group(_unit_scores(layer, layout), layout, per_group)
            if mode == "mask" and removed[index]:
                _mask_units(layer, layout, removed[index])
            progress(index + 1, len(layers))
    units = layout.units
    if mode == "mask":
        sparsity_report = measure_sparsity(model)
        return model, StructuredReport(
            target, mode, removed, units, units, params_before, params_before, sparsity_report
        )
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    _remove_units(state, removed, layout)
    units_after = units - per_group * layout.n_groups
    rebuilt = _rebuild(model, _shrunk_config(config, layout, units_after), state)
    params_after = sum(int(p.numel()) for p in rebuilt.parameters())
    return rebuilt, StructuredReport(
        target, mode, removed, units, units_after, params_before, params_after, measure_sparsity(rebuilt)
    )


def torch_perplexity(
    model: Any,
    tokens: list[int] | tuple[int, ...],
    *,
    context_tokens: int = 512,
    bos: int | None = None,
    max_outputs: int = 64,
    progress: Progress = _no_progress,
) -> tuple[float, int]:
    """(perplexity, scored tokens) of ``tokens``, the same way as :func:`slmops.optimize.evaluate.perplexity` does it
    in llama.cpp: chunks of ``context_tokens`` (first token replaced by ``bos`` when given), the second half of each
    chunk scored. Logits are computed for at most ``max_outputs`` positions at a time from the final hidden states,
    so memory stays at ``max_outputs × vocabulary`` floats (262k-vocabulary logits of a whole chunk would not)."""
    import math

    import torch

    n_chunks = len(tokens) // context_tokens
    if n_chunks < 1:
        raise ValueError(f"perplexity needs at least {context_tokens} tokens, got {len(tokens)}")
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    first = context_tokens // 2
    total_nll = 0.0
    scored = 0
    with torch.no_grad():
        for c in range(n_chunks):
            chunk = list(tokens[c * context_tokens : (c + 1) * context_tokens])
            if bos is not None:
                chunk[0] = bos
            ids = torch.tensor([chunk])  # (1, ctx)
            hidden = model.model(input_ids=ids).last_hidden_state[0]  # (ctx, hidden)
            for start in range(first - 1, context_tokens - 1, max_outputs):
                stop = min(start + max_outputs, context_tokens - 1)
                logits = head(hidden[start:stop]).to(torch.float64)  # (rows, vocab)
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                targets = torch.tensor(chunk[start + 1 : stop + 1])  # (rows,)
                logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])  # (rows, 1)
                total_nll -= float(logp.sum().item())
                scored += stop - start
            progress(c + 1, n_chunks)
    return math.exp(total_nll / scored), scored
