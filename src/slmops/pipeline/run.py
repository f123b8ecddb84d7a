"""``slmops pipeline run``: build → evaluate → gate per class → test matrix → register and tag → staged release.

Every step is cached by its inputs, so a run that stopped anywhere resumes where it stopped, and a repeated run
after it finished does no work:

=============  ==================================================  ============================================
step           what                                                cached by
=============  ==================================================  ============================================
``source``     the source version (a GGUF path is imported)        the registry (same bytes → same version)
``build``      the optimize recipe's variants, evaluated and       the optimize step and evaluation caches
               registered (:func:`slmops.optimize.runner.run_recipe`)  (:mod:`slmops.optimize.runner`)
``baseline``   the current stable version, evaluated alike         the same evaluation cache
``gates``      offline gates per (class, variant)                  (pure: :mod:`slmops.pipeline.gates`)
``matrix``     one real agent per (class, variant) that passed     ``pipeline/matrix/<key>.json``: (variant,
               (:mod:`slmops.pipeline.matrix`)                      class, matrix settings, limits, machine)
``tag``        ``<tag>-<class>`` aliases on the chosen variants    idempotent
``release``    a staged release per blueprint whose classes all    an existing release of the blueprint to
               passed, through the control plane                   the same version is kept, as ``improve`` does
=============  ==================================================  ============================================

The whole report is kept under ``pipeline/runs/<key>.json`` once a run finished; a rerun with the same inputs returns
it, every step marked cached. The outcome is ``released``, ``registered`` (no release section), ``partial`` (some
classes failed their gates and were left out), or ``gates_failed`` (no class has a variant to release).
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops.config import Settings
from slmops.core.manifest import SignedManifest, canonical_json, digest_bytes
from slmops.errors import ConfigError, InvalidModelError
from slmops.improve.pipeline import StepRecord, start_or_keep_release, timed_step
from slmops.optimize.runner import ProgressFactory, atomic_json, cache_dir, resolve_source
from slmops.pipeline.gates import QUALITY_GATES, ClassGate, matrix_gates, offline_gates
from slmops.pipeline.limits import Enforcement, detect
from slmops.pipeline.matrix import MatrixJob, MatrixRun, run_matrix
from slmops.pipeline.spec import GGUFSource, PipelineSpec
from slmops.registry.service import Registry

if TYPE_CHECKING:
    from slmops.control.client import OperatorClient
    from slmops.optimize.recipe import Recipe

__all__ = ["ClassDecision", "PipelineReport", "plan_pipeline", "run_pipeline"]

_REPORT_VERSION = 1


def _quiet(_description: str) -> Any:
    return lambda done, total: None


@dataclass
class ClassDecision:
    device_class: str
    variant: str | None
    digest: str | None
    blueprint: str | None
    released: bool
    reason: str


@dataclass
class PipelineReport:
    name: str
    steps: list[StepRecord] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)
    gates: list[ClassGate] = field(default_factory=list)
    matrix: list[MatrixRun] = field(default_factory=list)
    decisions: list[ClassDecision] = field(default_factory=list)
    releases: list[dict[str, Any]] = field(default_factory=list)
    enforcement: dict[str, Any] = field(default_factory=dict)
    outcome: str = "running"  # released | registered | partial | gates_failed
    measured_on: str = ""
    cached: bool = False

    @property
    def exit_code(self) -> int:
        """0 when every class has a variant (released if asked), 1 when a class failed its gates."""
        return 0 if self.outcome in ("released", "registered") else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "outcome": self.outcome,
            "exit_code": self.exit_code,
            "cached": self.cached,
            "measured_on": self.measured_on,
            "steps": [
                {"name": s.name, "cached": s.cached, "seconds": round(s.seconds, 3), "numbers": s.numbers}
                for s in self.steps
            ],
            "source": self.source,
            "baseline": self.baseline,
            "variants": self.variants,
            "gates": [g.to_json() for g in self.gates],
            "matrix": [r.to_json() for r in self.matrix],
            "decisions": [vars(d) for d in self.decisions],
            "releases": self.releases,
            "enforcement": self.enforcement,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> PipelineReport:
        report = cls(
            value["name"],
            steps=[StepRecord(s["name"], True, 0.0, s["numbers"]) for s in value["steps"]],
            source=value["source"],
            baseline=value["baseline"],
            variants=value["variants"],
            gates=[
                ClassGate(g["class"], g["variant"], g["name"], g["status"], g["value"], g["limit"], g["reason"])
                for g in value["gates"]
            ],
            matrix=[MatrixRun.from_json({**r, "cached": True}) for r in value["matrix"]],
            decisions=[ClassDecision(**d) for d in value["decisions"]],
            releases=value["releases"],
            enforcement=value["enforcement"],
            outcome=value["outcome"],
            measured_on=value["measured_on"],
        )
        report.cached = True
        return report


def load_recipe_of(spec: PipelineSpec, source_ref: str) -> Recipe:
    """The pipeline's optimize recipe (inline or a file), starting from ``source_ref``."""
    from slmops.optimize.recipe import load_recipe, parse_recipe

    if isinstance(spec.optimize, str):
        recipe = load_recipe(spec.resolve_path(spec.optimize))
        return recipe.model_copy(update={"source": source_ref})
    return parse_recipe(
        {"name": spec.name, "source": source_ref, **spec.optimize}, f"{spec.name}: optimize", spec.base_dir
    )


