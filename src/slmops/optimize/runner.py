"""Run a recipe: make every variant (cached), evaluate it, and register it with its lineage and metrics.

Cache (under ``$SLMOPS_HOME/optimize-cache``):

- ``steps/<key>/``: the output of one pass, where ``key`` = sha256 of (input file digest, pass name, pass version,
  canonical parameters), with ``result.json`` (output file, its digest, the pass report). A directory appears there
  only complete (built in a temporary directory, then renamed), so a killed run leaves nothing half-made.
- ``evals/<key>.json``: the metrics of one file under one evaluation setting on this machine, keyed by (file digest,
  evaluation settings, machine label).

A re-run of the same recipe therefore runs no pass, evaluates nothing, and registers nothing new (the registry
returns the existing versions).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops.config import Settings
from slmops.core.device_profiles import DEVICE_PROFILES
from slmops.core.manifest import Lineage, RecipeStep, SignedManifest, Source, canonical_json, digest_bytes
from slmops.core.manifest import Recipe as LineageRecipe
from slmops.core.requirements import estimate_requirements
from slmops.errors import InvalidModelError
from slmops.optimize._files import digest_path, fsync_dir
from slmops.optimize.passes import PassProgress, get_pass
from slmops.optimize.recipe import EvaluationSpec, Recipe, VariantSpec
from slmops.registry.service import Registry

if TYPE_CHECKING:
    from slmops.registry.sources import InspectedModel

__all__ = [
    "Evaluation",
    "ProgressFactory",
    "RunResult",
    "StepCache",
    "StepOutcome",
    "VariantOutcome",
    "atomic_json",
    "cache_dir",
    "digest_path",
    "evaluate_file",
    "resolve_source",
    "run_recipe",
    "source_metrics_for",
]

ProgressFactory = Callable[[str], PassProgress]
"""Given a description (``"q8_0: quantize"``), returns the callback that pass reports its progress to."""


def _quiet(description: str) -> PassProgress:
    return lambda done, total: None


def cache_dir(settings: Settings | None = None) -> Path:
    return (settings or Settings()).resolved_home / "optimize-cache"


@dataclass(frozen=True)
class StepOutcome:
    pass_name: str
    params: dict[str, Any]
    cached: bool
    report: dict[str, Any]


@dataclass(frozen=True)
class VariantOutcome:
    name: str
    envelope: SignedManifest
    created: bool
    metrics: dict[str, float]
    steps: list[StepOutcome]
    evaluation_cached: bool


@dataclass(frozen=True)
class RunResult:
    recipe: str
    source: SignedManifest
    source_metrics: dict[str, float]
    variants: list[VariantOutcome]
    measured_on: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "measured_on": self.measured_on,
            "source": {
                "digest": self.source.digest,
                "version": self.source.manifest.version,
                "metrics": self.source_metrics,
            },
            "variants": [
                {
                    "name": v.name,
                    "version": v.envelope.manifest.version,
                    "digest": v.envelope.digest,
                    "created": v.created,
                    "evaluation_cached": v.evaluation_cached,
                    "metrics": v.metrics,
                    "steps": [
                        {"pass": s.pass_name, "params": s.params, "cached": s.cached, "report": s.report}
                        for s in v.steps
                    ],
                }
                for v in self.variants
            ],
            "notes": self.notes,
        }


def atomic_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON at ``path`` atomically and durably (temp file, fsync, rename, fsync the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(json.dumps(value, indent=1, sort_keys=True).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class StepCache:
    """The cache of pass outputs under ``root/steps``, keyed by (input digest, pass, version, canonical params)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "steps"

    def run(
        self, input_path: Path, input_digest: str, pass_name: str, raw_params: dict[str, Any], progress: PassProgress
    ) -> tuple[Path, str, StepOutcome]:
        the_pass = get_pass(pass_name)
        params = the_pass.parse_params(raw_params)
        canonical = the_pass.canonical_params(params)
        final = self.root / the_pass.cache_key(input_digest, params)
        if (final / "result.json").exists():
            done = json.loads((final / "result.json").read_text(encoding="utf-8"))
            output = final / done["output"]
            if output.exists():
                progress(1, 1)
                return output, done["digest"], StepOutcome(pass_name, canonical, True, done["report"])
        self.root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="tmp-", dir=self.root))
        try:
            result = the_pass.run(input_path, params, work, progress)
            output = result.output_path.resolve()
            if not output.is_relative_to(work.resolve()):
                raise InvalidModelError(f"pass '{pass_name}' wrote its output outside its work directory: {output}")
            digest = digest_path(output)
            relative = output.relative_to(work.resolve()).as_posix()
            atomic_json(work / "result.json", {"output": relative, "digest": digest, "report": result.report})
            try:
                os.replace(work, final)
            except OSError:  # another run finished the same step first; keep theirs
                shutil.rmtree(work, ignore_errors=True)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return final / relative, digest, StepOutcome(pass_name, canonical, False, result.report)


