"""``slmops improve``: curated dataset → LoRA adapter → evaluation gates → registry → staged release, in one report.

Every step is cached by its inputs, so a run that stopped anywhere (killed, a gate failed, the control plane was
down) resumes where it stopped and a repeated run does no work:

==============  ===================================================  ================================================
step            what                                                 cached by
==============  ===================================================  ================================================
``dataset``     the curated dataset version's train/held-out files   the dataset version's digest
``base``        the base GGUF version from the registry              its manifest digest
``dequantize``  ``hf_from_gguf``: the base as a float32 model         the optimize step cache (input digest + params)
``train``       ``lora``: a peft adapter on the train split           the same, with the train file's sha256
``export``      ``export_gguf_lora``: llama.cpp's GGUF LoRA format    the same
``evaluate``    parent (base) and candidate (base + adapter): the     ``improve/evals/<key>.json``: (base, adapter,
                held-out task, general perplexity, task accuracy      held-out digest, settings, machine)
``gates``       :func:`slmops.improve.gates.judge`                   (pure)
``register``    the adapter version, parent = base, with metrics     the registry (same content → same version)
``release``     a staged release of the blueprint to it               an existing release to the same version is kept
==============  ===================================================  ================================================

Every number in the report was measured in the run that wrote it or read from that step's cache, and the report says
which.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmops.config import Settings
from slmops.core.adapters import ADAPTER_DETAIL
from slmops.core.manifest import (
    Lineage,
    ModelFacts,
    RecipeStep,
    SignedManifest,
    Source,
    canonical_json,
    digest_bytes,
)
from slmops.core.manifest import Recipe as LineageRecipe
from slmops.errors import InvalidModelError, SLMOpsError
from slmops.improve.gates import GateOutcome, judge
from slmops.improve.spec import ImproveSpec
from slmops.optimize.passes import PassProgress
from slmops.optimize.runner import StepCache, StepOutcome, atomic_json, cache_dir, resolve_source
from slmops.registry.blobstore import hash_file
from slmops.registry.service import Registry

if TYPE_CHECKING:
    from slmops.control.client import OperatorClient
    from slmops.control.schemas import ReleasePublic
    from slmops.core.rollout import RolloutPolicy

__all__ = ["ImproveReport", "StepRecord", "run_improve", "start_or_keep_release", "timed_step"]

ProgressFactory = Callable[[str], PassProgress]
_ENDED_BADLY = ("aborted", "halted")  # a release to the same version in these states is not resumed but started anew


def _quiet(_description: str) -> PassProgress:
    return lambda done, total: None


@dataclass
class StepRecord:
    name: str
    cached: bool
    seconds: float
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImproveReport:
    name: str
    steps: list[StepRecord] = field(default_factory=list)
    parent: dict[str, float] = field(default_factory=dict)
    candidate: dict[str, float] = field(default_factory=dict)
    gates: list[GateOutcome] = field(default_factory=list)
    adapter: SignedManifest | None = None
    release_id: str | None = None
    outcome: str = "running"  # released | registered | gates_failed | running
    measured_on: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.gates) and not any(g.failed for g in self.gates)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "outcome": self.outcome,
            "measured_on": self.measured_on,
            "steps": [
                {"name": s.name, "cached": s.cached, "seconds": round(s.seconds, 3), "numbers": s.numbers}
                for s in self.steps
            ],
            "parent": self.parent,
            "candidate": self.candidate,
            "gates": [
                {
                    "name": g.name,
                    "status": g.status,
                    "parent": g.parent,
                    "candidate": g.candidate,
                    "limit": g.limit,
                    "reason": g.reason,
                }
                for g in self.gates
            ],
            "adapter": None
            if self.adapter is None
            else {
                "digest": self.adapter.digest,
                "version": self.adapter.manifest.version,
                "variant": self.adapter.manifest.variant,
            },
            "release_id": self.release_id,
        }


@contextmanager
def timed_step(steps: list[StepRecord], name: str) -> Iterator[StepRecord]:
    """Time one step of a run and append its record to ``steps``, also when it raises."""
    record = StepRecord(name, cached=False, seconds=0.0)
    started = time.perf_counter()
    try:
        yield record
    finally:
        record.seconds = time.perf_counter() - started
        steps.append(record)


def start_or_keep_release(
    client: OperatorClient,
    blueprint: str,
    digest: str,
    policy: RolloutPolicy | None,
    existing: list[ReleasePublic] | None = None,
) -> tuple[ReleasePublic, bool]:
    """The release of ``blueprint`` to ``digest``: an existing one unless it was aborted or halted (then a new one is
    started), and whether it was kept. ``existing`` saves a listing when the caller already has one."""
    from slmops.control.schemas import ReleaseStart

    for r in existing if existing is not None else client.rollouts():
        if r.blueprint == blueprint and r.to_digest == digest and r.state not in _ENDED_BADLY:
            return r, True
    return client.start_rollout(ReleaseStart(blueprint=blueprint, to=digest, policy=policy)), False


class _Run:
    def __init__(
        self,
        spec: ImproveSpec,
        registry: Registry,
        root: Path,
        progress_factory: ProgressFactory,
        client: OperatorClient | None,
    ) -> None:
        self.spec = spec
        self.registry = registry
        self.root = root
        self.progress = progress_factory
        self.client = client
        self.steps = StepCache(root)
        self.report = ImproveReport(spec.name)

    def step(self, name: str) -> AbstractContextManager[StepRecord]:
        return timed_step(self.report.steps, name)

    # ------------------------------------------------------------------------------------------------- steps

    def dataset(self) -> tuple[Path, Path, str, dict[str, Any]]:
        from slmops.registry.datasets import DatasetRegistry

        with self.step("dataset") as record:
            datasets = DatasetRegistry.of(self.registry)
            version = datasets.resolve(self.spec.dataset)
            name, label = version.manifest.name, version.manifest.version
            target = self.root / "datasets" / version.digest.removeprefix("sha256:")
            record.cached = (target / "train.jsonl").is_file() and (target / "heldout.jsonl").is_file()
            if not record.cached:
                datasets.export(version.digest, target)
            train, heldout = target / "train.jsonl", target / "heldout.jsonl"
            counts = {"train": _lines(train), "heldout": _lines(heldout)}
            record.numbers = {"dataset": f"{name}@{label}", "digest": version.digest, **counts}
            if counts["train"] == 0:
                raise InvalidModelError(
                    f"dataset {name}@{label} has no training samples; collect more rated "
                    "feedback (slmops feedback list) and curate again"
                )
            return train, heldout, version.digest, {"name": name, "version": label}

    def base(self) -> tuple[SignedManifest, Path]:
        with self.step("base") as record:
            base = resolve_source(self.registry, self.spec.model)
            manifest = base.manifest
            if manifest.format != "gguf" or len(manifest.files) != 1:
                raise InvalidModelError(
                    f"{manifest.name}@{manifest.version} is {manifest.format} with {len(manifest.files)} files; "
                    "improve needs a single-file GGUF base version"
                )
            path = self.registry.blob_path(manifest.files[0].digest)
            record.cached = True
            record.numbers = {"version": f"{manifest.name}@{manifest.version}", "bytes": manifest.files[0].size}
            return base, path

    def _pass(self, record: StepRecord, path: Path, digest: str, name: str, params: dict[str, Any]) -> tuple[Path, str]:
        output, out_digest, outcome = self.steps.run(path, digest, name, params, self.progress(f"{record.name}"))
        record.cached = outcome.cached
        record.numbers = _report_numbers(outcome)
        return output, out_digest

    def train(self, base: SignedManifest, base_path: Path, train: Path) -> tuple[Path, str, Path, str]:
        with self.step("dequantize") as record:
            hf_dir, hf_digest = self._pass(record, base_path, base.manifest.files[0].digest, "hf_from_gguf", {})
        with self.step("train") as record:
            params = {
                **self.spec.lora,
                "dataset": str(train),
                "dataset_sha256": hash_file(train).digest,
                "chat_template": base.manifest.runtime.chat_template,
            }
            adapter_dir, adapter_digest = self._pass(record, hf_dir, hf_digest, "lora", params)
        with self.step("export") as record:
            gguf, gguf_digest = self._pass(record, adapter_dir, adapter_digest, "export_gguf_lora", {})
            record.numbers["bytes"] = gguf.stat().st_size
        return adapter_dir, adapter_digest, gguf, gguf_digest

    def evaluate(
        self, base: SignedManifest, base_path: Path, adapter: Path, adapter_digest: str, heldout: Path
    ) -> None:
        from slmops.optimize.evaluate import machine_label

        ev = self.spec.evaluation
        machine = machine_label()
        self.report.measured_on = machine
        heldout_digest = hash_file(heldout).digest
        for role, lora, lora_digest in (("parent", None, None), ("candidate", adapter, adapter_digest)):
            with self.step(f"evaluate {role}") as record:
                key_value = {
                    "base": base.digest,
                    "adapter": lora_digest,
                    "heldout": heldout_digest,
                    "settings": ev.model_dump(mode="json"),
                    "machine": machine,
                    "v": 1,
                }
                key = digest_bytes(canonical_json(key_value)).removeprefix("sha256:")
                cached = self.root / "improve" / "evals" / f"{key}.json"
                if cached.is_file():
                    metrics = json.loads(cached.read_text(encoding="utf-8"))
                    record.cached = True
                else:
                    metrics = _measure(
                        base_path, lora, heldout, self.spec, base.manifest.runtime.chat_template,
                        self.progress(f"evaluate {role}"),
                    )  # fmt: skip
                    atomic_json(cached, metrics)
                record.numbers = dict(metrics)
                if role == "parent":
                    self.report.parent = metrics
                else:
                    self.report.candidate = metrics

    def gates(self, base: SignedManifest, adapter_bytes: int) -> None:
        with self.step("gates") as record:
            self.report.gates = judge(
                self.spec.gates,
                self.report.parent,
                self.report.candidate,
                base_bytes=base.manifest.files[0].size,
                adapter_bytes=adapter_bytes,
            )
            record.numbers = {g.name: g.status for g in self.report.gates}
            record.cached = False

    def register(
        self, base: SignedManifest, gguf: Path, dataset_digest: str, dataset: dict[str, Any], training: dict[str, Any]
    ) -> SignedManifest:
        from slmops.registry.formats.gguf import read_gguf

        with self.step("register") as record:
            info = read_gguf(gguf)
            adapter_meta = {str(k): v for k, v in info.metadata.items() if str(k).startswith("adapter.")}
            details = {
                ADAPTER_DETAIL: {
                    "type": "lora",
                    "base": base.digest,
                    "alpha": adapter_meta.get("adapter.lora.alpha"),
                    "dataset": dataset_digest,
                    "rank": self.spec.lora.get("rank"),
                },
            }
            facts = ModelFacts(architecture=base.manifest.facts.architecture, details=details)
            params = {
                **self.spec.lora,
                "dataset": f"{dataset['name']}@{dataset['version']}",
                "dataset_digest": dataset_digest,
            }
            metrics = {f"task_{k}" if not k.startswith("task_") else k: v for k, v in self.report.candidate.items()}
            metrics["adapter_bytes"] = float(gguf.stat().st_size)
            metrics["adapter_fraction"] = gguf.stat().st_size / base.manifest.files[0].size
            result = self.registry.register(
                base.manifest.name,
                "gguf",
                {"adapter.gguf": gguf},
                facts=facts,
                runtime=base.manifest.runtime,
                weight_bytes=base.manifest.files[0].size + gguf.stat().st_size,
                source=Source(kind="derived", origin=base.digest),
                lineage=Lineage(
                    parents=[base.digest],
                    recipe=LineageRecipe(
                        name=self.spec.name,
                        steps=[
                            RecipeStep.model_validate({"pass": "hf_from_gguf", "params": {}}),
                            RecipeStep.model_validate({"pass": "lora", "params": params}),
                            RecipeStep.model_validate({"pass": "export_gguf_lora", "params": {}}),
                        ],
                    ),
                ),
                variant=self.spec.variant,
                metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
            )
            record.cached = not result.created
            envelope = result.envelope
            record.numbers = {
                "version": f"{envelope.manifest.name}@{envelope.manifest.version}",
                "variant": envelope.manifest.variant,
                "digest": envelope.digest,
                "training": training,
            }
            self.report.adapter = envelope
            return envelope

    def release(self, envelope: SignedManifest) -> None:
        release = self.spec.release
        if release is None or self.client is None:
            return
        with self.step("release") as record:
            found, kept = start_or_keep_release(self.client, release.blueprint, envelope.digest, release.policy)
            record.cached = kept
            record.numbers = {"release": found.id, "state": found.state}
            if not kept:
                record.numbers["from"] = found.from_version
            self.report.release_id = found.id


def _lines(path: Path) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def _report_numbers(outcome: StepOutcome) -> dict[str, Any]:
    keep: dict[str, Any] = {}
    for key, value in outcome.report.items():
        if isinstance(value, int | float | str | bool) or value is None:
            keep[key] = value
    return keep


def _measure(
    base_path: Path,
    lora: Path | None,
    heldout: Path,
    spec: ImproveSpec,
    chat_template: str | None,
    progress: PassProgress,
) -> dict[str, float]:
    """Task score on the held-out split, general perplexity and task accuracy of base (+ adapter)."""
    from slmops.optimize._data import load_tasks, read_text
    from slmops.optimize.evaluate import accuracy, perplexity, tokenize_for_eval
    from slmops.optimize.task_eval import score_task

    ev = spec.evaluation
    threads = ev.threads or max(1, os.cpu_count() or 1)
    score = score_task(
        base_path,
        heldout,
        lora_path=lora,
        chat_template=chat_template,
        format_regex=ev.format_regex,
        max_items=ev.max_heldout,
        max_new_tokens=ev.max_new_tokens,
        context_tokens=ev.context_tokens,
        threads=threads,
    )
    metrics: dict[str, float] = {
        "task_exact": score.exact_match,
        "task_nll": score.mean_nll,
        "task_items": float(score.n_items),
    }
    if score.format_score is not None:
        metrics["task_format"] = score.format_score
    progress(1, 3)
    text = read_text(ev.text, spec.base_dir)
    tasks = load_tasks(ev.tasks, spec.base_dir)[: ev.max_tasks] if ev.tasks else []
    tokens = tokenize_for_eval(base_path, text, ev.max_tokens, tasks)
    ppl, scored = perplexity(base_path, tokens.text, context_tokens=ev.context_tokens, threads=threads, lora_path=lora)
    metrics["perplexity"] = ppl
    metrics["perplexity_tokens"] = float(scored)
    progress(2, 3)
    if tokens.tasks:
        metrics["accuracy"] = accuracy(
            base_path, tokens.tasks, threads=threads, context_tokens=ev.context_tokens, lora_path=lora
        )
        metrics["accuracy_items"] = float(len(tokens.tasks))
    progress(3, 3)
    return metrics


def run_improve(
    spec: ImproveSpec,
    *,
    registry: Registry,
    settings: Settings | None = None,
    progress_factory: ProgressFactory = _quiet,
    client: OperatorClient | None = None,
) -> ImproveReport:
    """Run (or resume) the improve loop of ``spec``; the report says what every step did and measured.

    Gates that fail stop the run before ``register``: nothing is registered or released, and the report's outcome is
    ``gates_failed``. ``client`` (an operator client of the control plane) is needed only for ``spec.release``.
    """
    run = _Run(spec, registry, cache_dir(settings), progress_factory, client)
    if spec.release is not None and client is None:
        raise SLMOpsError(
            f"the improve recipe {spec.name} releases to blueprint {spec.release.blueprint}, which needs a control "
            "plane: give --server URL and an operator token (SLMOPS_TOKEN), or remove the release section"
        )
    train, heldout, dataset_digest, dataset = run.dataset()
    base, base_path = run.base()
    _adapter_dir, _adapter_digest, gguf, gguf_digest = run.train(base, base_path, train)
    run.evaluate(base, base_path, gguf, gguf_digest, heldout)
    run.gates(base, gguf.stat().st_size)
    if not run.report.passed:
        run.report.outcome = "gates_failed"
        return run.report
    training = next((s.numbers for s in run.report.steps if s.name == "train"), {})
    envelope = run.register(base, gguf, dataset_digest, dataset, training)
    run.release(envelope)
    run.report.outcome = "released" if run.report.release_id else "registered"
    return run.report