def plan_pipeline(spec: PipelineSpec, enforcement: Enforcement | None = None) -> list[str]:
    """What ``run`` would do, as lines, without doing any of it (the recipe is validated)."""
    source = spec.source if isinstance(spec.source, str) else f"{spec.source.gguf} (imported as {spec.source.name})"
    recipe = load_recipe_of(spec, spec.source if isinstance(spec.source, str) else spec.source.name)
    limits = enforcement or detect()
    lines = [f"source: {source}"]
    for v in recipe.variants:
        lines.append(f"build variant {v.name}: " + " → ".join(s.pass_name for s in v.passes))
    baseline = "the source" if spec.baseline is None else (spec.baseline.ref or f"blueprint {spec.baseline.blueprint}")
    lines.append(f"evaluate every variant and the baseline ({baseline}) on {recipe.evaluation.text}")
    for c in spec.classes:
        g = spec.class_gates(c)
        shown = ", ".join(f"{k}={v:g}" for k, v in g.model_dump().items() if v is not None)
        lines.append(
            f"class {c.name}: {c.memory_bytes >> 20} MiB, {c.core_count} cores, {c.thread_count} threads, "
            f"disk {f'{c.disk_mib} MiB' if c.disk_mib else 'unlimited'}; gates: {shown}"
        )
    if spec.matrix.enabled:
        lines.append(
            f"test matrix: {len(recipe.variants)} variant(s) × {len(spec.classes)} class(es), real agents, "
            f"{len(spec.matrix.prompts)} prompts of ≤{spec.matrix.max_tokens} tokens each; limits enforced by: "
            f"memory {limits.memory}, cpu {limits.cpu}, disk {limits.disk}"
        )
    else:
        lines.append("test matrix: disabled")
    if spec.release is None:
        lines.append("release: none (register only)")
    else:
        targets: dict[str, list[str]] = {}
        for c in spec.classes:
            targets.setdefault(spec.class_blueprint(c) or "", []).append(c.name)
        for blueprint, classes in targets.items():
            lines.append(f"release blueprint {blueprint} (classes {', '.join(classes)}) when they all pass")
        if spec.release.tag:
            lines.append(f"tag each released variant {spec.release.tag}-<class>")
    return lines