def _threads(spec: EvaluationSpec) -> int:
    return spec.threads or max(1, os.cpu_count() or 1)


def _eval_key(file_digest: str, spec: EvaluationSpec, token_digest: str, machine: str) -> str:
    settings = spec.model_dump(mode="json")
    value = {"file": file_digest, "settings": settings, "tokens": token_digest, "machine": machine, "v": 1}
    return digest_bytes(canonical_json(value)).removeprefix("sha256:")


def evaluate_file(
    path: Path,
    tokens: Any,
    spec: EvaluationSpec,
    *,
    progress_factory: ProgressFactory = _quiet,
    label: str = "model",
) -> dict[str, float]:
    """Every metric of one GGUF file (see the module docstring of :mod:`slmops.optimize.evaluate`)."""
    from slmops.optimize.evaluate import accuracy, measure, perplexity, profile_metrics
    from slmops.registry.formats.gguf import gguf_facts, read_gguf

    threads = _threads(spec)
    info = read_gguf(path)
    facts = gguf_facts(info)
    metrics: dict[str, float] = {"size_bytes": float(path.stat().st_size)}
    ppl, scored = perplexity(
        path, tokens.text, context_tokens=spec.context_tokens, threads=threads,
        progress=progress_factory(f"{label}: perplexity"),
    )  # fmt: skip
    metrics["perplexity"] = ppl
    metrics["perplexity_tokens"] = float(scored)
    if tokens.tasks:
        metrics["accuracy"] = accuracy(
            path, tokens.tasks, threads=threads, context_tokens=spec.context_tokens,
            progress=progress_factory(f"{label}: tasks"),
        )  # fmt: skip
        metrics["accuracy_items"] = float(len(tokens.tasks))
    requirements = estimate_requirements(facts, sum(t.nbytes for t in info.tensors))
    runs = [r for r in requirements.memory_run if r.context_tokens >= spec.context_tokens]
    estimate = runs[0].bytes if runs else requirements.memory_load_bytes
    prompt = list(tokens.text[: spec.speed_prompt_tokens])
    measured: dict[int, Any] = {}
    speed = progress_factory(f"{label}: memory and speed")
    cores = max(1, os.cpu_count() or 1)
    profiles = [DEVICE_PROFILES[name] for name in spec.device_profiles]
    for index, profile in enumerate(profiles):
        if estimate > profile.memory_bytes:
            metrics[f"fits@{profile.name}"] = 0.0
            continue
        metrics[f"fits@{profile.name}"] = 1.0
        effective = min(profile.threads, cores)
        if effective not in measured:
            measured[effective] = measure(
                path, prompt, threads=effective, context_tokens=spec.context_tokens,
                decode_tokens=spec.speed_decode_tokens,
            )  # fmt: skip
        metrics.update(profile_metrics(profile, measured[effective]))
        speed(index + 1, len(profiles))
    if threads not in measured:
        measured[threads] = measure(
            path, prompt, threads=threads, context_tokens=spec.context_tokens, decode_tokens=spec.speed_decode_tokens
        )
    own = measured[threads]
    metrics.update(
        {
            "threads": float(threads),
            "load_s": own.load_s,
            "peak_rss_load_bytes": float(own.peak_rss_load_bytes),
            "peak_rss_bytes": float(own.peak_rss_bytes),
            "prefill_tokens_per_s": own.prefill_tokens_per_s,
            "decode_tokens_per_s": own.decode_tokens_per_s,
            "estimated_memory_bytes": float(estimate),
        }
    )
    speed(1, 1)
    return metrics


def _lineage_parent(
    chain: tuple[tuple[str, str], ...], made: dict[tuple[tuple[str, str], ...], SignedManifest], source: SignedManifest
) -> tuple[SignedManifest, int]:
    """The registered variant whose chain is the longest proper prefix of ``chain`` (else the source), and how many
    steps of ``chain`` it already covers."""
    for length in range(len(chain) - 1, 0, -1):
        parent = made.get(chain[:length])
        if parent is not None:
            return parent, length
    return source, 0


def resolve_source(registry: Registry, ref: str) -> SignedManifest:
    """``NAME`` alone means the newest version that was imported, not derived: once variants are registered under
    the same name, ``latest`` points at a variant, and a recipe must not start from its own output."""
    if "@" in ref or ref.startswith("sha256:"):
        return registry.resolve(ref)
    for envelope in reversed(registry.versions(ref)):
        if envelope.manifest.source.kind != "derived":
            return envelope
    return registry.resolve(ref)