class _Run:
    def __init__(
        self,
        spec: PipelineSpec,
        registry: Registry,
        settings: Settings,
        client: OperatorClient | None,
        progress: ProgressFactory,
        enforcement: Enforcement,
        use_cache: bool,
    ) -> None:
        self.spec = spec
        self.registry = registry
        self.settings = settings
        self.client = client
        self.progress = progress
        self.enforcement = enforcement
        self.use_cache = use_cache
        self.root = settings.resolved_home / "pipeline"
        self.report = PipelineReport(spec.name, enforcement=enforcement.to_json())

    def step(self, name: str) -> AbstractContextManager[StepRecord]:
        return timed_step(self.report.steps, name)

    def source(self) -> SignedManifest:
        with self.step("source") as record:
            if isinstance(self.spec.source, GGUFSource):
                path = self.spec.resolve_path(self.spec.source.gguf)
                if not path.is_file():
                    raise ConfigError(f"source.gguf: {path} is not a file; give the path of a GGUF model")
                result = self.registry.import_model(path, self.spec.source.name)
                envelope = result.envelope
                record.cached = not result.created
            else:
                envelope = resolve_source(self.registry, self.spec.source)
                record.cached = True
            m = envelope.manifest
            if m.format != "gguf" or len(m.files) != 1:
                raise InvalidModelError(f"{m.name}@{m.version} is {m.format}; the pipeline needs a single-file GGUF")
            self.report.source = {"version": f"{m.name}@{m.version}", "digest": envelope.digest}
            record.numbers = dict(self.report.source)
            return envelope

    def build(self, recipe: Recipe) -> Any:
        from slmops.optimize.runner import run_recipe

        with self.step("build") as record:
            result = run_recipe(self.registry, recipe, settings=self.settings, progress_factory=self.progress)
            record.cached = all(
                not v.created and v.evaluation_cached and all(s.cached for s in v.steps) for v in result.variants
            )
            self.report.measured_on = result.measured_on
            for v in result.variants:
                self.report.variants.append(
                    {
                        "name": v.name,
                        "version": f"{v.envelope.manifest.name}@{v.envelope.manifest.version}",
                        "digest": v.envelope.digest,
                        "metrics": v.metrics,
                    }
                )
            record.numbers = {"variants": len(result.variants), "created": sum(v.created for v in result.variants)}
            return result

    def baseline(self, recipe: Recipe, source: SignedManifest) -> dict[str, float]:
        from slmops.optimize.runner import Evaluation

        with self.step("baseline") as record:
            baseline = self.spec.baseline
            if baseline is None:
                envelope = source
            elif baseline.ref is not None:
                envelope = self.registry.resolve(baseline.ref)
            else:
                if self.client is None:
                    raise ConfigError(
                        f"baseline.blueprint {baseline.blueprint} needs a control plane: give --server URL and an "
                        "operator token (SLMOPS_TOKEN), or use baseline.ref"
                    )
                assert baseline.blueprint is not None
                envelope = self.registry.resolve(self.client.blueprint(baseline.blueprint).model)
            m = envelope.manifest
            if m.format != "gguf" or len(m.files) != 1:
                raise InvalidModelError(f"baseline {m.name}@{m.version} is {m.format}; it must be a single GGUF")
            source_path = self.registry.blob_path(source.manifest.files[0].digest)
            evaluation = Evaluation.prepare(recipe, source_path, cache_dir(self.settings), self.progress)
            path = self.registry.blob_path(m.files[0].digest)
            metrics, record.cached = evaluation.metrics(path, m.files[0].digest, f"baseline {m.name}@{m.version}")
            self.report.baseline = {"version": f"{m.name}@{m.version}", "digest": envelope.digest, "metrics": metrics}
            record.numbers = {"version": f"{m.name}@{m.version}", "perplexity": metrics.get("perplexity")}
            return metrics

    def gate_offline(self, baseline: dict[str, float]) -> dict[tuple[str, str], list[ClassGate]]:
        with self.step("gates") as record:
            out: dict[tuple[str, str], list[ClassGate]] = {}
            for c in self.spec.classes:
                for v in self.report.variants:
                    out[(c.name, v["name"])] = offline_gates(
                        self.spec.class_gates(c), c, v["name"], baseline, v["metrics"]
                    )
            record.numbers = {
                "passed": sum(not any(g.failed for g in gs) for gs in out.values()),
                "of": len(out),
            }
            return out

    def _matrix_key(self, job: MatrixJob) -> str:
        value = {
            "digest": job.digest,
            "class": job.device_class.model_dump(mode="json"),
            "matrix": self.spec.matrix.model_dump(mode="json"),
            "limits": self.enforcement.to_json(),
            "machine": self.report.measured_on,
            "v": 1,
        }
        return digest_bytes(canonical_json(value)).removeprefix("sha256:")

    def matrix(
        self, offline: dict[tuple[str, str], list[ClassGate]], names: dict[str, str]
    ) -> dict[tuple[str, str], MatrixRun]:
        with self.step("matrix") as record:
            jobs: list[MatrixJob] = []
            done: dict[tuple[str, str], MatrixRun] = {}
            for c in self.spec.classes:
                for v in self.report.variants:
                    quality = [g for g in offline[(c.name, v["name"])] if g.name in QUALITY_GATES]
                    if any(g.failed for g in quality) or not self.spec.matrix.enabled:
                        continue
                    envelope = self.registry.resolve(v["digest"])
                    file = envelope.manifest.files[0]
                    path = self.registry.blob_path(file.digest)
                    job = MatrixJob(
                        v["name"],
                        v["digest"],
                        path,
                        Path(file.path).name,
                        names[v["digest"]],
                        c,
                        self.spec.class_gates(c).ram_share,
                    )
                    cached = self.root / "matrix" / f"{self._matrix_key(job)}.json"
                    if self.use_cache and cached.is_file():
                        done[(c.name, v["name"])] = MatrixRun.from_json(
                            {**json.loads(cached.read_text(encoding="utf-8")), "cached": True}
                        )
                    else:
                        jobs.append(job)
            work = self.root / "work" / self.spec.name
            for job, run in zip(jobs, run_matrix(jobs, self.spec.matrix, work, self.enforcement), strict=True):
                if run.conclusive:  # any other failure (a crash, a timeout) is measured again on the next run
                    atomic_json(self.root / "matrix" / f"{self._matrix_key(job)}.json", run.to_json())
                done[(job.device_class.name, job.variant)] = run
            record.cached = not jobs
            record.numbers = {"runs": len(done), "ran": len(jobs), "ok": sum(r.ok for r in done.values())}
            self.report.matrix = [done[k] for k in sorted(done)]
            return done

    def decide(self, offline: dict[tuple[str, str], list[ClassGate]], runs: dict[tuple[str, str], MatrixRun]) -> None:
        for c in self.spec.classes:
            passing: list[dict[str, Any]] = []
            failures: list[str] = []
            for v in self.report.variants:
                gates = list(offline[(c.name, v["name"])])
                run = runs.get((c.name, v["name"]))
                why = "the test matrix is disabled" if not self.spec.matrix.enabled else "a quality gate failed"
                gates += matrix_gates(self.spec.class_gates(c), c, v["name"], run, why)
                self.report.gates.extend(gates)
                failed = [g for g in gates if g.failed]
                if failed:
                    failures.append(f"{v['name']}: " + "; ".join(f"{g.name}: {g.reason}" for g in failed))
                else:
                    passing.append(v)
            if passing:
                best = min(passing, key=lambda v: v["metrics"].get("perplexity", float("inf")))
                reason = f"{best['name']} passes every gate" + (
                    f" (lowest perplexity of {len(passing)} that pass)" if len(passing) > 1 else ""
                )
                self.report.decisions.append(
                    ClassDecision(c.name, best["name"], best["digest"], self.spec.class_blueprint(c), False, reason)
                )
            else:
                self.report.decisions.append(
                    ClassDecision(
                        c.name, None, None, self.spec.class_blueprint(c), False,
                        "not released: no variant passes its gates; " + " / ".join(failures),
                    )
                )  # fmt: skip

    def tag(self) -> None:
        release = self.spec.release
        if release is None or release.tag is None:
            return
        with self.step("tag") as record:
            tagged = {}
            for d in self.report.decisions:
                if d.digest is not None:
                    alias = f"{release.tag}-{d.device_class}"[:64]
                    self.registry.tag(d.digest, alias)
                    tagged[alias] = d.variant
            record.cached = True
            record.numbers = tagged

    def release(self) -> None:
        release = self.spec.release
        if release is None:
            return
        if self.client is None:
            raise ConfigError(
                f"the pipeline {self.spec.name} releases to blueprints, which needs a control plane: give --server "
                "URL and an operator token (SLMOPS_TOKEN), or remove the release section"
            )
        with self.step("release") as record:
            groups: dict[str, list[ClassDecision]] = {}
            for d in self.report.decisions:
                if d.blueprint is not None:
                    groups.setdefault(d.blueprint, []).append(d)
            existing = self.client.rollouts()
            record.cached = True
            for blueprint, decisions in groups.items():
                classes = [d.device_class for d in decisions]
                blocked = [d.device_class for d in decisions if d.digest is None]
                digests = {d.digest for d in decisions if d.digest is not None}
                if blocked:
                    for d in decisions:
                        if d.digest is not None:
                            d.reason += f"; blueprint {blueprint} not released: classes {', '.join(blocked)} failed"
                    continue
                if len(digests) != 1:
                    for d in decisions:
                        d.reason += f"; blueprint {blueprint} not released: its classes chose different variants"
                    continue
                (digest,) = digests
                found, kept = start_or_keep_release(self.client, blueprint, digest, release.policy, existing)
                if not kept:
                    record.cached = False
                for d in decisions:
                    d.released = True
                    d.reason += f"; released through blueprint {blueprint} ({found.id})"
                self.report.releases.append(
                    {
                        "blueprint": blueprint,
                        "release_id": found.id,
                        "state": found.state,
                        "to_digest": digest,
                        "classes": classes,
                        "kept_existing": kept,
                    }
                )
            record.numbers = {r["blueprint"]: r["release_id"] for r in self.report.releases}

    def finish(self) -> None:
        decided = [d for d in self.report.decisions if d.digest is not None]
        if not decided:
            self.report.outcome = "gates_failed"
        elif len(decided) < len(self.report.decisions):
            self.report.outcome = "partial"
        elif self.spec.release is None:
            self.report.outcome = "registered"
        else:
            everyone = all(d.released for d in self.report.decisions if d.blueprint is not None)
            self.report.outcome = "released" if everyone else "partial"