def _gguf_source(registry: Registry, ref: str) -> SignedManifest:
    """The recipe's source version; the GGUF passes and the evaluation need a single GGUF file."""
    source = resolve_source(registry, ref)
    manifest = source.manifest
    if manifest.format != "gguf" or len(manifest.files) != 1:
        raise InvalidModelError(
            f"{manifest.name}@{manifest.version} is {manifest.format} with {len(manifest.files)} files; the GGUF "
            "passes need a single-file GGUF source (torch passes for safetensors sources are not there yet)"
        )
    return source


@dataclass(frozen=True)
class Evaluation:
    """One run's evaluation: the same token ids for every file, metrics cached by (file, settings, tokens, machine)."""

    root: Path
    spec: EvaluationSpec
    tokens: Any
    token_digest: str
    machine: str
    progress_factory: ProgressFactory
    source_path: Path

    @classmethod
    def prepare(cls, recipe: Recipe, source_path: Path, root: Path, progress_factory: ProgressFactory) -> Evaluation:
        """Tokenize the evaluation text and tasks once, with the source's tokenizer."""
        from slmops.optimize._data import load_tasks, read_text
        from slmops.optimize.evaluate import machine_label, tokenize_for_eval

        spec = recipe.evaluation
        machine = machine_label()
        tasks = load_tasks(spec.tasks, recipe.base_dir)[: spec.max_tasks] if spec.tasks else []
        tokens = tokenize_for_eval(source_path, read_text(spec.text, recipe.base_dir), spec.max_tokens, tasks)
        token_digest = digest_bytes(
            canonical_json(
                [list(tokens.text), [[list(t.prompt), [list(o) for o in t.options], t.answer] for t in tokens.tasks]]
            )
        )
        return cls(root, spec, tokens, token_digest, machine, progress_factory, source_path)

    def metrics(self, path: Path, digest: str, label: str) -> tuple[dict[str, float], bool]:
        """(metrics of the file, whether they came from the cache)."""
        key_file = self.root / "evals" / f"{_eval_key(digest, self.spec, self.token_digest, self.machine)}.json"
        if key_file.exists():
            return json.loads(key_file.read_text(encoding="utf-8"))["metrics"], True
        metrics = evaluate_file(path, self.tokens, self.spec, progress_factory=self.progress_factory, label=label)
        atomic_json(key_file, {"metrics": metrics, "measured_on": self.machine, "file": digest})
        return metrics, False

    def onnx_genai_metrics(self, path: Path, digest: str, label: str) -> tuple[dict[str, float], bool]:
        """(metrics of an ONNX Runtime GenAI model directory under the GGUF metrics' keys, whether cached); the
        same token ids as the GGUF variants (BOS: the source tokenizer's, when it adds one)."""
        from slmops.optimize._llama import LlamaSession
        from slmops.optimize.evaluate import evaluate_onnx_genai_dir

        key_file = self.root / "evals" / f"{_eval_key(digest, self.spec, self.token_digest, self.machine)}.json"
        if key_file.exists():
            return json.loads(key_file.read_text(encoding="utf-8"))["metrics"], True
        with LlamaSession(self.source_path, vocab_only=True) as session:
            bos = session.bos if session.add_bos else None
        metrics = evaluate_onnx_genai_dir(
            path,
            self.tokens,
            bos=bos,
            context_tokens=self.spec.context_tokens,
            threads=_threads(self.spec),
            profiles=[DEVICE_PROFILES[name] for name in self.spec.device_profiles],
            speed_prompt_tokens=self.spec.speed_prompt_tokens,
            speed_decode_tokens=self.spec.speed_decode_tokens,
        )
        atomic_json(key_file, {"metrics": metrics, "measured_on": self.machine, "file": digest, "label": label})
        return metrics, False

    def source_metrics(self, source: SignedManifest, source_path: Path) -> dict[str, float]:
        """Evaluate the source, and record its metrics for :func:`source_metrics_for`."""
        manifest = source.manifest
        metrics, _ = self.metrics(source_path, manifest.files[0].digest, f"{manifest.name}@{manifest.version}")
        atomic_json(
            self.root / "sources" / f"{source.digest.removeprefix('sha256:')}.json",
            {"metrics": metrics, "measured_on": self.machine, "settings": self.spec.model_dump(mode="json")},
        )
        return metrics

    def notes(self) -> list[str]:
        return [
            f"speeds and peak RSS measured on {self.machine}; a profile's thread count is capped at this machine's "
            "cores (the threads@PROFILE metric says how many were used)",
            f"perplexity on {self.spec.text}: {len(self.tokens.text)} tokens, chunks of {self.spec.context_tokens}, "
            "second half of each chunk scored; the same token ids for every variant",
        ]