def _run_key(spec: PipelineSpec, source: SignedManifest, enforcement: Enforcement) -> str:
    from slmops.optimize.evaluate import machine_label

    value = {
        "spec": spec.model_dump(mode="json"),
        "recipe_file": None
        if not isinstance(spec.optimize, str)
        else digest_bytes(spec.resolve_path(spec.optimize).read_bytes()),
        "source": source.digest,
        "limits": enforcement.to_json(),
        "machine": machine_label(),
        "v": _REPORT_VERSION,
    }
    return digest_bytes(canonical_json(value)).removeprefix("sha256:")


def run_pipeline(
    spec: PipelineSpec,
    *,
    registry: Registry,
    settings: Settings | None = None,
    client: OperatorClient | None = None,
    progress_factory: ProgressFactory = _quiet,
    enforcement: Enforcement | None = None,
    use_cache: bool = True,
) -> PipelineReport:
    """Run (or resume) ``spec``; the report says what every step did and measured, and why each class got what."""
    settings = settings or Settings()
    limits = enforcement or detect()
    run = _Run(spec, registry, settings, client, progress_factory, limits, use_cache)
    if spec.release is not None and client is None:
        raise ConfigError(
            f"the pipeline {spec.name} releases to blueprints, which needs a control plane: give --server URL and "
            "an operator token (SLMOPS_TOKEN), or remove the release section"
        )
    source = run.source()
    key = _run_key(spec, source, limits)
    finished = run.root / "runs" / f"{key}.json"
    if use_cache and finished.is_file():
        report = PipelineReport.from_json(json.loads(finished.read_text(encoding="utf-8")))
        report.steps = [run.report.steps[0], *(s for s in report.steps if s.name != "source")]
        return report
    recipe = load_recipe_of(spec, source.digest)
    built = run.build(recipe)
    baseline = run.baseline(recipe, source)
    offline = run.gate_offline(baseline)
    names = {v.envelope.digest: v.envelope.manifest.name for v in built.variants}
    runs = run.matrix(offline, names)
    run.decide(offline, runs)
    run.tag()
    run.release()
    run.finish()
    atomic_json(finished, run.report.to_json())
    return run.report