@dataclass
class _VariantMaker:
    """Makes, measures and registers the variants of one recipe, in order; a variant whose steps extend another's
    records that one as its lineage parent."""

    registry: Registry
    recipe: Recipe
    source: SignedManifest
    steps: StepCache
    evaluation: Evaluation
    progress_factory: ProgressFactory
    made: dict[tuple[tuple[str, str], ...], SignedManifest] = field(default_factory=dict)

    @property
    def output_name(self) -> str:
        return self.recipe.output_name or self.source.manifest.name

    def make(self, variant: VariantSpec) -> VariantOutcome:
        path, digest, step_outcomes = self._run_passes(variant)
        inspected, metrics, eval_cached = self._measure(path, digest, variant.name)
        chain = tuple((o.pass_name, canonical_json(o.params).decode()) for o in step_outcomes)
        parent, covered = _lineage_parent(chain, self.made, self.source)
        lineage = Lineage(
            parents=[parent.digest],
            recipe=LineageRecipe(
                name=self.recipe.name,
                steps=[RecipeStep(pass_name=s.pass_name, params=s.params) for s in step_outcomes[covered:]],
            ),
        )
        files = {f"{self.output_name}-{variant.name}.gguf": path} if path.is_file() else dict(inspected.files)
        result = self.registry.register(
            self.output_name,
            inspected.format,
            files,
            facts=inspected.facts,
            runtime=self.source.manifest.runtime,
            weight_bytes=inspected.weight_bytes,
            source=Source(kind="derived", origin=parent.digest),
            lineage=lineage,
            variant=variant.name,
            license=self.source.manifest.license,
            metrics=metrics,
        )
        self.made[chain] = result.envelope
        return VariantOutcome(variant.name, result.envelope, result.created, metrics, step_outcomes, eval_cached)

    def _run_passes(self, variant: VariantSpec) -> tuple[Path, str, list[StepOutcome]]:
        """(output path, its digest, what each step did), each step from the cache when it ran before."""
        source_file = self.source.manifest.files[0]
        path, digest = self.registry.blob_path(source_file.digest), source_file.digest
        outcomes: list[StepOutcome] = []
        for step in variant.passes:
            path, digest, outcome = self.steps.run(
                path, digest, step.pass_name, step.params, self.progress_factory(f"{variant.name}: {step.pass_name}")
            )
            outcomes.append(outcome)
        return path, digest, outcomes

    def _measure(self, path: Path, digest: str, label: str) -> tuple[InspectedModel, dict[str, float], bool]:
        """(what the output is, its metrics, whether they were cached); GGUF and ONNX GenAI are evaluated."""
        from slmops.registry.sources import inspect_source

        inspected = inspect_source(path)
        if inspected.format == "gguf":
            metrics, cached = self.evaluation.metrics(path, digest, label)
            return inspected, metrics, cached
        if inspected.format == "onnx" and "genai_config.json" in inspected.files:
            metrics, cached = self.evaluation.onnx_genai_metrics(path, digest, label)
            return inspected, metrics, cached
        # the evaluation harness runs GGUF through llama.cpp and ONNX GenAI through its runtime; export to one of
        # them to measure the rest
        return inspected, {"size_bytes": float(sum(p.stat().st_size for p in inspected.files.values()))}, False


def run_recipe(
    registry: Registry,
    recipe: Recipe,
    *,
    settings: Settings | None = None,
    progress_factory: ProgressFactory = _quiet,
    on_variant: Callable[[VariantOutcome], None] | None = None,
) -> RunResult:
    """Make, evaluate and register every variant of ``recipe``; see the module docstring for caching."""
    source = _gguf_source(registry, recipe.source)
    root = cache_dir(settings)
    source_path = registry.blob_path(source.manifest.files[0].digest)
    evaluation = Evaluation.prepare(recipe, source_path, root, progress_factory)
    source_metrics = evaluation.source_metrics(source, source_path) if recipe.evaluation.evaluate_source else {}
    maker = _VariantMaker(registry, recipe, source, StepCache(root), evaluation, progress_factory)
    outcomes: list[VariantOutcome] = []
    for variant in recipe.variants:
        outcome = maker.make(variant)
        outcomes.append(outcome)
        if on_variant is not None:
            on_variant(outcome)
    return RunResult(recipe.name, source, source_metrics, outcomes, evaluation.machine, evaluation.notes())


def source_metrics_for(digest: str, settings: Settings | None = None) -> dict[str, Any] | None:
    """The source model's metrics recorded by the last run that evaluated it (its manifest is immutable)."""
    path = cache_dir(settings) / "sources" / f"{digest.removeprefix('sha256:')}.json"
    if not path.exists():
        return None
    value: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return value
